"""fogmig: a mobility-aware fog platform that live-migrates CoAP services with runc and CRIU.

The import root. Each top-level folder of the repository is a subpackage (see pyproject.toml).
"""

__version__ = "0.1.0"
