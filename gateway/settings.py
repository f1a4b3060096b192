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
    """The gateway's configuration. See the README's table for each variable."""

    #: Where ``gateway up`` keeps the SQLite file, the embedded Redis and artifacts.
    data_dir: Path = Path("data")
    #: SQLAlchemy URL of the database (default: SQLite under DATA_DIR; async driver).
    database_url: str = ""
    #: Interface ``gateway web`` listens on (``0.0.0.0``: every interface, as
    #: a platform or a container needs).
    host: str = "127.0.0.1"
    #: ``gateway web`` migrates the database before it serves (else it refuses
    #: to start on a database behind its code, and says to run ``gateway migrate``).
    migrate_on_start: bool = False
    #: Number of uvicorn worker processes for ``gateway web``.
    web_concurrency: int = Field(default=1, ge=1)
    #: Seconds a request may take to send its headers (then 408, closed).
    web_header_timeout: float = Field(default=5.0, gt=0)
    #: Connections one web process keeps open at most; more get 503 at once.
    web_max_connections: int = Field(default=2000, ge=1)
    #: Maximum age of a signed worker request, in seconds.
    event_max_age: int = Field(default=300, ge=1)
    #: Largest request body the public API accepts.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: Seconds before each attempt: the first at once, then the retries.
    webhook_retry_schedule: Schedule = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    #: Each retry delay is moved by up to this fraction either way.
    webhook_retry_jitter: float = Field(default=0.2, ge=0)
    #: The longest ``Retry-After`` a receiver can ask for, in seconds.
    webhook_retry_after_max: float = Field(default=3600.0, ge=0)
    #: An endpoint failing without any success for this long is disabled.
    webhook_disable_after: float = Field(default=5 * 24 * 3600.0, ge=0)
    #: How long a rotated-out secret keeps signing beside the new one.
    webhook_rotation_grace: float = Field(default=24 * 3600.0, ge=0)
    #: Where artifacts (cropped images) are kept: ``local`` (files under
    #: ARTIFACT_DIR, for one gateway host) or ``database`` (the database of
    #: record, which every gateway host shares). Default: ``database`` on
    #: PostgreSQL, ``local`` on SQLite.
    artifact_store: Literal["local", "database"] | None = None
    #: Where local artifacts are kept; default ``DATA_DIR/artifacts``.
    artifact_dir: Path | None = None
    #: How long a signed artifact link stays valid, in seconds.
    artifact_url_ttl: int = Field(default=7 * 24 * 3600, ge=1)
    #: The largest artifact a worker may store.
    max_artifact_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    #: The base of links handed to clients (artifact URLs); default
    #: ``https://$SITE_ADDRESS`` when that names a host, else GATEWAY_URL.
    public_url: str = ""
    #: The address the reverse proxy serves (compose.yaml's Caddy: a domain
    #: it gets a certificate for, or ``:80``); it gives PUBLIC_URL's default.
    site_address: str = ""
    #: How long a run's public access token stays valid, in seconds.
    public_token_ttl: int = Field(default=3600, ge=1)
    #: Origins a browser may call the API from (CORS); empty: none.
    cors_origins: Names = ()
    #: How long a dashboard sign-in lasts, in seconds.
    dashboard_session_max_age: int = Field(default=12 * 3600, ge=60)
    #: Requests per second per API key (a token bucket in Redis); 0: no limit.
    rate_limit: float = Field(default=0.0, ge=0)
    rate_burst: int = Field(default=0, ge=0, validation_alias="RATE_LIMIT_BURST")
    #: An EXECUTING attempt silent this long is lost (its worker died): it is
    #: retried if attempts remain, else the run fails with ``worker_lost``.
    heartbeat_timeout: float = Field(default=10.0, ge=0.1)
    #: Seconds between two passes of the scheduler (delays, retries, TTLs).
    scheduler_interval: float = Field(default=0.2, ge=0.01)
    #: Seconds between two passes of the reconciler.
    reconcile_interval: float = Field(default=15.0, ge=0.1)
    #: A QUEUED run or due delivery older than this with no job is re-queued.
    reconcile_grace: float = Field(default=30.0, ge=0)
    #: A bearer token ``GET /metrics`` requires; unset: /metrics is open.
    metrics_token: str | None = None

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
