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
from gateway.client.text import printable

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


def _limit_arg(value: str) -> int | None:
    """A queue's limit: a whole number, or ``none``."""
    raw = value.strip().lower()
    if raw == "none":
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError(f"a whole number or none, not {value!r}")
    return int(raw)


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
    trigger.add_argument("--queue", help="the queue whose limit it obeys")
    trigger.add_argument("--concurrency-key", help="the queue's limit applies per key")
    trigger.add_argument("--priority", type=int, help="seconds of head start (0-86400)")
    trigger.add_argument("--debounce-key", help="triggers with this key push one run back")
    trigger.add_argument("--debounce-delay", default="5s", help="with --debounce-key (5s)")
    trigger.add_argument("--debounce-mode", choices=("leading", "trailing"), default="leading")

    runs = sub.add_parser("runs", help="list, show, cancel or replay runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_sub.add_parser("list", help="newest first")
    listing.add_argument("--status")
    listing.add_argument("--task")
    listing.add_argument("--tag")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=int, default=20)
    for name, text in (
        ("get", "a run, with its attempts and output"),
        ("cancel", "cancel a run (and a workflow's children)"),
        ("replay", "a new run of the same task and payload"),
    ):
        runs_sub.add_parser(name, help=text).add_argument("run_id")
    for name in ("bulk-cancel", "bulk-replay"):
        bulk = runs_sub.add_parser(
            name, help=f"{name[5:]} every run a filter (or --id) selects, in the background"
        )
        bulk.add_argument("--id", action="append", dest="ids", help="a run's ID (repeat it)")
        bulk.add_argument("--status", action="append", help="a status (repeat it)")
        bulk.add_argument("--task", action="append")
        bulk.add_argument("--tag")
        bulk.add_argument("--queue")
        bulk.add_argument("--created-after", help="an ISO-8601 time")
        bulk.add_argument("--created-before", help="an ISO-8601 time")
    runs_sub.add_parser("bulk", help="a bulk action's progress").add_argument("bulk_id")

    runs_sub.add_parser("logs", help="the lines a run's task logged").add_argument("run_id")

    scheds = sub.add_parser("schedules", help="run tasks on a cron clock")
    scheds_sub = scheds.add_subparsers(dest="schedules_command", required=True, metavar="ACTION")
    scheds_sub.add_parser("list", help="the project's schedules")
    made_schedule = scheds_sub.add_parser("create", help="a schedule of a task's runs")
    made_schedule.add_argument("task")
    made_schedule.add_argument("cron", help="5 fields, or 6 with leading seconds; quote it")
    made_schedule.add_argument("--timezone", default="UTC", help="an IANA name (UTC)")
    made_schedule.add_argument(
        "--payload", type=_json_arg, default=None, help="JSON, @file.json, or - for stdin"
    )
    for name, text in (
        ("get", "a schedule, with its next run"),
        ("rm", "delete a schedule (its runs stay)"),
        ("enable", "start making runs again"),
        ("disable", "make no more runs until enabled"),
    ):
        scheds_sub.add_parser(name, help=text).add_argument("schedule_id")

    points = sub.add_parser("waitpoints", help="make, show or complete waitpoints")
    points_sub = points.add_subparsers(dest="waitpoints_command", required=True, metavar="ACTION")
    made_point = points_sub.add_parser("create", help="a waitpoint and its signed URL")
    made_point.add_argument("--timeout", help="seconds, or 30m, 1h")
    points_sub.add_parser("get", help="a waitpoint and its status").add_argument("waitpoint_id")
    done_point = points_sub.add_parser("complete", help="complete a waitpoint (once)")
    done_point.add_argument("waitpoint_id")
    done_point.add_argument(
        "--output", type=_json_arg, default=None, help="JSON, @file.json, or - for stdin"
    )

    queues = sub.add_parser("queues", help="list queues, set their limits, pause or resume them")
    queues_sub = queues.add_subparsers(dest="queues_command", required=True, metavar="ACTION")
    queues_sub.add_parser("list", help="every queue: its limit, state and counts")
    queues_sub.add_parser("get", help="a queue, with its counts").add_argument("name")
    made = queues_sub.add_parser("create", help="a queue with a concurrency limit")
    made.add_argument("name")
    made.add_argument("--limit", type=int, help="runs at once (per concurrency key)")
    made.add_argument("--paused", action="store_true")
    limit = queues_sub.add_parser("limit", help="set the limit (none: no limit)")
    limit.add_argument("name")
    limit.add_argument("limit", type=_limit_arg, help="a number, or none")
    queues_sub.add_parser("pause", help="start no more of its runs").add_argument("name")
    queues_sub.add_parser("resume", help="start its runs again").add_argument("name")

    hooks = sub.add_parser("webhooks", help="add, list or remove callback endpoints")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    add = hooks_sub.add_parser("add", help="an endpoint; prints its signing secret")
    add.add_argument("url")
    add.add_argument("--event", action="append", dest="events")
    add.add_argument("--task", action="append", dest="tasks")
    add.add_argument("--description", default="")
    hooks_sub.add_parser("list", help="the project's endpoints")
    hooks_sub.add_parser("rm", help="delete an endpoint").add_argument("endpoint_id")
    rotate = hooks_sub.add_parser(
        "rotate-secret",
        help="a new signing secret; the old one still signs for the grace period",
    )
    rotate.add_argument("endpoint_id")
    rotate.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds the old secret stays valid (WEBHOOK_ROTATION_GRACE)",
    )
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
    debounce = None
    if args.debounce_key:
        debounce = {
            "key": args.debounce_key,
            "delay": args.debounce_delay,
            "mode": args.debounce_mode,
        }
    run = client.trigger(
        args.task,
        args.payload,
        idempotency_key=args.idempotency_key,
        delay=args.delay,
        tags=args.tags,
        queue=args.queue,
        concurrency_key=args.concurrency_key,
        priority=args.priority,
        debounce=debounce,
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
    if args.runs_command in ("bulk-cancel", "bulk-replay"):
        act = client.bulk_cancel if args.runs_command == "bulk-cancel" else client.bulk_replay
        if args.ids:
            _print(act(ids=args.ids), out)
        else:
            _print(
                act(
                    status=args.status,
                    task=args.task,
                    tag=args.tag,
                    queue=args.queue,
                    created_after=args.created_after,
                    created_before=args.created_before,
                ),
                out,
            )
        return 0
    if args.runs_command == "logs":
        cursor = None
        while True:
            page = client.run_logs(args.run_id, limit=1000, cursor=cursor)
            for line in page["data"]:
                # A task wrote these: its control sequences are shown, not obeyed.
                fields = "".join(
                    f"  {name}={json.dumps(value, ensure_ascii=False)}"
                    for name, value in (line.get("fields") or {}).items()
                )
                out.write(
                    printable(
                        f"{line['ts']}  {line['level']:<8} #{line['attempt']}  "
                        f"{line['message']}{fields}"
                    )
                    + "\n"
                )
            cursor = page["next_cursor"]
            if cursor is None:
                return 0
    if args.runs_command == "bulk":
        _print(client.get_bulk(args.bulk_id), out)
        return 0
    if args.runs_command == "list":
        filters = {"status": args.status, "task": args.task, "tag": args.tag, "queue": args.queue}
        for n, run in enumerate(client.list_runs(limit=min(args.limit, 100), **filters)):
            if n >= args.limit:
                break
            out.write(f"{run['id']}  {run['status']:<10} {run['task']:<20} {run['created_at']}\n")
        return 0
    action = {"get": client.get_run, "cancel": client.cancel, "replay": client.replay}
    _print(action[args.runs_command](args.run_id), out)
    return 0


def _schedules(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    command = args.schedules_command
    if command == "list":
        for schedule in client.list_schedules()["data"]:
            state = "enabled" if schedule["enabled"] else "disabled"
            out.write(
                f"{schedule['id']}  {schedule['task']:<20} {schedule['cron']!r:<18} "
                f"{schedule['timezone']:<16} {state:<8} next {schedule['next_run_at']}\n"
            )
        return 0
    if command == "create":
        answer = client.create_schedule(
            args.task, args.cron, timezone=args.timezone, payload=args.payload
        )
    elif command == "get":
        answer = client.get_schedule(args.schedule_id)
    elif command == "rm":
        client.delete_schedule(args.schedule_id)
        out.write(f"deleted {args.schedule_id}\n")
        return 0
    else:
        answer = client.update_schedule(args.schedule_id, enabled=command == "enable")
    _print(answer, out)
    return 0


def _waitpoints(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    command = args.waitpoints_command
    if command == "create":
        answer = client.create_waitpoint(timeout=args.timeout)
    elif command == "get":
        answer = client.get_waitpoint(args.waitpoint_id)
    else:
        answer = client.complete_waitpoint(args.waitpoint_id, args.output)
    _print(answer, out)
    return 0


def _all_queues(client: Client) -> Any:
    cursor = None
    while True:
        page = client.list_queues(cursor=cursor)
        yield from page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _queues(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    command = args.queues_command
    if command == "list":
        for queue in _all_queues(client):
            limit = queue["concurrency_limit"]
            state = "paused" if queue["paused"] else "active"
            out.write(
                f"{queue['name']:<24} limit {'none' if limit is None else limit:<6} {state:<8} "
                f"queued {queue['queued']:<6} executing {queue['running']}\n"
            )
        return 0
    if command == "get":
        answer = client.get_queue(args.name)
    elif command == "create":
        answer = client.create_queue(args.name, concurrency_limit=args.limit, paused=args.paused)
    elif command == "limit":
        answer = client.update_queue(args.name, concurrency_limit=args.limit)
    elif command == "pause":
        answer = client.pause_queue(args.name)
    else:
        answer = client.resume_queue(args.name)
    _print(answer, out)
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
    elif args.webhooks_command == "rotate-secret":
        _print(client.rotate_webhook_secret(args.endpoint_id, grace_period=args.grace), out)
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
            if args.command == "queues":
                return _queues(client, args, out)
            if args.command == "schedules":
                return _schedules(client, args, out)
            if args.command == "waitpoints":
                return _waitpoints(client, args, out)
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
