"""User-facing fleet errors: one line naming the problem and the fix."""

from __future__ import annotations


class FleetError(Exception):
    """An error caused by input, configuration or environment, not by a bug.

    The console prints it as a single line (``<problem> (fix: <fix>)``) and exits with ``exit_code`` (2: bad input).
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})"


class OperationFailed(FleetError):
    """The input was fine but the operation failed (golden vectors out of tolerance): exit 1, same one-line form."""

    exit_code = 1
