"""Redis transactions of one turn of the event loop, sent in one round trip.

arq spends two transactions on every job it runs (``MULTI``/``EXEC``: reading
the job and counting its try as it starts it; deleting its keys and storing
its result as it finishes it), each a round trip and a write of its own. A
worker's jobs start and end in bursts (a batch of reports answered at once
ends dozens of them), so in a drain those two were about a third of the
worker's CPU and 16 ms of every job's slot (docs/performance.md).

:class:`MergingRedis` is arq's client whose transaction pipelines, when several
are executed in the same turn of the event loop, go out together on one
connection: each still its own ``MULTI`` … ``EXEC`` (so each is as atomic as
before, and one's failure is its own), all written at once and their replies
read in order. A pipeline that watches keys or runs scripts, and every other
command, goes as redis-py sends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from arq import ArqRedis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection
from redis.client import EMPTY_RESPONSE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["MergingRedis", "merging"]

_Waiting = tuple["MergingPipeline", list[Any], bool, "asyncio.Future[list[Any]]"]


class _Sent:
    """A connection whose commands were written already: what redis-py's
    transaction code would send is not sent again, and replies are read from
    the connection itself."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def pack_commands(self, commands: Iterable[Any]) -> list[bytes]:
        return []

    async def send_packed_command(self, *_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class _Merger:
    """Transactions waiting for the next send; one send per turn of the loop
    (several may be out at once, each on its own pooled connection)."""

    def __init__(self) -> None:
        self._waiting: list[_Waiting] = []
        #: The sends under way. The loop holds its tasks weakly, and so does
        #: the pool its connections in use: without this, a collection of
        #: cycles while a send waits for its reply could take the send, its
        #: connection and every transaction in it (docs/architecture.md).
        self._sending: set[asyncio.Task[None]] = set()
        #: Round trips made, and transactions in them (for tests and profiles).
        self.sends = 0
        self.transactions = 0

    def run(
        self, pipe: MergingPipeline, commands: list[Any], raise_on_error: bool
    ) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._waiting:
            # After the callbacks ready now: the other transactions of this
            # turn join the same send.
            loop.call_soon(self._start_send)
        self._waiting.append((pipe, commands, raise_on_error, future))
        return future

    def _start_send(self) -> None:
        group, self._waiting = self._waiting, []
        group = [item for item in group if not item[3].cancelled()]
        if group:
            task = asyncio.ensure_future(self._send(group))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            task.add_done_callback(_retrieve)

    async def _send(self, group: list[_Waiting]) -> None:
        pool = group[0][0].connection_pool
        self.sends += 1
        self.transactions += len(group)
        try:
            connection = await pool.get_connection()
        except BaseException as exc:
            _fail(group, exc)
            raise
        try:
            packed: list[bytes] = []
            for _, commands, _, _ in group:
                packed += connection.pack_commands(_transaction(commands))
            await connection.send_packed_command(packed)
            sent = _Sent(connection)
            for index, (pipe, commands, raise_on_error, future) in enumerate(group):
                try:
                    result = await pipe._execute_transaction(sent, commands, raise_on_error)  # type: ignore[arg-type]
                except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
                    raise  # the connection failed: every transaction not answered hears it
                except Exception as exc:  # this transaction's own error: its replies were read
                    if not future.done():
                        future.set_exception(exc)
                    if not _in_step(exc):
                        # redis-py gave up on the connection mid-reply: the
                        # rest cannot be read from it.
                        _fail(group[index + 1 :], exc)
                        await connection.disconnect()
                        return
                    continue
                if not future.done():
                    future.set_result(result)
        except BaseException as exc:
            await connection.disconnect()
            _fail(group, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await pool.release(connection)


def _transaction(commands: list[Any]) -> list[tuple[Any, ...]]:
    """What redis-py's ``_execute_transaction`` writes for ``commands``."""
    return [
        ("MULTI",),
        *(args for args, options in commands if EMPTY_RESPONSE not in options),
        ("EXEC",),
    ]


def _in_step(exc: BaseException) -> bool:
    """Whether every reply of the transaction was read before ``exc`` (so
    the next transaction's replies come next on the connection): all but
    the reply count that did not match, after which redis-py disconnects."""
    return "Wrong number of response items" not in str(exc)


def _fail(group: list[_Waiting], exc: BaseException) -> None:
    for _, _, _, future in group:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # each caller heard it already


class MergingPipeline(Pipeline):
    """A pipeline whose plain transaction (no ``WATCH``, no explicit
    ``MULTI``, no scripts) is sent with the others of its turn."""

    _merger: _Merger

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if (
            not self.is_transaction
            or self.explicit_transaction
            or self.watching
            or self.scripts
            or not self.command_stack
        ):
            return await super().execute(raise_on_error)
        commands, self.command_stack = self.command_stack, []
        try:
            return await self._merger.run(self, commands, raise_on_error)
        finally:
            await self.reset()  # type: ignore[no-untyped-call]


class MergingRedis(ArqRedis):
    """arq's client, its transactions merged (:class:`MergingPipeline`)."""

    _merger: _Merger | None = None

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        if self._merger is None:
            self._merger = _Merger()
        pipe = MergingPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe._merger = self._merger
        return pipe


def merging(pool: ArqRedis) -> MergingRedis:
    """``pool`` (from arq's ``create_pool``) as a :class:`MergingRedis` on the
    same connections and settings."""
    merged = MergingRedis(
        connection_pool=pool.connection_pool,
        job_serializer=pool.job_serializer,
        job_deserializer=pool.job_deserializer,
        default_queue_name=pool.default_queue_name,
        expires_extra_ms=pool.expires_extra_ms,
    )
    # It owns the connections as ``pool`` did: closing it closes them.
    merged.auto_close_connection_pool = pool.auto_close_connection_pool
    return merged
