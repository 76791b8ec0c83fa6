"""Post-copy and hybrid: fogmig's own page server in front of CRIU's lazy-pages daemon."""
