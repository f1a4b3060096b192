"""Every setting of the gateway and its worker, read from the environment once.

The rest of the code takes a :class:`Settings` object and never reads
``os.environ`` itself, so a test can build one by hand.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ConfigError", "Settings", "normalize_database_url"]


class ConfigError(Exception):
    """A setting is missing or malformed.

    :param name: the environment variable at fault
    :param message: what is wrong with it and how to fix it
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


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


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    values = _list(env, name)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not a network (e.g. 127.0.0.0/8)") from None
    return values


def _schedule(env: Mapping[str, str], name: str) -> tuple[float, ...]:
    raw = env.get(name)
    if not raw:
        return (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ConfigError(name, f"expected seconds separated by commas, got {raw!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(name, "needs at least one delay, none negative")
    return values


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The gateway's configuration. See the README's table for each variable."""

    #: Where ``gateway up`` keeps the SQLite file, the embedded Redis and artifacts.
    data_dir: Path = Path("data")
    #: SQLAlchemy URL of the database (async driver).
    database_url: str = "sqlite+aiosqlite:///data/gateway.db"
    #: Redis URL; ``None`` means "start the embedded one" for ``gateway up``.
    redis_url: str | None = None
    #: Interface and port the web process listens on.
    host: str = "127.0.0.1"
    port: int = 8000
    #: Number of uvicorn worker processes for ``gateway web``.
    web_concurrency: int = 1
    #: Base URL the worker reports to.
    gateway_url: str = "http://127.0.0.1:8000"
    #: Shared secret for worker → gateway events (itsdangerous).
    secret_key: str = ""
    #: Maximum age of a signed worker event, in seconds.
    event_max_age: int = 300
    #: Largest request body the public API accepts.
    max_body_bytes: int = 1024 * 1024
    #: Largest task output a worker may report; larger ones fail the run.
    max_output_bytes: int = 4 * 1024 * 1024
    #: arq queue the gateway enqueues on and the worker reads.
    queue_name: str = "gateway:queue"
    #: Jobs one worker process runs at a time.
    worker_concurrency: int = 10
    #: Seconds between two polls of the queue by an idle worker.
    worker_poll_delay: float = 0.05
    #: Seconds one task attempt may run before arq stops it.
    job_timeout: int = 3600
    #: Extra modules whose ``@task`` functions join the registry.
    task_modules: tuple[str, ...] = ()
    #: Networks callbacks may reach although they are not public (CIDRs).
    webhook_allowed_networks: tuple[str, ...] = ()
    #: Seconds one attempt may take in all: connect, send, headers and body.
    webhook_timeout: float = 15.0
    #: Callback attempts one worker process sends at once (their own arq
    #: queue and slots, apart from task runs).
    webhook_concurrency: int = 50
    #: Seconds before each attempt: the first at once, then the retries.
    webhook_retry_schedule: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    #: Each retry delay is moved by up to this fraction either way.
    webhook_retry_jitter: float = 0.2
    #: The longest ``Retry-After`` a receiver can ask for, in seconds.
    webhook_retry_after_max: float = 3600.0
    #: An endpoint failing without any success for this long is disabled.
    webhook_disable_after: float = 5 * 24 * 3600.0
    #: How long a rotated-out secret keeps signing beside the new one.
    webhook_rotation_grace: float = 24 * 3600.0
    #: Where artifacts (cropped images) are kept; default ``DATA_DIR/artifacts``.
    artifact_dir: Path = Path("data/artifacts")
    #: How long a signed artifact link stays valid, in seconds.
    artifact_url_ttl: int = 7 * 24 * 3600
    #: The largest artifact a worker may store.
    max_artifact_bytes: int = 50 * 1024 * 1024
    #: The base of links handed to clients (artifact URLs); default GATEWAY_URL.
    public_url: str = "http://127.0.0.1:8000"
    #: The largest image a task downloads or decodes.
    image_max_bytes: int = 20 * 1024 * 1024
    image_max_pixels: int = 50_000_000
    #: Seconds an image download may take in all (connect, headers and body).
    image_download_timeout: float = 30.0
    #: Gemini: the key (GEMINI_API_KEY or GOOGLE_API_KEY) and an optional endpoint.
    gemini_api_key: str | None = None
    gemini_base_url: str | None = None
    #: Tries of a provider call that answered 429 or 5xx before the run fails.
    llm_max_retries: int = 3
    #: How long a run's public access token stays valid, in seconds.
    public_token_ttl: int = 3600
    #: Origins a browser may call the API from (CORS); empty: none.
    cors_origins: tuple[str, ...] = ()
    #: How long a dashboard sign-in lasts, in seconds.
    dashboard_session_max_age: int = 12 * 3600
    #: Requests per second per API key (a token bucket in Redis); 0: no limit.
    rate_limit: float = 0.0
    rate_burst: int = 0
    #: Seconds between two heartbeats of a running attempt.
    heartbeat_interval: float = 10.0
    #: An EXECUTING attempt silent this long is lost (its worker died): it is
    #: retried if attempts remain, else the run fails with ``worker_lost``.
    heartbeat_timeout: float = 60.0
    #: Seconds a stopping worker lets running jobs finish before re-queueing them.
    worker_shutdown_grace: int = 30
    #: Seconds between two passes of the scheduler (delays, retries, TTLs).
    scheduler_interval: float = 0.2
    #: Seconds between two passes of the reconciler.
    reconcile_interval: float = 15.0
    #: A QUEUED run or due delivery older than this with no job is re-queued.
    reconcile_grace: float = 30.0
    #: A bearer token ``GET /metrics`` requires; unset: /metrics is open.
    metrics_token: str | None = None
    #: ``text`` (readable lines) or ``json`` (one object per line).
    log_format: str = "text"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("DATA_DIR") or "data")
        port = _int(env, "PORT", 8000, minimum=0)
        database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'gateway.db'}"
        gateway_url = (env.get("GATEWAY_URL") or f"http://127.0.0.1:{port}").rstrip("/")
        log_format = (env.get("LOG_FORMAT") or "text").lower()
        if log_format not in ("text", "json"):
            raise ConfigError("LOG_FORMAT", f"expected 'text' or 'json', got {log_format!r}")
        return cls(
            data_dir=data_dir,
            database_url=normalize_database_url(database_url),
            redis_url=env.get("REDIS_URL") or None,
            host=env.get("HOST") or "127.0.0.1",
            port=port,
            web_concurrency=_int(env, "WEB_CONCURRENCY", 1, minimum=1),
            gateway_url=gateway_url,
            secret_key=env.get("GATEWAY_SECRET_KEY") or "",
            event_max_age=_int(env, "EVENT_MAX_AGE", 300, minimum=1),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
            max_output_bytes=_int(env, "MAX_OUTPUT_BYTES", 4 * 1024 * 1024, minimum=1024),
            queue_name=env.get("QUEUE_NAME") or "gateway:queue",
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", 10, minimum=1),
            worker_poll_delay=_float(env, "WORKER_POLL_DELAY", 0.05, minimum=0.001),
            job_timeout=_int(env, "JOB_TIMEOUT", 3600, minimum=1),
            task_modules=_list(env, "TASK_MODULES"),
            webhook_allowed_networks=_networks(env, "WEBHOOK_ALLOWED_NETWORKS"),
            webhook_timeout=_float(env, "WEBHOOK_TIMEOUT", 15.0, minimum=0.1),
            webhook_concurrency=_int(env, "WEBHOOK_CONCURRENCY", 50, minimum=1),
            webhook_retry_schedule=_schedule(env, "WEBHOOK_RETRY_SCHEDULE"),
            webhook_retry_jitter=_float(env, "WEBHOOK_RETRY_JITTER", 0.2),
            webhook_retry_after_max=_float(env, "WEBHOOK_RETRY_AFTER_MAX", 3600.0),
            webhook_disable_after=_float(env, "WEBHOOK_DISABLE_AFTER", 5 * 24 * 3600.0),
            webhook_rotation_grace=_float(env, "WEBHOOK_ROTATION_GRACE", 24 * 3600.0),
            artifact_dir=Path(env.get("ARTIFACT_DIR") or data_dir / "artifacts"),
            artifact_url_ttl=_int(env, "ARTIFACT_URL_TTL", 7 * 24 * 3600, minimum=1),
            max_artifact_bytes=_int(env, "MAX_ARTIFACT_BYTES", 50 * 1024 * 1024, minimum=1024),
            public_url=(env.get("PUBLIC_URL") or gateway_url).rstrip("/"),
            image_max_bytes=_int(env, "IMAGE_MAX_BYTES", 20 * 1024 * 1024, minimum=1024),
            image_max_pixels=_int(env, "IMAGE_MAX_PIXELS", 50_000_000, minimum=1),
            image_download_timeout=_float(env, "IMAGE_DOWNLOAD_TIMEOUT", 30.0, minimum=0.1),
            gemini_api_key=env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY") or None,
            gemini_base_url=env.get("GEMINI_BASE_URL") or None,
            llm_max_retries=_int(env, "LLM_MAX_RETRIES", 3),
            public_token_ttl=_int(env, "PUBLIC_TOKEN_TTL", 3600, minimum=1),
            cors_origins=_list(env, "CORS_ORIGINS"),
            dashboard_session_max_age=_int(env, "DASHBOARD_SESSION_MAX_AGE", 12 * 3600, minimum=60),
            rate_limit=_float(env, "RATE_LIMIT", 0.0),
            rate_burst=_int(env, "RATE_LIMIT_BURST", 0),
            heartbeat_interval=_float(env, "HEARTBEAT_INTERVAL", 10.0, minimum=0.05),
            heartbeat_timeout=_float(env, "HEARTBEAT_TIMEOUT", 60.0, minimum=0.1),
            worker_shutdown_grace=_int(env, "WORKER_SHUTDOWN_GRACE", 30),
            scheduler_interval=_float(env, "SCHEDULER_INTERVAL", 0.2, minimum=0.01),
            reconcile_interval=_float(env, "RECONCILE_INTERVAL", 15.0, minimum=0.1),
            reconcile_grace=_float(env, "RECONCILE_GRACE", 30.0),
            metrics_token=env.get("METRICS_TOKEN") or None,
            log_format=log_format,
            log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
        )

    @property
    def delivery_queue_name(self) -> str:
        """The arq queue of callback attempts: slots of their own, so slow
        receivers never hold up task runs, nor a burst of runs the callbacks."""
        return f"{self.queue_name}:deliveries"

    def require_secret(self) -> str:
        """The shared secret, or a :class:`ConfigError` saying how to set it."""
        if len(self.secret_key) < 16:
            raise ConfigError(
                "GATEWAY_SECRET_KEY",
                "set it to the same random string (16+ characters) for the gateway and "
                "its workers, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            )
        return self.secret_key

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
