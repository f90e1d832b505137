"""Benchmarks: commands that print ratios measured side by side in one run (A/B interleaved, medians)."""
