"""The per-request context handed to every resolver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from quartermaster.db.engine import Database, Role
from quartermaster.db.loaders import Loaders

if TYPE_CHECKING:
    from quartermaster.config import Settings


@dataclass
class Context:
    settings: Settings
    db: Database
    request_id: str
    request: Any = None
    response: Any = None
    #: Queries read through the replica; the routing extension switches mutations to primary
    #: before any resolver runs, so a mutation payload never reads stale rows.
    role: Role = "replica"
    metrics: Any = None
    #: The app's Redis client (None when Redis is not configured).
    redis: Any = None
    _loaders: Loaders | None = field(default=None, repr=False)

    def reset_loaders(self) -> None:
        """Forget what this request loaded (after a commit, so payloads read fresh rows)."""
        self._loaders = None

    def use_primary(self) -> None:
        if self.role != "primary":
            self.role = "primary"
            self._loaders = None

    @property
    def reader(self) -> AsyncEngine:
        return self.db.reader(self.role)

    @property
    def loaders(self) -> Loaders:
        if self._loaders is None:
            from quartermaster.schema.registry import ROW_TYPES

            self._loaders = Loaders(
                self.reader, batch=self.settings.graphql.dataloaders, convert=ROW_TYPES
            )
        return self._loaders

    @property
    def page_sizes(self) -> tuple[int, int]:
        gql = self.settings.graphql
        return gql.default_page_size, gql.max_page_size
