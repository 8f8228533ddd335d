"""Expected failures of domain operations, mapped to ``UserError`` by the resolvers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    code: str  # one of UserErrorCode's names
    message: str
    field: tuple[str, ...] | None = None


class ProblemsError(Exception):
    """Raised inside a unit of work to roll it back and report the problems."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems
