"""The ``gateway`` command: ``up``, ``web``, ``worker``, ``migrate`` and ``keys`` run
the gateway; ``trigger``, ``runs`` and ``webhooks`` talk to one (``gateway.client.cli``).

The client's commands need only the client (httpx): the server's are loaded
when one of them runs, and say which extra to install when they cannot be.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.client.cli import add_commands, run_command

if TYPE_CHECKING:  # the server's commands load the server only when they run
    from gateway.settings import Settings

__all__ = ["main"]


def _migrate(settings: Settings) -> int:
    from db.migrate import upgrade

    upgrade(settings.database_url)
    print(f"database at head: {_safe_url(settings.database_url)}")
    return 0


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def _keys_create(
    settings: Settings, name: str, rate_limit: float | None = None, burst: int | None = None
) -> int:
    from db.engine import Database
    from gateway.auth.keys import create_api_key

    async def create() -> tuple[str, str]:
        db = Database(settings.database_url)
        try:
            return await create_api_key(db, name, rate_limit=rate_limit, rate_burst=burst)
        finally:
            await db.dispose()

    project_id, key = asyncio.run(create())
    print(f"project {name!r} ({project_id})")
    print("new API key (shown once; only its hash is stored):")
    print(key)
    return 0


def _web(settings: Settings) -> int:
    import uvicorn

    settings.require_secret()
    if settings.web_concurrency > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes: each writes its metrics to files that a scrape sums.
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.web_concurrency,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level == "DEBUG",
        server_header=False,
        log_config=None,
    )
    return 0


def _worker(settings: Settings) -> int:
    from gateway.logs import configure_logging
    from jobs.settings import ConfigError
    from jobs.worker import run_workers

    configure_logging(settings)
    settings.require_secret()
    if not settings.redis_url:
        raise ConfigError("REDIS_URL", "the worker needs the Redis URL the gateway uses")
    run_workers(settings)
    return 0


def _up(settings: Settings) -> int:
    from gateway.cli.supervisor import up

    return up(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A webhook-driven async job gateway. Settings come from the environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="migrate, start Redis if REDIS_URL is unset, run web + worker")
    sub.add_parser("web", help="serve the HTTP API on HOST:PORT")
    sub.add_parser("worker", help="run an arq worker")
    sub.add_parser("migrate", help="bring the database schema up to date")
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a project (if new) and an API key for it")
    create.add_argument("name", help="the project's name")
    create.add_argument(
        "--rate-limit",
        type=float,
        metavar="PER_SECOND",
        help="requests per second for this key (default: RATE_LIMIT)",
    )
    create.add_argument("--burst", type=int, help="the bucket's size (default: the rate)")
    add_commands(sub)
    return parser


#: The package's extra that brings the server's dependencies.
SERVER_EXTRA = "webhook-job-gateway[server]"


def _server_settings() -> Settings:
    """The settings of a server command; a clear line if the server's
    dependencies are not installed (the client alone needs only httpx)."""
    try:
        from gateway.settings import Settings
    except ImportError as exc:
        raise SystemExit(
            f"gateway: this command runs the server, whose dependencies are not installed "
            f"({exc.name}): pip install '{SERVER_EXTRA}'"
        ) from None
    return Settings.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("trigger", "runs", "webhooks"):
        return run_command(args)
    try:
        settings = _server_settings()
        if args.command == "up":
            return _up(settings)
        if args.command == "web":
            return _web(settings)
        if args.command == "worker":
            return _worker(settings)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "keys":
            return _keys_create(settings, args.name, args.rate_limit, args.burst)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from jobs.settings import ConfigError  # loaded by then: a server command ran

        if not isinstance(exc, ConfigError):
            raise
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1
