"""The client side of the ``gateway`` command: ``trigger``, ``runs`` and ``webhooks``.

They talk to a gateway over HTTP with ``GATEWAY_URL`` (default
``http://127.0.0.1:$PORT``, as the server listens) and ``GATEWAY_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.client import Client, GatewayError, default_url

__all__ = ["add_commands", "run_command"]


def _json_arg(value: str) -> Any:
    """``@file.json``, ``-`` (stdin) or inline JSON."""
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        text = Path(value[1:]).read_text()
    else:
        text = value
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def add_commands(sub: Any) -> None:
    trigger = sub.add_parser("trigger", help="trigger a run (GATEWAY_URL, GATEWAY_API_KEY)")
    trigger.add_argument("task")
    trigger.add_argument(
        "--payload", type=_json_arg, default=None, help="JSON, @file.json, or - for stdin"
    )
    trigger.add_argument(
        "--wait",
        action="store_true",
        help="show the status live until the run is final, then the run",
    )
    trigger.add_argument("--idempotency-key")
    trigger.add_argument("--delay", help="seconds, 10m, or an ISO-8601 time")
    trigger.add_argument("--tag", action="append", dest="tags")

    runs = sub.add_parser("runs", help="list, show, cancel or replay runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_sub.add_parser("list", help="newest first")
    listing.add_argument("--status")
    listing.add_argument("--task")
    listing.add_argument("--tag")
    listing.add_argument("--limit", type=int, default=20)
    for name in ("get", "cancel", "replay"):
        runs_sub.add_parser(name).add_argument("run_id")

    hooks = sub.add_parser("webhooks", help="add, list or remove callback endpoints")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    add = hooks_sub.add_parser("add")
    add.add_argument("url")
    add.add_argument("--event", action="append", dest="events")
    add.add_argument("--task", action="append", dest="tasks")
    add.add_argument("--description", default="")
    hooks_sub.add_parser("list")
    hooks_sub.add_parser("rm").add_argument("endpoint_id")
    deliveries = hooks_sub.add_parser("deliveries", help="an endpoint's messages, newest first")
    deliveries.add_argument("endpoint_id")
    deliveries.add_argument("--limit", type=int, default=20)
    recover = hooks_sub.add_parser(
        "recover", help="send again the messages since a time that failed (or still wait)"
    )
    recover.add_argument("endpoint_id")
    recover.add_argument("--since", required=True, help="an ISO-8601 time")
    recover.add_argument(
        "--include-pending",
        action="store_true",
        help="also the messages still waiting for a retry (after fixing the receiver)",
    )


def _print(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


def _trigger(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    run = client.trigger(
        args.task,
        args.payload,
        idempotency_key=args.idempotency_key,
        delay=args.delay,
        tags=args.tags,
    )
    if not args.wait:
        _print(run, out)
        return 0
    err.write(f"{run['id']}  {run['status']}")
    err.flush()
    for event in client.stream(run["id"]):
        err.write(f"\r{run['id']}  {event['status']:<10}")
        err.flush()
    err.write("\n")
    final = client.get_run(run["id"])
    _print(final, out)
    return 0 if final["status"] == "COMPLETED" else 1


def _runs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.runs_command == "list":
        filters = {"status": args.status, "task": args.task, "tag": args.tag}
        for n, run in enumerate(client.list_runs(limit=min(args.limit, 100), **filters)):
            if n >= args.limit:
                break
            out.write(f"{run['id']}  {run['status']:<10} {run['task']:<20} {run['created_at']}\n")
        return 0
    action = {"get": client.get_run, "cancel": client.cancel, "replay": client.replay}
    _print(action[args.runs_command](args.run_id), out)
    return 0


def _webhooks(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.webhooks_command == "add":
        _print(
            client.create_webhook(
                args.url, events=args.events, tasks=args.tasks, description=args.description
            ),
            out,
        )
    elif args.webhooks_command == "list":
        for endpoint in client.list_webhooks()["data"]:
            state = (
                "enabled" if endpoint["enabled"] else f"disabled ({endpoint['disabled_reason']})"
            )
            out.write(
                f"{endpoint['id']}  {endpoint['url']}  {','.join(endpoint['events'])}  {state}\n"
            )
    elif args.webhooks_command == "deliveries":
        for n, message in enumerate(client.iter_webhook_deliveries(args.endpoint_id)):
            if n >= args.limit:
                break
            out.write(
                f"{message['id']}  {message['status']:<9} {message['event_type']:<16} "
                f"attempts {message['attempt_count']}  {message['created_at']}\n"
            )
    elif args.webhooks_command == "recover":
        _print(
            client.recover_webhook(
                args.endpoint_id, args.since, include_pending=args.include_pending
            ),
            out,
        )
    else:
        client.delete_webhook(args.endpoint_id)
        out.write(f"deleted {args.endpoint_id}\n")
    return 0


def run_command(
    args: argparse.Namespace, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run a client command; every failure is one line on ``err`` (and the
    fields at fault, for a 422) and exit code 1."""
    url = default_url()
    if not os.environ.get("GATEWAY_API_KEY", "").strip():
        err.write(
            "gateway: GATEWAY_API_KEY is not set: export the API key (`gateway up` prints "
            "a dev key; `gateway keys create NAME` makes one)\n"
        )
        return 1
    try:
        with Client(url) as client:
            if args.command == "trigger":
                return _trigger(client, args, out, err)
            if args.command == "runs":
                return _runs(client, args, out)
            return _webhooks(client, args, out)
    except GatewayError as exc:
        err.write(f"gateway: {exc}\n")
        for detail in exc.details:
            err.write(f"  {detail.get('path')}: {detail.get('message')}\n")
        return 1
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        reason = str(exc) or type(exc).__name__
        err.write(f"gateway: cannot reach the gateway at {url} (GATEWAY_URL): {reason}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\n")
        return 130
