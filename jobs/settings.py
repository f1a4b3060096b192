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


#: Comma-separated in the environment, a tuple in the code.
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(comma_list)]
Networks = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_networks)]


class _MappingSource(EnvSettingsSource):
    """The environment source, reading a mapping of our choice instead of
    ``os.environ`` (so :meth:`Settings.from_env` can take one)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls, case_sensitive=False, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._env.items() if value != ""}


class Settings(BaseSettings):
    """What a worker reads. See the README's table for each variable."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", validate_default=True, populate_by_name=True
    )

    #: Redis URL; ``None`` means "start the embedded one" for ``gateway up``.
    redis_url: str | None = None
    #: The port ``gateway web`` listens on; the default GATEWAY_URL follows it.
    port: int = Field(default=8000, ge=0, le=65535)
    #: Base URL the worker reports to (default ``http://127.0.0.1:$PORT``).
    gateway_url: str = ""
    #: Shared secret for worker → gateway requests (itsdangerous).
    secret_key: str = Field(default="", validation_alias="GATEWAY_SECRET_KEY")
    #: Largest task output a worker may report; larger ones fail the run.
    max_output_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: arq queue the gateway enqueues on and the worker reads.
    queue_name: str = "gateway:queue"
    #: Jobs one worker process runs at a time. A slot is an asyncio task, held
    #: while its run executes and while its reports travel to the gateway, so
    #: for the I/O-bound work this gateway runs many are cheap: with arq's 10,
    #: a worker drained no-op runs at a third of the rate it does with 100
    #: (bench/run.py). CPU-bound tasks (a plain ``def``) run in threads.
    worker_concurrency: int = Field(default=100, ge=1)
    #: Callback attempts one worker process sends at once (their own arq
    #: queue and slots, apart from task runs).
    webhook_concurrency: int = Field(default=50, ge=1)
    #: Seconds between two polls of the queue by an idle worker.
    worker_poll_delay: float = Field(default=0.05, ge=0.001)
    #: Seconds one task attempt may run before arq stops it.
    job_timeout: int = Field(default=3600, ge=1)
    #: Extra modules whose ``@task`` functions join the registry.
    task_modules: Names = ()
    #: Networks callbacks and image downloads may reach although they are not
    #: public (CIDRs).
    webhook_allowed_networks: Networks = ()
    #: Seconds one callback attempt may take in all: connect, send, headers, body.
    webhook_timeout: float = Field(default=15.0, ge=0.1)
    #: The largest image a task downloads or decodes.
    image_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    image_max_pixels: int = Field(default=50_000_000, ge=1)
    #: Seconds an image download may take in all (connect, headers and body).
    image_download_timeout: float = Field(default=30.0, ge=0.1)
    #: Gemini: the key (GEMINI_API_KEY or GOOGLE_API_KEY) and an optional endpoint.
    gemini_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY")
    )
    gemini_base_url: str | None = None
    #: Tries of a provider call that answered 429 or 5xx before the run fails.
    llm_max_retries: int = Field(default=3, ge=0)
    #: Seconds between two heartbeats of a running attempt.
    heartbeat_interval: float = Field(default=2.0, ge=0.05)
    #: Seconds a stopping worker lets running jobs finish before re-queueing them.
    worker_shutdown_grace: int = Field(default=30, ge=0)
    #: Log lines a run keeps (``ctx.logger``); past it one line counts the
    #: rest. A worker ships no more than this of an attempt's lines.
    run_log_max_lines: int = Field(default=5000, ge=1)
    #: ``text`` (readable lines) or ``json`` (one object per line).
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

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

    @property
    def delivery_queue_name(self) -> str:
        """The arq queue of callback attempts: slots of their own, so slow
        receivers never hold up task runs, nor a burst of runs the callbacks."""
        return f"{self.queue_name}:deliveries"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked as the environment's values are)."""
        return type(self).model_validate({**self.model_dump(), **changes})
