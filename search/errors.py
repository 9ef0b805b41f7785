"""Exceptions raised by the search package; the service maps them to HTTP answers in one place."""

from __future__ import annotations


class SearchError(Exception):
    """Root of every error this package raises on purpose."""


class UnsafeArchiveError(SearchError):
    """An uploaded archive is malformed, oversized, or carries something that could execute code."""


class UnsupportedModelError(SearchError):
    """A model uses an operator, argument or structure the engine does not accept."""


class InvalidInputError(SearchError):
    """An argument (input shape, normalisation, plan, data) is wrong for this model."""


class RuntimeUnavailableError(SearchError):
    """The named runtime cannot run here (for example ``cuda`` without a GPU)."""


class BudgetInfeasibleError(SearchError):
    """No candidate can meet the requested budget."""
