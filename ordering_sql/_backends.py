"""The databases ordering-sql runs on: the one list that settings and the store both read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["BACKENDS", "Backend", "backend_for_scheme"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One supported database, by SQLAlchemy's dialect name and the async driver used for it."""

    name: str
    driver: str
    #: The URL schemes that select it besides ``name+driver`` (a bare name picks the driver).
    aliases: tuple[str, ...]

    @property
    def scheme(self) -> str:
        return f"{self.name}+{self.driver}"


BACKENDS: Final = (
    Backend("sqlite", "aiosqlite", aliases=("sqlite",)),
    Backend("postgresql", "asyncpg", aliases=("postgresql", "postgres")),
)


def backend_for_scheme(scheme: str) -> Backend | None:
    """The backend a URL scheme (``drivername``) selects, or None if none does."""
    for backend in BACKENDS:
        if scheme == backend.scheme or scheme in backend.aliases:
            return backend
    return None
