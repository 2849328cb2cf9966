"""Judging data and results: the data report, the run report, blind A/B review and
benchmarks through lm-evaluation-harness."""
