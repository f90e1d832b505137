"""mirror-deploy: Mirror Speculative Decoding across two accelerators of one machine."""
from __future__ import annotations

__version__ = "0.1.0"


def load(folder, profile=None):
    """Open an exported artifact on the devices of its profile (or `profile`)."""
    from .decoding.engine import Engine
    return Engine(folder, profile)


def __getattr__(name):
    if name in ("GenerationConfig", "Engine"):
        from .decoding import config, engine
        return {"GenerationConfig": config.GenerationConfig, "Engine": engine.Engine}[name]
    raise AttributeError(name)
