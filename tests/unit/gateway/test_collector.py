"""The gateway's garbage-collection policy: survivors frozen, a full collection now and then."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from edgefleet_operator.gateway.collector import run_collector_policy


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.asyncio
async def test_survivors_are_frozen_and_a_full_collection_reclaims_frozen_cycles() -> None:
    gc.collect()
    gc.disable()  # only the policy collects during the test (and its own gc.collect())
    try:
        cycle = weakref.ref(_Cycle())  # unreachable at once, but a cycle: only a collection frees it
        policy = asyncio.create_task(run_collector_policy(0.05, 2.0))
        try:
            await asyncio.sleep(0.15)
            assert gc.get_freeze_count() > 0
            assert cycle() is not None  # frozen: no collection looks at it
            deadline = asyncio.get_running_loop().time() + 10
            while cycle() is not None:  # the full collection unfreezes and reclaims it
                assert asyncio.get_running_loop().time() < deadline, "no full collection happened"
                await asyncio.sleep(0.02)
        finally:
            policy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await policy
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0  # cancelled: the interpreter is left as it was


@pytest.mark.parametrize(("freeze", "full"), [(0, 10), (-1, 10), (20, 10)])
@pytest.mark.asyncio
async def test_bad_intervals_are_refused(freeze: float, full: float) -> None:
    with pytest.raises(ValueError, match="freeze_interval"):
        await run_collector_policy(freeze, full)
