"""The variant cache under concurrent writers: identical builds racing to cache the same variant id.

Found by the reliability campaign (issue 10): two classes whose builds end in the same variant (or
two operator workers building the same key) both called ``put``; the loser's rename met the
winner's folder and failed with "Directory not empty", logged as "could not cache variant".
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from edgefleet_core.optimize.lineage import VariantCache
from tests.support.tiny_models import tiny_cnn

WRITERS = 8


def _race(cache: VariantCache, variant_id: str, writers: int) -> list[BaseException]:
    """``writers`` threads put the same variant at the same moment; what they raised."""
    model = tiny_cnn(seed=1)
    records = [{"name": "GraphOptimization", "status": "applied"}]
    start = threading.Barrier(writers)
    failures: list[BaseException] = []

    def write() -> None:
        start.wait()
        try:
            cache.put(variant_id, model, records)
        except BaseException as exc:  # noqa: BLE001  (collected for the assertion below)
            failures.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_concurrent_identical_puts_all_succeed_and_leave_one_complete_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = VariantCache(tmp_path)
    variant_id = "ab" * 32
    for _ in range(5):  # the race is timing-dependent: a few rounds, each starting from an empty cache
        for leftover in cache.root.glob("*"):
            for file in leftover.iterdir():
                file.unlink()
            leftover.rmdir()
        with caplog.at_level(logging.WARNING):
            failures = _race(cache, variant_id, WRITERS)
        assert failures == []
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        found = cache.get(variant_id)
        assert found is not None
        assert json.loads((cache.root / variant_id / "passes.json").read_text()) == found[1]
        # One entry and no staging or set-aside folders left behind by the losers.
        assert sorted(p.name for p in cache.root.iterdir()) == [variant_id]
        assert sorted(p.name for p in (cache.root / variant_id).iterdir()) == ["model.onnx", "passes.json"]


def test_a_damaged_entry_is_replaced_by_the_next_put(tmp_path: Path) -> None:
    cache = VariantCache(tmp_path)
    variant_id = "cd" * 32
    damaged = cache.root / variant_id
    damaged.mkdir(parents=True)
    (damaged / "model.onnx").write_bytes(b"not a model")  # passes.json missing: a crash of an older writer
    assert cache.get(variant_id) is None
    cache.put(variant_id, tiny_cnn(seed=2), [{"name": "GraphOptimization"}])
    found = cache.get(variant_id)
    assert found is not None
    assert found[1] == [{"name": "GraphOptimization"}]
    assert sorted(p.name for p in cache.root.iterdir()) == [variant_id]


def test_a_second_put_of_a_complete_entry_writes_nothing(tmp_path: Path) -> None:
    cache = VariantCache(tmp_path)
    variant_id = "ef" * 32
    cache.put(variant_id, tiny_cnn(seed=3), [{"name": "a"}])
    before = (cache.root / variant_id / "model.onnx").stat().st_ino
    cache.put(variant_id, tiny_cnn(seed=3), [{"name": "a"}])  # content-addressed: the same content
    assert (cache.root / variant_id / "model.onnx").stat().st_ino == before
