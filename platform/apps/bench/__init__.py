"""Benchmarks that print measured figures: the controller's reaction and the transfer channel."""
