"""User-facing fleet errors: one line naming the problem and the fix."""

from __future__ import annotations


class FleetError(Exception):
    """An error caused by input, configuration or environment, not by a bug.

    The console prints it as a single line (``<problem> (fix: <fix>)``) and exits non-zero.
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})"
