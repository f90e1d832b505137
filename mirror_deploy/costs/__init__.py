"""What a run needs of `tune`'s measurements, below both decoding/ and tuning/: the measured cost curves
(curves.py), the latency model over them (latency.py), and the artifact's tuning.json read back (tuned.py).
decoding/ reads these at run time; tuning/ measures and writes them. Nothing here imports either."""
