"""The shard transport's routing, with fake actor handles (no Ray)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import inference_batch

from actors.transport import SHARDS_ENV, ShardTransport
from kpistream.wire.batch import shard_of


class _Method:
    def __init__(self, log, shard, name):
        self.log, self.shard, self.name = log, shard, name

    def remote(self, *args):
        self.log.append((self.shard, self.name, args))
        if self.name == "report_emitter":   # fire and forget
            return None

        async def reply():
            return {"accepted": len(args[0]) if self.name.startswith("ingest") else 0}
        return reply()


class FakeHandle:
    def __init__(self, log, shard):
        for name in ("ingest_inference", "ingest_feedback", "report_emitter"):
            setattr(self, name, _Method(log, shard, name))


def _transport(n):
    log = []
    tr = ShardTransport(n)
    tr._handles = [FakeHandle(log, i) for i in range(n)]
    return tr, log


def test_rows_go_to_their_shards():
    tr, log = _transport(3)
    b = inference_batch([f"q-{i}" for i in range(30)])

    async def go():
        return await tr.send("inference", b)

    reports = asyncio.run(go())
    assert sum(r["accepted"] for r in reports) == 30
    for shard, name, (part,) in log:
        assert name == "ingest_inference" and (shard_of(part.request_id, 3) == shard).all()
    assert sorted(s for s, _, _ in log) == sorted(set(shard_of(b.request_id, 3).tolist()))


def test_a_one_shard_batch_is_one_call_and_reports_go_to_shard_0():
    tr, log = _transport(4)
    b = inference_batch(["only-one"])

    async def go():
        return await tr.send("feedback", b)

    assert asyncio.run(go()) == {"accepted": 1}
    [(shard, name, (part,))] = log
    assert name == "ingest_feedback" and part is b
    assert shard == int(shard_of(b.request_id, 4)[0])
    tr.report("replica", {"dropped": 0})
    assert log[-1] == (0, "report_emitter", ("replica", {"dropped": 0}))
    with pytest.raises(ValueError):
        ShardTransport.call(tr._handles[0], "other", b)


def test_shard_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(SHARDS_ENV, "3")
    assert ShardTransport().n_shards == 3
    monkeypatch.delenv(SHARDS_ENV)
    assert ShardTransport().n_shards is None
    with pytest.raises(ValueError):
        ShardTransport(0)
