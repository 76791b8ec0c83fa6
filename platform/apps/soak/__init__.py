"""``fogmig soak``: many migrations under device traffic and restarts, checked for loss.

plan (options, the seeded sequence of migrations and disruptions), figures (the summary and
its verdict, the processes' resources), memory (the processes' samples and whether they
keep growing after their warm-up), run (the run on the testbed).
"""
