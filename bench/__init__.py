"""Benchmarks: each runs with ``python -m bench.<name>``, prints a short table with its headline
figure last and writes its figures to ``bench/results/<name>.json``. Not tests: nothing here asserts
a timing."""
