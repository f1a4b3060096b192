"""``gateway.services.coalesce.Coalescer``: items that arrive while a unit is
in flight go together in the next; a group that fails goes again item by
item; an unreachable database fails every item at once; a caller that gives
up takes nobody else with it."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from gateway.services.coalesce import Coalescer


class Served:
    """What ``serve`` was given, unit by unit; it doubles each item after
    waiting for ``gate``, and refuses the group if it holds ``bad``."""

    def __init__(self, bad: int | None = None) -> None:
        self.groups: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        #: Set once a unit is in flight.
        self.entered = asyncio.Event()
        self.bad = bad

    async def __call__(self, items: list[int]) -> list[int]:
        self.groups.append(list(items))
        self.entered.set()
        await self.gate.wait()
        if self.bad in items:
            raise ValueError(f"item {self.bad} is bad")
        return [2 * i for i in items]


def test_items_that_wait_go_together_each_with_its_own_result() -> None:
    async def main() -> None:
        served = Served()
        served.gate.clear()  # the first unit holds its lane until all have come
        sizes: list[int] = []
        together = Coalescer(served, lanes=1, max_group=4, observe=sizes.append)
        first = asyncio.create_task(together.submit(0))
        await served.entered.wait()  # the first unit is in flight, alone
        calls = [asyncio.create_task(together.submit(n)) for n in range(1, 10)]
        await asyncio.sleep(0)  # every submit has queued its item
        served.gate.set()
        assert await asyncio.gather(first, *calls) == [2 * n for n in range(10)]
        # The first alone (nothing was waiting yet), then the rest by four at most.
        assert served.groups == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
        assert sizes == [1, 4, 4, 1]
        assert (together.units, together.items) == (4, 10)

    asyncio.run(main())


def test_a_failed_group_goes_again_item_by_item() -> None:
    async def main() -> None:
        served = Served(bad=3)
        served.gate.clear()
        together = Coalescer(served, lanes=1)
        calls = [asyncio.create_task(together.submit(n)) for n in range(6)]
        await asyncio.sleep(0)
        served.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [r for n, r in enumerate(results) if n != 3] == [0, 2, 4, 8, 10]
        assert isinstance(results[3], ValueError) and str(results[3]) == "item 3 is bad"
        # Submitted in one turn of the loop: one group, then each alone.
        assert served.groups == [[0, 1, 2, 3, 4, 5], [0], [1], [2], [3], [4], [5]]

    asyncio.run(main())


def test_an_unreachable_database_fails_the_group_at_once() -> None:
    async def main() -> None:
        groups: list[list[int]] = []
        gate = asyncio.Event()

        async def serve(items: list[int]) -> list[int]:
            groups.append(list(items))
            await gate.wait()
            raise sa.exc.OperationalError("SELECT 1", {}, OSError("connection refused"))

        together = Coalescer(serve, lanes=1)
        calls = [asyncio.create_task(together.submit(n)) for n in range(4)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, sa.exc.OperationalError) for r in results)
        assert groups == [[0, 1, 2, 3]]  # not again one by one

    asyncio.run(main())


def test_a_caller_that_gives_up_leaves_the_others_their_results() -> None:
    async def main() -> None:
        served = Served()
        served.gate.clear()
        together = Coalescer(served, lanes=2)
        calls = [asyncio.create_task(together.submit(n)) for n in range(5)]
        await asyncio.sleep(0)
        calls[2].cancel()
        served.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [r for n, r in enumerate(results) if n != 2] == [0, 2, 6, 8]
        # The first lane took every item still wanted; the second found none.
        assert served.groups == [[0, 1, 3, 4]]

    asyncio.run(main())


@pytest.mark.parametrize("lanes", [1, 3])
def test_no_more_units_in_flight_than_lanes(lanes: int) -> None:
    async def main() -> None:
        in_flight = 0
        most = 0

        async def serve(items: list[int]) -> list[int]:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0)
            in_flight -= 1
            return items

        together = Coalescer(serve, lanes=lanes, max_group=1)
        assert await asyncio.gather(*(together.submit(n) for n in range(50))) == list(range(50))
        assert most == lanes

    asyncio.run(main())
