"""Settings, one small frozen object per concern, read from ``QM_*`` environment variables.

Every variable is listed in the README's configuration table; ``tests/test_config.py`` keeps the
two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean (true/false), got {raw!r}")


def normalize_database_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and point them at the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class DatabaseSettings:
    url: str | None
    replica_url: str | None
    pool_size: int = 30
    max_overflow: int = 0
    pool_timeout: float = 10.0
    statement_timeout_ms: int = 15_000
    pre_ping: bool = False
    pool_recycle_s: int = 1800
    #: How often the app probes the replica's lag and reachability (seconds).
    replica_probe_s: float = 1.0
    #: Reads go to the primary while the replica lags more than this (seconds).
    replica_max_lag_s: float = 5.0
    #: PostgreSQL ``plan_cache_mode`` of the connections; None keeps the server's (``auto``
    #: unless configured there). Workers use ``force_generic_plan`` unless this is set.
    plan_cache_mode: str | None = None

    @classmethod
    def from_env(cls) -> DatabaseSettings:
        url = _env("QM_DATABASE_URL")
        replica = _env("QM_REPLICA_DATABASE_URL")
        return cls(
            url=normalize_database_url(url) if url else None,
            replica_url=normalize_database_url(replica) if replica else None,
            pool_size=_int("QM_DB_POOL_SIZE", 30),
            max_overflow=_int("QM_DB_MAX_OVERFLOW", 0),
            pool_timeout=_float("QM_DB_POOL_TIMEOUT", 10.0),
            statement_timeout_ms=_int("QM_DB_STATEMENT_TIMEOUT_MS", 15_000),
            pre_ping=_bool("QM_DB_PRE_PING", False),
            pool_recycle_s=_int("QM_DB_POOL_RECYCLE", 1800),
            replica_probe_s=_float("QM_REPLICA_PROBE_S", 1.0),
            replica_max_lag_s=_float("QM_REPLICA_MAX_LAG_S", 5.0),
            plan_cache_mode=_plan_cache_mode(),
        )


PLAN_CACHE_MODES = ("auto", "force_generic_plan", "force_custom_plan")


def _plan_cache_mode() -> str | None:
    value = _env("QM_DB_PLAN_CACHE_MODE")
    if value is None:
        return None
    if value not in PLAN_CACHE_MODES:
        raise ValueError(f"QM_DB_PLAN_CACHE_MODE must be one of {', '.join(PLAN_CACHE_MODES)}")
    return value


@dataclass(frozen=True)
class RedisSettings:
    url: str | None

    @classmethod
    def from_env(cls) -> RedisSettings:
        return cls(url=_env("QM_REDIS_URL"))


def _per_role(name: str, default: dict[str, int]) -> dict[str, int]:
    """``ANONYMOUS=500,CUSTOMER=2000`` → merged over ``default`` (0 means unlimited)."""
    raw = _env(name)
    if raw is None:
        return dict(default)
    values = dict(default)
    for part in raw.split(","):
        role, sep, number = part.partition("=")
        role = role.strip().upper()
        if not sep or role not in default:
            raise ValueError(f"{name}: expected ROLE=N pairs with roles {sorted(default)}")
        try:
            values[role] = int(number)
        except ValueError as exc:
            raise ValueError(f"{name}: {number.strip()!r} is not an integer") from exc
    return values


@dataclass(frozen=True)
class AccessSettings:
    """Tokens, the query-cost budget and the rate limit per role, CORS, production checks."""

    secret: str | None = None
    public_catalogue: bool = False
    cost_budgets: dict[str, int] = field(
        default_factory=lambda: {"ANONYMOUS": 1_000, "CUSTOMER": 5_000, "STAFF": 25_000,
                                 "ADMIN": 50_000}
    )  # fmt: skip
    rate_limits: dict[str, int] = field(
        default_factory=lambda: {"ANONYMOUS": 5_000, "CUSTOMER": 50_000, "STAFF": 500_000,
                                 "ADMIN": 0}
    )  # fmt: skip
    rate_window_s: float = 60.0
    cors_origins: tuple[str, ...] = ()
    trust_forwarded_for: bool = False

    def token_secret(self, production: bool) -> str:
        """The HS256 secret. Development falls back to a fixed, public one (so `dev` works out of
        the box); production refuses a missing, short or development secret."""
        from quartermaster.auth import DEV_SECRET, MIN_SECRET_LENGTH

        if self.secret is None:
            if production:
                raise ValueError("QM_AUTH_SECRET must be set when QM_ENV=production")
            return DEV_SECRET
        if production and (self.secret == DEV_SECRET or len(self.secret) < MIN_SECRET_LENGTH):
            raise ValueError(
                f"QM_AUTH_SECRET must be a random secret of at least {MIN_SECRET_LENGTH} "
                "characters in production (not the development default)"
            )
        return self.secret

    def cost_budget(self, role: Any) -> int:
        return self.cost_budgets.get(getattr(role, "value", str(role)), 0)

    def rate_limit(self, role: Any) -> int:
        return self.rate_limits.get(getattr(role, "value", str(role)), 0)

    @classmethod
    def from_env(cls) -> AccessSettings:
        default = cls()
        origins = _env("QM_CORS_ORIGINS")
        return cls(
            secret=_env("QM_AUTH_SECRET"),
            public_catalogue=_bool("QM_PUBLIC_CATALOGUE", False),
            cost_budgets=_per_role("QM_COST_BUDGETS", default.cost_budgets),
            rate_limits=_per_role("QM_RATE_LIMITS", default.rate_limits),
            rate_window_s=_float("QM_RATE_WINDOW_S", 60.0),
            cors_origins=tuple(o.strip() for o in origins.split(",") if o.strip())
            if origins
            else (),
            trust_forwarded_for=_bool("QM_TRUST_FORWARDED_FOR", False),
        )


@dataclass(frozen=True)
class JobSettings:
    """The outbox relay, the job workers and the streams between them."""

    relay_batch: int = 500
    relay_poll_s: float = 0.02
    outbox_retention_hours: float = 72.0
    stock_events_maxlen: int = 100_000
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 300.0
    claim_idle_s: float = 30.0
    concurrency: int = 64
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 10.0
    shutdown_grace_s: float = 10.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def from_env(cls) -> JobSettings:
        port = _env("QM_WORKER_METRICS_PORT")
        return cls(
            relay_batch=_int("QM_RELAY_BATCH", 500),
            relay_poll_s=_float("QM_RELAY_POLL_S", 0.02),
            outbox_retention_hours=_float("QM_OUTBOX_RETENTION_HOURS", 72.0),
            stock_events_maxlen=_int("QM_STOCK_EVENTS_MAXLEN", 100_000),
            max_attempts=_int("QM_JOB_MAX_ATTEMPTS", 8),
            backoff_base_s=_float("QM_JOB_BACKOFF_BASE_S", 0.5),
            backoff_max_s=_float("QM_JOB_BACKOFF_MAX_S", 300.0),
            claim_idle_s=_float("QM_JOB_CLAIM_IDLE_S", 30.0),
            concurrency=_int("QM_WORKER_CONCURRENCY", 64),
            breaker_threshold=_int("QM_BREAKER_THRESHOLD", 5),
            breaker_cooldown_s=_float("QM_BREAKER_COOLDOWN_S", 10.0),
            shutdown_grace_s=_float("QM_WORKER_SHUTDOWN_GRACE_S", 10.0),
            metrics_port=_int("QM_WORKER_METRICS_PORT", 0) if port else None,
            metrics_host=_env("QM_WORKER_METRICS_HOST", "127.0.0.1") or "127.0.0.1",
        )


@dataclass(frozen=True)
class GraphQLSettings:
    """Protection limits and developer conveniences of the /graphql endpoint."""

    max_depth: int = 12
    max_aliases: int = 30
    max_tokens: int = 5_000
    max_body_bytes: int = 1_000_000
    introspection: bool = True
    field_suggestions: bool = True
    graphiql: bool = True
    dataloaders: bool = True
    default_page_size: int = 20
    max_page_size: int = 100

    @classmethod
    def from_env(cls, production: bool) -> GraphQLSettings:
        return cls(
            max_depth=_int("QM_MAX_QUERY_DEPTH", 12),
            max_aliases=_int("QM_MAX_ALIASES", 30),
            max_tokens=_int("QM_MAX_TOKENS", 5_000),
            max_body_bytes=_int("QM_MAX_BODY_BYTES", 1_000_000),
            introspection=_bool("QM_INTROSPECTION", not production),
            field_suggestions=_bool("QM_FIELD_SUGGESTIONS", not production),
            graphiql=_bool("QM_GRAPHIQL", not production),
            dataloaders=_bool("QM_DATALOADERS", True),
        )


@dataclass(frozen=True)
class PartnerSettings:
    """Where one partner API lives; no URL means the partner is not called at all."""

    url: str | None = None
    # Kept out of repr so that logging the settings never prints a credential.
    api_key: str | None = field(default=None, repr=False)
    signing_secret: str | None = field(default=None, repr=False)


#: Partner name -> the variables of its base URL and of its signing secret.
PARTNER_VARS = {
    "invoicing": ("QM_INVOICING_URL", "QM_INVOICING_SIGNING_SECRET"),
    "shop": ("QM_SHOP_URL", "QM_SHOP_SIGNING_SECRET"),
    "notifications": ("QM_NOTIFY_URL", "QM_NOTIFY_SIGNING_SECRET"),
}


@dataclass(frozen=True)
class PartnersSettings:
    """The partner APIs the workers call (``integrations/``) and their shared timeouts.

    ``production`` decides what a partner without a signing secret gets: the public development
    secret outside production, a refusal in production (:meth:`signing_secret`).
    """

    invoicing: PartnerSettings = field(default_factory=PartnerSettings)
    shop: PartnerSettings = field(default_factory=PartnerSettings)
    notifications: PartnerSettings = field(default_factory=PartnerSettings)
    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    production: bool = False

    def partner(self, name: str) -> PartnerSettings:
        if name not in PARTNER_VARS:
            raise ValueError(f"unknown partner {name!r}")
        partner: PartnerSettings = getattr(self, name)
        return partner

    def signing_secret(self, name: str) -> str:
        """The HMAC secret requests to partner ``name`` are signed with; every request is signed.

        Development and tests fall back to the fixed, public ``DEV_SIGNING_SECRET`` (so `dev`
        and its sandbox partner work out of the box); production refuses a missing or
        development secret for a partner that has a URL (one that is called at all).
        """
        from quartermaster.integrations.signing import DEV_SIGNING_SECRET

        partner = self.partner(name)
        url_var, secret_var = PARTNER_VARS[name]
        if partner.signing_secret is None:
            if self.production and partner.url:
                raise ValueError(
                    f"{secret_var} must be set when QM_ENV=production and {url_var} is set "
                    "(partner requests are always signed)"
                )
            return DEV_SIGNING_SECRET
        if self.production and partner.url and partner.signing_secret == DEV_SIGNING_SECRET:
            raise ValueError(
                f"{secret_var} must be the secret agreed with the partner in "
                "production (not the development default)"
            )
        return partner.signing_secret

    def check_signing(self) -> None:
        """Raise ValueError (see :meth:`signing_secret`) unless every called partner can sign."""
        for name in PARTNER_VARS:
            self.signing_secret(name)

    @classmethod
    def from_env(cls, production: bool = False) -> PartnersSettings:
        timeout = _float("QM_PARTNER_TIMEOUT_S", 5.0)
        connect_timeout = _float("QM_PARTNER_CONNECT_TIMEOUT_S", 2.0)
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("QM_PARTNER_TIMEOUT_S and QM_PARTNER_CONNECT_TIMEOUT_S must be > 0")
        return cls(
            invoicing=PartnerSettings(
                url=_env("QM_INVOICING_URL"),
                api_key=_env("QM_INVOICING_API_KEY"),
                signing_secret=_env("QM_INVOICING_SIGNING_SECRET"),
            ),
            shop=PartnerSettings(
                url=_env("QM_SHOP_URL"),
                api_key=_env("QM_SHOP_API_KEY"),
                signing_secret=_env("QM_SHOP_SIGNING_SECRET"),
            ),
            notifications=PartnerSettings(
                url=_env("QM_NOTIFY_URL"),
                api_key=_env("QM_NOTIFY_API_KEY"),
                signing_secret=_env("QM_NOTIFY_SIGNING_SECRET"),
            ),
            timeout_s=timeout,
            connect_timeout_s=connect_timeout,
            production=production,
        )


@dataclass(frozen=True)
class PricingSettings:
    """Tier discounts in percent; the write path uses them."""

    tier_discounts: dict[str, Decimal] = field(
        default_factory=lambda: {
            "STANDARD": Decimal("0"),
            "SILVER": Decimal("3"),
            "GOLD": Decimal("5"),
            "PLATINUM": Decimal("8"),
        }
    )

    @classmethod
    def from_env(cls) -> PricingSettings:
        raw = _env("QM_TIER_DISCOUNTS")
        if raw is None:
            return cls()
        discounts: dict[str, Decimal] = {}
        for part in raw.split(","):
            tier, _, pct = part.partition("=")
            discounts[tier.strip().upper()] = Decimal(pct.strip())
        return cls(tier_discounts={**cls().tier_discounts, **discounts})


@dataclass(frozen=True)
class LiveSettings:
    """Live stock subscriptions (``live/``): per-subscriber buffering and WebSocket limits."""

    queue_size: int = 1_000
    max_subscriptions_per_connection: int = 20
    connection_init_timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> LiveSettings:
        return cls(
            queue_size=max(1, _int("QM_LIVE_QUEUE_SIZE", 1_000)),
            max_subscriptions_per_connection=max(1, _int("QM_LIVE_MAX_SUBSCRIPTIONS", 20)),
            connection_init_timeout_s=_float("QM_LIVE_INIT_TIMEOUT_S", 10.0),
        )


@dataclass(frozen=True)
class GcSettings:
    """Garbage-collector policy of API and worker processes (``gc_policy.py``)."""

    freeze_interval_s: float = 10.0
    sweep_interval_s: float = 600.0

    @classmethod
    def from_env(cls, env: str) -> GcSettings:
        # Test processes build many short-lived apps: no freezing unless asked for.
        default_freeze = 0.0 if env == "test" else 10.0
        return cls(
            freeze_interval_s=max(0.0, _float("QM_GC_FREEZE_S", default_freeze)),
            sweep_interval_s=max(0.0, _float("QM_GC_SWEEP_S", 600.0)),
        )


@dataclass(frozen=True)
class Settings:
    env: str
    host: str
    port: int
    log_level: str
    log_json: bool
    data_dir: Path
    database: DatabaseSettings
    redis: RedisSettings
    graphql: GraphQLSettings
    pricing: PricingSettings
    jobs: JobSettings = field(default_factory=JobSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    partners: PartnersSettings = field(default_factory=PartnersSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    gc: GcSettings = field(default_factory=GcSettings)

    @property
    def production(self) -> bool:
        return self.env == "production"

    @classmethod
    def from_env(cls) -> Settings:
        env = (_env("QM_ENV", "development") or "development").lower()
        if env not in ("development", "production", "test"):
            raise ValueError(f"QM_ENV must be development, production or test, got {env!r}")
        production = env == "production"
        return cls(
            env=env,
            host=_env("QM_HOST", "127.0.0.1") or "127.0.0.1",
            port=_int("QM_PORT", 8000),
            log_level=(_env("QM_LOG_LEVEL", "info") or "info").lower(),
            log_json=_bool("QM_LOG_JSON", True),
            data_dir=Path(_env("QM_DATA_DIR", ".qm-data") or ".qm-data").resolve(),
            database=DatabaseSettings.from_env(),
            redis=RedisSettings.from_env(),
            graphql=GraphQLSettings.from_env(production),
            pricing=PricingSettings.from_env(),
            jobs=JobSettings.from_env(),
            access=AccessSettings.from_env(),
            partners=PartnersSettings.from_env(production),
            live=LiveSettings.from_env(),
            gc=GcSettings.from_env(env),
        )


#: Every environment variable Quartermaster reads (the README table lists the same names).
ENV_VARS = (
    "QM_ENV",
    "QM_HOST",
    "QM_PORT",
    "QM_LOG_LEVEL",
    "QM_LOG_JSON",
    "QM_DATA_DIR",
    "QM_DATABASE_URL",
    "QM_REPLICA_DATABASE_URL",
    "QM_DB_POOL_SIZE",
    "QM_DB_MAX_OVERFLOW",
    "QM_DB_POOL_TIMEOUT",
    "QM_DB_STATEMENT_TIMEOUT_MS",
    "QM_DB_PRE_PING",
    "QM_DB_POOL_RECYCLE",
    "QM_DB_PLAN_CACHE_MODE",
    "QM_REPLICA_PROBE_S",
    "QM_REPLICA_MAX_LAG_S",
    "QM_REDIS_URL",
    "QM_MAX_QUERY_DEPTH",
    "QM_MAX_ALIASES",
    "QM_MAX_TOKENS",
    "QM_MAX_BODY_BYTES",
    "QM_INTROSPECTION",
    "QM_FIELD_SUGGESTIONS",
    "QM_GRAPHIQL",
    "QM_DATALOADERS",
    "QM_TIER_DISCOUNTS",
    "QM_AUTH_SECRET",
    "QM_PUBLIC_CATALOGUE",
    "QM_COST_BUDGETS",
    "QM_RATE_LIMITS",
    "QM_RATE_WINDOW_S",
    "QM_CORS_ORIGINS",
    "QM_TRUST_FORWARDED_FOR",
    "QM_RELAY_BATCH",
    "QM_RELAY_POLL_S",
    "QM_OUTBOX_RETENTION_HOURS",
    "QM_STOCK_EVENTS_MAXLEN",
    "QM_JOB_MAX_ATTEMPTS",
    "QM_JOB_BACKOFF_BASE_S",
    "QM_JOB_BACKOFF_MAX_S",
    "QM_JOB_CLAIM_IDLE_S",
    "QM_WORKER_CONCURRENCY",
    "QM_BREAKER_THRESHOLD",
    "QM_BREAKER_COOLDOWN_S",
    "QM_WORKER_SHUTDOWN_GRACE_S",
    "QM_WORKER_METRICS_PORT",
    "QM_WORKER_METRICS_HOST",
    "QM_INVOICING_URL",
    "QM_INVOICING_API_KEY",
    "QM_INVOICING_SIGNING_SECRET",
    "QM_SHOP_URL",
    "QM_SHOP_API_KEY",
    "QM_SHOP_SIGNING_SECRET",
    "QM_NOTIFY_URL",
    "QM_NOTIFY_API_KEY",
    "QM_NOTIFY_SIGNING_SECRET",
    "QM_PARTNER_TIMEOUT_S",
    "QM_PARTNER_CONNECT_TIMEOUT_S",
    "QM_LIVE_QUEUE_SIZE",
    "QM_LIVE_MAX_SUBSCRIPTIONS",
    "QM_LIVE_INIT_TIMEOUT_S",
    "QM_GC_FREEZE_S",
    "QM_GC_SWEEP_S",
    "QM_TEST_DATABASE_URL",
    "QM_TEST_REDIS_URL",
    "QM_REQUIRE_AUDIT",
)
