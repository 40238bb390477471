"""The trainer's errors."""

from __future__ import annotations


class TrainingError(Exception):
    """Training cannot go on (bad data, NaN loss, resume mismatch, memory); one line naming the fix."""


class StepFailure(Exception):
    """A member's step found bad data or a non-finite loss (before its update): what happened and the fix; the
    loop adds where the checkpoint is."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix

    def message(self, checkpoint: str) -> str:
        return f"{self.what}; {checkpoint}; {self.fix}"
