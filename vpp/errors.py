"""Domain errors: what went wrong, named by field, with no transport status.

The service layers (dispatch, devices) raise these; the API maps each class to its answer in one
place (``api/errors.py``):

- :class:`InvalidInput`: a field is missing, malformed or out of range;
- :class:`NotFound`: no such object for this caller; another tenant's looks the same;
- :class:`Conflict`: the object's state does not allow the change;
- :class:`Forbidden`: the caller may not act on this object or for this tenant;
- :class:`Unavailable`: a dependency (database, state store, broker) did not answer; it names
  which, and how soon to try again.

A bare :class:`DomainError` is a bad request of no finer kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One problem with one field; ``index`` is the row's position in a bulk import."""

    field: str
    message: str
    index: int | None = None


class DomainError(Exception):
    """``field`` names the offending input or state (None: the message says it all);
    ``errors`` lists every problem found when there are several (a bulk import's rows)."""

    def __init__(self, field: str | None, message: str, errors: Sequence[FieldError] = ()) -> None:
        self.field = field
        self.message = message
        self.errors = list(errors)
        super().__init__(self.detail)

    @property
    def detail(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidInput(DomainError):
    """A field is missing, malformed or out of range."""


class NotFound(DomainError):
    """No such object for this caller (missing, or another tenant's)."""


class Conflict(DomainError):
    """The object's current state does not allow the change."""


class Forbidden(DomainError):
    """The caller may not act on this object or for this tenant."""


class Unavailable(DomainError):
    """A dependency did not answer or refused: ``dependency`` names it (``database``,
    ``state_store``, ``broker``), ``retry_after_s`` says when to try again.

    ``Unavailable.of("database", "not reachable")`` is the usual way to make one: its field is
    the dependency, so the detail reads ``database: not reachable``."""

    dependency: str = "service"
    retry_after_s: int = 5

    def __init__(
        self,
        field: str | None,
        message: str,
        errors: Sequence[FieldError] = (),
        *,
        dependency: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(field, message, errors)
        if dependency is not None:
            self.dependency = dependency
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, dependency: str, message: str, retry_after_s: int | None = None) -> Unavailable:
        return cls(
            dependency,
            message,
            [FieldError(dependency, message)],
            dependency=dependency,
            retry_after_s=retry_after_s,
        )
