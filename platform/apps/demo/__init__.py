"""``fogmig demo``: the whole platform on the embedded testbed, its live view and its report."""
