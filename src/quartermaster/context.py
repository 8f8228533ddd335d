"""The per-request context handed to every resolver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select

from quartermaster import policy
from quartermaster.auth import ANONYMOUS, Principal
from quartermaster.db.engine import Database, Role
from quartermaster.db.loaders import Loaders
from quartermaster.db.replica import RoutedReader

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
    #: The WAL position of the request's ``X-Consistency-Token`` (read-your-writes), if any.
    consistency_lsn: int | None = None
    #: The WAL position after this request's last commit (``resolvers/common.py``); the routing
    #: extension turns it into the response's consistency token.
    commit_lsn: int | None = None
    metrics: Any = None
    #: The app's Redis client (None when Redis is not configured).
    redis: Any = None
    #: The live stock hub (``live/hub.py``; None without Redis).
    live: Any = None
    #: WebSocket only: the ``connection_init`` payload (strawberry fills it in) and the bearer
    #: token found there (``token`` or ``Authorization: Bearer …``), kept for access checks.
    connection_params: dict[str, Any] | None = None
    token: str | None = None
    #: Who is calling (``auth.py``): anonymous until a bearer token says otherwise.
    principal: Principal = ANONYMOUS
    #: Rate limiting (``ratelimit.py``): the limiter, this caller's bucket, and the wait the
    #: limiter asked for when it refused (the HTTP layer turns it into 429 + Retry-After).
    rate_limiter: Any = None
    rate_key: str | None = None
    retry_after: float | None = None
    _loaders: Loaders | None = field(default=None, repr=False)

    def reset_loaders(self) -> None:
        """Forget what this request loaded (after a commit, so payloads read fresh rows)."""
        self._loaders = None

    def use_primary(self) -> None:
        if self.role != "primary":
            self.role = "primary"
            self._loaders = None

    @property
    def reader(self) -> RoutedReader:
        """Where this request's reads go: the replica while it is healthy (and has replayed
        ``consistency_lsn``), else the primary; replica failures are retried on the primary."""
        return self.db.routed_reader(self.role)

    @property
    def loaders(self) -> Loaders:
        if self._loaders is None:
            from quartermaster.schema.registry import ROW_TYPES

            self._loaders = Loaders(
                self.reader,
                batch=self.settings.graphql.dataloaders,
                convert=ROW_TYPES,
                scope=self.scope,
            )
        return self._loaders

    def scope(self, table: str, stmt: Select[Any]) -> Select[Any]:
        """``stmt`` restricted to the rows of ``table`` this caller may read (``policy.py``)."""
        return policy.scope(
            self.principal, table, stmt, public_catalogue=self.settings.access.public_catalogue
        )

    @property
    def page_sizes(self) -> tuple[int, int]:
        gql = self.settings.graphql
        return gql.default_page_size, gql.max_page_size
