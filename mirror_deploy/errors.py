"""One exception type for every failure a user can fix: it names the problem and the fix."""
from __future__ import annotations


class MirrorDeployError(Exception):
    """A failure the user can act on. `problem` says what is wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
