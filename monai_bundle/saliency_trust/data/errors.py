"""The one error type data readers raise: it always names the file and the problem."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with one input file (or one row of a label file)."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
