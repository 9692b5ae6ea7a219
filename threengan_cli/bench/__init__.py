"""The benchmark: its grid of methods, sizes and repeats, the runs, and the report."""
