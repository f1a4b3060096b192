"""Every setting of the gateway, read from the environment once (pydantic-settings).

The gateway reads what a worker reads (``jobs.settings``) and its own. The rest
of the code takes a :class:`Settings` object and never reads ``os.environ``
itself, so a test can build one by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import NoDecode

from jobs import settings as worker_settings
from jobs.settings import ConfigError, Names, comma_list

__all__ = ["ConfigError", "Settings", "normalize_database_url"]


def normalize_database_url(url: str) -> str:
    """Map plain SQLAlchemy URLs onto the async drivers we ship.

    ``sqlite:///x.db`` becomes ``sqlite+aiosqlite:///x.db`` and
    ``postgres://`` / ``postgresql://`` become ``postgresql+asyncpg://``, so the
    URL a platform hands out works unchanged.
    """
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def _schedule(value: Any) -> Any:
    value = comma_list(value)
    if isinstance(value, tuple) and (not value or any(float(v) < 0 for v in value)):
        raise ValueError("needs at least one delay, none negative")
    return value


Schedule = Annotated[tuple[float, ...], NoDecode, BeforeValidator(_schedule)]


def _site_url(site_address: str) -> str | None:
    """The URL clients reach a proxy's site at: ``https://`` a domain (the
    proxy gets its certificate), ``http://`` localhost, ``None`` for an
    address that names no host (``:80``)."""
    address = site_address.strip().split(",")[0].strip()
    if "://" in address:
        return address
    host = address.split(":")[0]
    if not host:
        return None
    if host in ("localhost", "127.0.0.1"):
        return f"http://{address}"
    return f"https://{address}"


class Settings(worker_settings.Settings):
    """The gateway's configuration: a worker's and its own. Each field's docstring is
    its variable's documentation (docs/configuration.md is made from them)."""

    data_dir: Path = Path("data")
    """Where ``gateway up`` keeps the SQLite file, the embedded Redis (``redis/``),
    the dev key and the generated secret."""
    database_url: str = ""
    """SQLite (WAL) or PostgreSQL (``postgresql://…``, run on asyncpg); the same
    migrations serve both. Default: ``sqlite:///$DATA_DIR/gateway.db``. Takes libpq's
    ``sslmode`` and ``sslrootcert``, and ``pgbouncer=true`` behind PgBouncer in
    transaction pooling (docs/operations.md#connections)."""
    database_pool_size: int = Field(default=20, ge=2)
    """PostgreSQL: connections each web process and each ``gateway dispatch``
    keeps open, with up to ten more opened for a burst and closed after. The
    default holds every group-commit writer and every read at once; several
    hosts on one server, or a small ``max_connections``, take fewer (a unit of
    work then waits its turn for a connection)."""
    host: str = "127.0.0.1"
    """The interface ``gateway web`` listens on (``--host`` too). A platform or a
    container needs ``0.0.0.0``, as the Procfile and the image set."""
    migrate_on_start: bool = False
    """``gateway web`` migrates the database before it serves. Off, it refuses a
    database behind its code and says to run ``gateway migrate``."""
    web_concurrency: int = Field(default=1, ge=1)
    """uvicorn worker processes per ``gateway web``."""
    web_header_timeout: float = Field(default=5.0, gt=0)
    """Seconds a new connection's first request may take to send its headers; then
    it gets 408 and is closed."""
    web_max_connections: int = Field(default=2000, ge=1)
    """Connections one web process keeps open; more get 503 at once."""
    event_max_age: int = Field(default=300, ge=1)
    """Seconds a signed worker request stays valid."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """The largest request body the API accepts (413 ``payload_too_large``)."""
    webhook_retry_schedule: Schedule = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    """Comma-separated seconds before each callback attempt: the first, then each
    retry."""
    webhook_retry_jitter: float = Field(default=0.2, ge=0)
    """Each retry delay moves by up to this fraction either way."""
    webhook_retry_after_max: float = Field(default=3600.0, ge=0)
    """The longest ``Retry-After`` of a receiver that is honoured, in seconds."""
    webhook_disable_after: float = Field(default=5 * 24 * 3600.0, ge=0)
    """Seconds an endpoint may fail without a single success before it is disabled
    (5 days)."""
    webhook_dispatcher: bool = True
    """Callbacks leave from ``gateway dispatch``, a process that holds the database
    (as Svix's dispatcher does): the gateway hands each first attempt over in
    Redis, the dispatcher sends it and records it in batches, and retries are
    read from the database when due. ``gateway up`` starts one. Off: each
    attempt is an arq job on the workers' deliveries queue, reported back to the
    gateway (no dispatcher process to run)."""
    webhook_receiver_concurrency: int = Field(default=10, ge=1)
    """``gateway dispatch``: attempts in flight to one receiver (an endpoint, or a
    callback URL) at most, so a slow one never takes every slot of
    ``WEBHOOK_CONCURRENCY``."""
    webhook_dispatch_buffer_mb: float = Field(default=64.0, gt=0)
    """``gateway dispatch``: megabytes of callback bodies held waiting for their
    receiver's turn, at most. A receiver with more than a quarter of it (or of
    the count held, ``20 * WEBHOOK_CONCURRENCY`` and at least 4,000) waiting
    gets the rest given back to the database, due again a second later, so
    one slow receiver's backlog never keeps the others' callbacks waiting."""
    webhook_rotation_grace: float = Field(default=24 * 3600.0, ge=0)
    """Seconds a rotated-out endpoint secret keeps signing beside the new one."""
    artifact_store: Literal["local", "database"] | None = None
    """Where artifacts (cropped images) are kept: ``database`` (a table in the
    database of record, which every gateway host reads) or ``local`` (files under
    ``ARTIFACT_DIR``, for one gateway host). Default: ``database`` on PostgreSQL,
    ``local`` on SQLite."""
    artifact_dir: Path | None = None
    """Where ``local`` artifacts are kept. Default: ``$DATA_DIR/artifacts``."""
    artifact_url_ttl: int = Field(default=7 * 24 * 3600, ge=1)
    """Seconds a signed artifact link works (7 days)."""
    max_artifact_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    """The largest artifact a worker may store."""
    public_url: str = ""
    """The base of links handed to clients (artifact URLs). Default:
    ``https://$SITE_ADDRESS`` when that names a host, else ``GATEWAY_URL``."""
    site_address: str = ""
    """The address the reverse proxy serves (``compose.yaml``'s Caddy: a domain it
    gets a certificate for); when it names a domain, links default to ``https://``
    it (``localhost``: ``http://localhost``)."""
    public_token_ttl: int = Field(default=3600, ge=1)
    """Seconds a run's ``public_access_token`` works."""
    cors_origins: Names = ()
    """Comma-separated origins a browser may call the API from (CORS); empty:
    none."""
    dashboard_session_max_age: int = Field(default=12 * 3600, ge=60)
    """Seconds a dashboard sign-in lasts (12 h)."""
    rate_limit: float = Field(default=0.0, ge=0)
    """Requests per second per API key (a token bucket in Redis); 0: no limit. A
    key's own limit (``gateway keys create --rate-limit``) wins."""
    rate_burst: int = Field(default=0, ge=0, validation_alias="RATE_LIMIT_BURST")
    """The bucket's size; 0: the rate."""
    heartbeat_timeout: float = Field(default=10.0, ge=0.1)
    """Seconds an attempt's heartbeats may be silent before it is failed as
    ``worker_lost`` and retried (judged every fifth of it: a killed worker's runs
    start again within about 12 s)."""
    worker_forget_after: float = Field(default=3600.0, ge=0)
    """Seconds a lost or stopped worker stays in ``GET /api/v1/workers`` and the
    dashboard's workers page."""
    scheduler_interval: float = Field(default=0.2, ge=0.01)
    """Seconds between scheduler passes (starts due DELAYED and RETRYING runs,
    expires runs past their TTL, makes schedules' runs)."""
    reconcile_interval: float = Field(default=15.0, ge=0.1)
    """Seconds between reconciler passes (one gateway process does each pass)."""
    reconcile_grace: float = Field(default=30.0, ge=0)
    """A QUEUED run or a due delivery this many seconds old whose arq job is gone is
    queued again."""
    metrics_token: str | None = None
    """When set, ``GET /metrics`` needs ``Authorization: Bearer <METRICS_TOKEN>``;
    unset, it is open (for a scraper on a private network)."""

    @model_validator(mode="after")
    def _gateway_derived(self) -> Self:
        database_url = normalize_database_url(
            self.database_url or f"sqlite:///{self.data_dir / 'gateway.db'}"
        )
        derived = {
            "database_url": database_url,
            "artifact_dir": self.artifact_dir or self.data_dir / "artifacts",
            "artifact_store": self.artifact_store
            or ("local" if database_url.startswith("sqlite") else "database"),
            "public_url": (
                self.public_url or _site_url(self.site_address) or self.gateway_url
            ).rstrip("/"),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        return self

    @property
    def artifact_path(self) -> Path:
        """Where artifacts are kept (``ARTIFACT_DIR``, default ``DATA_DIR/artifacts``)."""
        return self.artifact_dir or self.data_dir / "artifacts"
