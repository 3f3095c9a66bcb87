"""User-facing errors: one line naming the problem and the fix."""

from __future__ import annotations


class AgentError(Exception):
    """An error caused by input, configuration or environment, not by a bug.

    The CLI prints it as a single line (``error: <problem> (fix: <hint>)``) and
    exits non-zero; the daemon logs it and keeps running.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class ModelLoadError(AgentError):
    """The model file cannot be loaded by any usable runtime."""


class BundleError(AgentError):
    """The bundle or its metadata is invalid or disagrees with the model."""


class InputError(AgentError):
    """An input (image, tensor, sensor window) cannot be used with this model."""


class RuntimeUnavailable(AgentError):
    """A runtime backend is not installed or not usable here."""
