"""Applications built on the library: the demo and the benchmarks.

The library never imports them.
"""
