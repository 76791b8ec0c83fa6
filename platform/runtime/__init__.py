"""One node's container runtime: runc and CRIU, OCI bundles, CRIU image files, what the
kernel can do, and safe removal of CRIU's work directories.
"""
