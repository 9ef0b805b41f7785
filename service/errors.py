"""One error type for the API (status + message) and the mapping of ``search`` errors onto it."""

from __future__ import annotations

from search.errors import (
    BudgetInfeasibleError,
    InvalidInputError,
    RuntimeUnavailableError,
    SearchError,
    UnsafeArchiveError,
    UnsupportedModelError,
)


class ApiError(Exception):
    """An answer with a status code and a message saying what was wrong."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_STATUS: list[tuple[type[SearchError], int]] = [
    (UnsafeArchiveError, 422),
    (UnsupportedModelError, 422),
    (InvalidInputError, 422),
    (BudgetInfeasibleError, 422),
    (RuntimeUnavailableError, 422),
]


def from_kind(kind: str, message: str) -> ApiError:
    """An ``ApiError`` for a ``search`` error reported by name (from a sandboxed process)."""
    for cls, status in _STATUS:
        if cls.__name__ == kind:
            return ApiError(status, message)
    return ApiError(422, message)
