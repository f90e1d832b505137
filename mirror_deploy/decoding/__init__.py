"""Decoding over the compiled runtimes: autoregressive, vanilla SD and Mirror-SD, one engine."""
