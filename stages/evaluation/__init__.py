"""Evaluation: one checkpoint on benchmarks, pass@k / maj@k, in-stage held-out accuracy, reports and run comparisons."""
