"""The decoding modes a run can name: one list, read by the request settings (decoding/config.py) and by
the tuning file's check (costs/tuned.py), which must not import decoding."""

MODES = ("mirror", "sd", "ar", "lookup")   # lookup: prompt-lookup drafts, no draft model
DEFAULT_MODE = "mirror"   # an untuned artifact's mode when none is named
TARGET_ONLY_MODE = "lookup"   # ... and a target-only artifact's (exported without --draft)
DRAFT_MODES = ("mirror", "sd")   # the modes that run the draft model
