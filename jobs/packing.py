"""Redis connections that pack their commands in C.

redis-py's asyncio connections build every command's bytes in Python
(``AbstractConnection.pack_command``), even when hiredis is installed; only its
blocking client hands the work to ``hiredis.pack_command``. The worker's merged
transactions, the web's pipelines of jobs and the dispatcher's hand-overs pack
thousands of commands a second; packing in Python was about 7% of the
worker's CPU samples in a drain (docs/performance.md). :func:`open_pool` is
arq's ``create_pool`` with connections that pack with hiredis (arq depends on
``redis[hiredis]``): the same bytes, about six times faster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError

__all__ = ["open_pool", "pack_command", "packing_in_c"]


def _packed(args: tuple[Any, ...]) -> bytes:
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif b" " in first:
        args = (*first.split(), *args[1:])
    try:
        packed: bytes = hiredis.pack_command(args)
        return packed
    except TypeError as exc:
        raise DataError(str(exc)) from None


def pack_command(*args: Any) -> list[bytes]:
    """One command's bytes, as redis-py's ``pack_command`` makes them.

    A first argument with spaces (``"CONFIG GET"``) is split into words, as
    redis-py does; an argument that is not ``str``, ``bytes``, ``int`` or
    ``float`` (``None``, ``bool``) is refused with redis-py's ``DataError``.
    """
    return [_packed(args)]


class _PackingInC:
    """Mixed into a connection class ahead of it: its commands packed by hiredis."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return [_packed(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([_packed(tuple(command)) for command in commands])]


_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packing_in_c(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain, TLS, Unix socket or Sentinel-managed) packing its
    commands with hiredis; one class for each, however many pools ask."""
    if issubclass(cls, _PackingInC):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"PackingInC{cls.__name__}", (_PackingInC, cls), {})
    return _CLASSES[cls]


async def open_pool(settings: RedisSettings, **kwargs: Any) -> ArqRedis:
    """arq's ``create_pool(settings, **kwargs)``, its connections packing in C.

    arq's pool has opened a connection to ping Redis by the time it returns;
    that one is closed, and every connection from then on is of the packing
    class.
    """
    pool = await create_pool(settings, **kwargs)
    connections = pool.connection_pool
    connections.connection_class = packing_in_c(connections.connection_class)
    await connections.disconnect()
    connections.reset()  # type: ignore[no-untyped-call]
    return pool
