"""Tuning from calibration text: a learned early exit (tuned lens) trained on the target's own output."""
