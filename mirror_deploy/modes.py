"""The decoding modes a run can name: one list, read by the request settings (decoding/config.py) and by
the tuning file's check (costs/tuned.py), which must not import decoding."""

MODES = ("mirror", "sd", "ar")
DEFAULT_MODE = "mirror"   # an untuned artifact's mode when none is named
