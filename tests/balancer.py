"""A TCP load balancer for the multi-host test, standing in for the reverse
proxy a deployment puts in front of its gateways (deploy/Caddyfile): each
connection goes to the next upstream that takes it within a second, so a
gateway host cut off the network is passed over.

    python -m tests.balancer --listen 10.77.0.5:80 --to 10.77.0.11:8000 --to 10.77.0.12:8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal

CONNECT_TIMEOUT = 1.0


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def serve(listen: tuple[str, int], upstreams: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(range(len(upstreams)))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = next(turn)
        for i in range(len(upstreams)):
            host, port = upstreams[(start + i) % len(upstreams)]
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        writer.close()

    server = await asyncio.start_server(handle, *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"balancing {listen[0]}:{listen[1]} over {len(upstreams)} upstreams", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.balancer")
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--to", type=_address, action="append", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to))


if __name__ == "__main__":
    main()
