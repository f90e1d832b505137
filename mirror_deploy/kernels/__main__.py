"""`python -m mirror_deploy.kernels build [--force]`: compile the kernel; `... status`: which path runs."""
from __future__ import annotations

import sys

from ..errors import MirrorDeployError
from .build import build
from .library import status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "status"):
        print("usage: python -m mirror_deploy.kernels build [--force] | status", file=sys.stderr)
        return 2
    try:
        if argv[0] == "build":
            build(force="--force" in argv, quiet=False)
        s = status()
        print(f"4-bit kernel: {s.summary()}")
        return 0 if s.available or argv[0] == "status" else 1
    except MirrorDeployError as e:
        print(f"error: {e.problem}\n  fix: {e.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
