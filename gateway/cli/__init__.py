"""The ``gateway`` command: ``up``, ``web``, ``worker``, ``migrate``, ``keys``,
``backup`` and ``restore`` run the gateway; ``trigger``, ``runs``, ``queues``,
``schedules``, ``waitpoints`` and ``webhooks`` talk to one (``gateway.client.cli``).

The client's commands need only the client (httpx): the server's are loaded
when one of them runs, and say which extra to install when they cannot be.

As ``uvicorn`` and ``arq`` do, the command puts the folder it runs in on the
import path, so ``TASK_MODULES=my_tasks gateway worker`` finds ``./my_tasks.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def _check_schema(settings: Settings) -> None:
    """Migrate (``MIGRATE_ON_START``), or refuse a database behind this code:
    a gateway on an unmigrated database would answer 500 to every call. A
    database that does not answer yet is checked once it does (``gateway.schema``)."""
    from db.engine import Database
    from db.migrate import SchemaState, schema_state, upgrade
    from jobs.settings import ConfigError

    where = _safe_url(settings.database_url)

    async def state() -> SchemaState:
        db = Database(settings.database_url)
        try:
            return await schema_state(db)
        finally:
            await db.dispose()

    if settings.migrate_on_start:
        try:
            upgrade(settings.database_url)
        except Exception as exc:  # the platform starts the process again
            raise ConfigError(
                "MIGRATE_ON_START", f"the migration of {where} failed: {type(exc).__name__}: {exc}"
            ) from None
    try:
        found = asyncio.run(state())
    except Exception as exc:
        print(
            f"gateway: the database at {where} does not answer yet ({type(exc).__name__}: "
            f"{exc}); starting anyway: /readyz and the API answer 503 until it does",
            file=sys.stderr,
        )
        return
    problem = found.problem()
    if problem:
        raise ConfigError("DATABASE_URL", f"{problem} (or set MIGRATE_ON_START=1): {where}")
    if found.unknown:
        print(
            f"gateway: warning: the database is at revision {', '.join(sorted(found.unknown))}, "
            "newer than this release knows; a newer release migrated it",
            file=sys.stderr,
        )


def _load_tasks(settings: Settings) -> None:
    """Import TASK_MODULES now: a module that is not there is one clear line."""
    from jobs.tasks.registry import load_tasks

    load_tasks(settings.task_modules)


def _web(settings: Settings) -> int:
    import uvicorn

    settings.require_secret()
    _load_tasks(settings)
    _check_schema(settings)
    if settings.web_concurrency > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes: each writes its metrics to files that a scrape sums.
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    from gateway.http_protocol import GuardedHttpProtocol

    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        http=GuardedHttpProtocol,
        host=settings.host,
        port=settings.port,
        workers=settings.web_concurrency,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level == "DEBUG",
        server_header=False,
        log_config=None,
    )
    return 0


def _dispatch(settings: Settings) -> int:
    from gateway.background.dispatcher import run_dispatcher
    from gateway.logs import configure_logging
    from jobs.settings import ConfigError

    configure_logging(settings)
    if not settings.redis_url:
        raise ConfigError("REDIS_URL", "the dispatcher needs the Redis URL the gateway uses")
    run_dispatcher(settings)
    return 0


def _worker(settings: Settings) -> int:
    from gateway.logs import configure_logging
    from jobs.settings import ConfigError
    from jobs.worker import run_workers

    configure_logging(settings)
    settings.require_secret()
    if not settings.redis_url:
        raise ConfigError("REDIS_URL", "the worker needs the Redis URL the gateway uses")
    _load_tasks(settings)
    run_workers(settings)
    return 0


def _backup_or_restore(settings: Settings, args: argparse.Namespace) -> int:
    import json
    import subprocess
    from pathlib import Path

    from gateway.cli.backup import backup, restore

    try:
        if args.command == "backup":
            result = backup(settings, Path(args.path))
        else:
            result = restore(settings, Path(args.path), force=args.force)
    except subprocess.CalledProcessError as exc:  # pg_dump / pg_restore said why
        print(f"gateway: {Path(exc.cmd[0]).name} failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _up(settings: Settings) -> int:
    from gateway.cli.supervisor import up

    return up(settings)


def _duration(value: str) -> float:
    """``90``, ``90s``, ``10m``, ``24h`` or ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration (90, 10m, 24h, 7d)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return seconds


def _add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list, revoke or rotate API keys")
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
    listing = keys_sub.add_parser("list", help="every key: ID, project, prefix, state")
    listing.add_argument("--project", help="only this project's keys (its name or ID)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (its ID, or the key itself)")
    revoke.add_argument("key", metavar="KEY_ID")
    revoke.add_argument(
        "--grace",
        type=_duration,
        default=0.0,
        help="keep it working this long first (90, 10m, 24h; default: revoke now)",
    )
    rotate = keys_sub.add_parser(
        "rotate", help="a new key for the same project; the old one is revoked (after --grace)"
    )
    rotate.add_argument("key", metavar="KEY_ID")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=0.0,
        help="the old key keeps working this long, while you deploy the new one",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A webhook-driven async job gateway. Settings come from the environment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "up",
        help="migrate, start Redis if REDIS_URL is unset, run web + worker + dispatch",
    )
    web = sub.add_parser("web", help="serve the HTTP API on HOST:PORT")
    web.add_argument("--host", help="the interface to listen on (default: HOST, 127.0.0.1)")
    web.add_argument("--port", type=int, help="the port (default: PORT, 8000)")
    sub.add_parser("worker", help="run an arq worker")
    sub.add_parser(
        "dispatch", help="send callbacks from the database (with WEBHOOK_DISPATCHER=true)"
    )
    sub.add_parser("migrate", help="bring the database schema up to date")
    _add_keys(sub)
    saved = sub.add_parser(
        "backup", help="copy the database and the artifacts into a new folder, while running"
    )
    saved.add_argument("path", help="the folder to create (it must not exist or be empty)")
    put_back = sub.add_parser(
        "restore", help="put a backup into DATABASE_URL and ARTIFACT_DIR, then migrate"
    )
    put_back.add_argument("path", help="a folder made by `gateway backup`")
    put_back.add_argument(
        "--force", action="store_true", help="replace a database that already has tables"
    )
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


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("trigger", "runs", "queues", "schedules", "waitpoints", "webhooks"):
        return run_command(args)
    _cwd_on_path()
    if args.command == "web":
        # As if set in the environment, which the app (in every uvicorn
        # process) reads its settings from.
        for name, value in (("HOST", args.host), ("PORT", args.port)):
            if value is not None:
                os.environ[name] = str(value)
    try:
        settings = _server_settings()
        if args.command in ("web", "worker", "dispatch"):
            from gateway.cli.supervisor import watch_supervisor

            watch_supervisor()  # under `gateway up`: stop when it is gone
        if args.command == "up":
            return _up(settings)
        if args.command == "web":
            return _web(settings)
        if args.command == "worker":
            return _worker(settings)
        if args.command == "dispatch":
            return _dispatch(settings)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command in ("backup", "restore"):
            return _backup_or_restore(settings, args)
        if args.command == "keys":
            from gateway.cli.keys import keys_command

            return keys_command(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from jobs.settings import ConfigError  # loaded by then: a server command ran

        if not isinstance(exc, ConfigError):
            raise
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1
