"""Benchmark scripts (``python benchmarks/<name>.py --help``); see benchmarks/README.md."""
