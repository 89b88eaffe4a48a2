"""The emitter over a fake in-memory transport: buffer, flush by size or age, in-flight bound,
drops and errors counted, never raised."""

from __future__ import annotations

import asyncio
import time

import pytest

from kpistream.wire.batch import InferenceBatch, shard_of
from kpistream.wire.emitter import Emitter


class Memory:
    """A transport that keeps what it is sent; ``reply`` says how sends end."""

    def __init__(self, reply: str = "none", n_shards: int | None = None) -> None:
        self.sent: list[tuple[str, object]] = []
        self.reply = reply
        self.is_ready = True
        self.ready_calls = 0
        self.resets = 0
        self.reports: list[tuple[str, dict]] = []
        if n_shards is not None:
            self.n_shards = n_shards

    def ready(self) -> bool:
        self.ready_calls += 1
        return self.is_ready

    def reset(self) -> None:
        self.resets += 1

    def report(self, name, stats) -> None:
        self.reports.append((name, stats))

    def send(self, kind, batch):
        self.sent.append((kind, batch))
        if self.reply == "raise":
            raise ConnectionError("down")
        if self.reply == "report":
            async def rep():
                return {"accepted": len(batch) - 1, "late": 1, "duplicates": 2,
                        "rejected": [{"index": 0}]}
            return rep()
        if self.reply == "fail":
            async def fail():
                raise RuntimeError("ingest failed")
            return fail()
        if self.reply == "never":
            return asyncio.get_running_loop().create_future()
        return None

    @property
    def rows(self) -> int:
        return sum(len(b) for _, b in self.sent)


def run(coro):
    return asyncio.run(coro)


async def wait_for(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.005)
    return cond()


def test_put_buffers_drops_when_full_and_flush_sends_the_list():
    async def go():
        tr = Memory()
        tr.is_ready = False
        em = Emitter(tr, buffer_rows=3, flush_s=60)
        assert [em.put(i) for i in range(5)] == [True, True, True, False, False]
        st = em.stats()
        assert st["buffered"] == 3 and st["dropped"] == 2 and tr.rows == 0
        tr.is_ready = True
        await em.flush()
        assert tr.sent == [("inference", [0, 1, 2])]
        st = em.stats()
        assert st["buffered"] == 0 and st["flushed_rows"] == 3 and st["flushed_batches"] == 1
        assert st["sent_batches"] == 1 and st["sent_rows"] == 3 and st["in_flight"] == 0
        await em.aclose()
    run(go())


def test_flush_by_size_then_by_age():
    async def go():
        tr = Memory()
        em = Emitter(tr, flush_rows=4, flush_s=0.3, kind="feedback")
        for i in range(4):
            em.put(i)
        assert await wait_for(lambda: tr.rows == 4, 1.0)
        t0 = time.monotonic()
        em.put(4)
        await asyncio.sleep(0.05)
        assert tr.rows == 4                   # one row: waits for its age
        assert await wait_for(lambda: tr.rows == 5)
        assert time.monotonic() - t0 >= 0.2
        assert [k for k, _ in tr.sent] == ["feedback", "feedback"]
        await em.aclose()
    run(go())


def test_a_transport_that_is_not_ready_is_not_spun_on():
    async def go():
        tr = Memory()
        tr.is_ready = False
        em = Emitter(tr, flush_rows=1, flush_s=0.02)
        for i in range(10):
            em.put(i)
        await asyncio.sleep(0.3)
        assert tr.ready_calls < 40 and tr.rows == 0
        tr.is_ready = True
        assert await wait_for(lambda: tr.rows == 10)
        await em.aclose()
    run(go())


def test_ready_may_raise_or_be_a_coroutine():
    class Odd(Memory):
        def __init__(self):
            super().__init__()
            self.mode = "raise"

        async def _yes(self):
            return True

        def ready(self):
            if self.mode == "raise":
                raise LookupError("no actors")
            return self._yes()

    async def go():
        tr = Odd()
        em = Emitter(tr, flush_s=60)
        em.put(1)
        await em.flush()
        assert tr.rows == 0 and "no actors" in em.stats()["last_error"]
        tr.mode = "async"
        await em.flush()
        assert tr.rows == 1
        await em.aclose()
    run(go())


def test_in_flight_is_bounded_and_a_stuck_send_is_given_up_on():
    async def go():
        tr = Memory(reply="never")
        em = Emitter(tr, flush_rows=1, flush_s=0.005, max_in_flight=2, send_timeout_s=0.1,
                     max_retries=0)
        for i in range(3):
            em.put(i)
            await asyncio.sleep(0.02)
        assert len(tr.sent) == 2 and em.stats()["in_flight"] == 2   # the third waits
        assert await wait_for(lambda: len(tr.sent) == 3)
        st = em.stats()
        assert st["send_timeouts"] >= 1 and st["send_errors"] >= 1 and st["lost_rows"] >= 1
        assert "outstanding" in st["last_error"] and tr.resets >= 1
        await em.aclose(timeout=0.1)
    run(go())


@pytest.mark.parametrize("reply", ["raise", "fail"])
def test_send_errors_are_counted_and_the_transport_reset(reply):
    async def go():
        tr = Memory(reply=reply)
        em = Emitter(tr, flush_s=60, max_retries=0)      # at most once: lost at once
        em.put("a")
        em.put("b")
        await em.flush()
        st = em.stats()
        assert st["send_errors"] == 1 and st["lost_rows"] == 2 and st["in_flight"] == 0
        assert tr.resets == 1 and "send failed" in st["last_error"]
        await em.aclose()
    run(go())


class Flaky(Memory):
    """Fails (raises, or a failing or never-ending future) the first ``n`` sends."""

    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        self.n, self.how, self.ok_rows = n, how, []

    def send(self, kind, batch):
        self.sent.append((kind, batch))
        if len(self.sent) <= self.n:
            if self.how == "raise":
                raise ConnectionError("down")
            if self.how == "never":
                return asyncio.get_running_loop().create_future()

            async def fail():
                raise RuntimeError("ingest failed")
            return fail()
        self.ok_rows.extend(batch)
        return None


@pytest.mark.parametrize("how", ["raise", "fail", "never"])
def test_failed_sends_go_again_until_delivered(how):
    """At least once: failed and timed-out sends go again after a backoff; nothing is
    lost while retries remain, and what arrives is every row (re-deliveries are the
    receiver's to drop by event id)."""
    async def go():
        tr = Flaky(3, how)
        em = Emitter(tr, flush_rows=2, flush_s=0.005, send_timeout_s=0.05,
                     retry_backoff_s=0.01, max_in_flight=1)
        rows = list(range(10))
        for r in rows:
            em.put(r)
            await asyncio.sleep(0.002)
        assert await wait_for(lambda: sorted(set(tr.ok_rows)) == rows, 5)
        await em.flush()
        st = em.stats()
        assert st["lost_rows"] == 0 and st["send_retries"] == 3 and st["send_errors"] == 3
        assert st["retry_waiting_rows"] == 0 and tr.resets == 3
        if how == "never":
            assert st["send_timeouts"] == 3
        await em.aclose()
    run(go())


def test_retries_are_bounded_in_number_and_in_rows():
    async def go():
        tr = Flaky(10**9, "raise")                         # never comes back
        em = Emitter(tr, flush_s=0.005, retry_backoff_s=0.001, max_retries=3,
                     buffer_rows=6, flush_rows=3)
        for r in range(3):
            em.put(r)
        assert await wait_for(lambda: em.stats()["lost_rows"] == 3, 5)
        assert em.stats()["send_retries"] == 3 and len(tr.sent) == 4
        for r in range(9):                                   # more than the bound waits
            em.put(r)
            await asyncio.sleep(0)
        assert await wait_for(lambda: em.stats()["retry_waiting_rows"] == 0, 5)
        st = em.stats()
        assert st["lost_rows"] + st["dropped"] == 12 and st["retry_waiting_rows"] <= 6
        await em.aclose()
    run(go())


def test_receivers_reports_are_counted():
    async def go():
        tr = Memory(reply="report")
        em = Emitter(tr, flush_s=60, flush_rows=1000)
        for i in range(5):
            em.put(i)
        await em.flush()
        st = em.stats()
        assert (st["accepted"], st["late"], st["duplicates"], st["rejected"]) == (4, 1, 2, 1)
        await em.aclose()
    run(go())


def test_a_failing_build_loses_the_rows_and_says_so():
    async def go():
        tr = Memory()
        em = Emitter(tr, build=lambda rows: 1 / 0, flush_s=60)
        em.put(1)
        await em.flush()
        st = em.stats()
        assert st["lost_rows"] == 1 and "ZeroDivisionError" in st["last_error"] and not tr.sent
        await em.aclose()
    run(go())


def test_batches_are_split_by_shard():
    def build(ids):
        now = 1_750_000_000_000
        return InferenceBatch.from_records([
            {"event_id": f"{r}:p", "request_id": r, "ts": now, "model": "m",
             "model_version": "1", "variant": "p", "endpoint": "", "latency_ms": 1.0,
             "status": "ok", "pred_label": "a", "pred_score": None, "pred_value": None,
             "ranking": None, "segments": {}, "cost_usd": None, "tokens": None,
             "features": None} for r in ids])

    async def go():
        tr = Memory(n_shards=3)
        em = Emitter(tr, build=build, flush_s=60)
        for i in range(60):
            em.put(f"r-{i}")
        await em.flush()
        assert len(tr.sent) == 3 and tr.rows == 60
        owners = [set(shard_of(b.request_id, 3).tolist()) for _, b in tr.sent]
        assert owners == [{0}, {1}, {2}]
        assert em.stats()["sent_batches"] == 3
        await em.aclose()
    run(go())


def test_counters_are_reported_about_once_a_second():
    async def go():
        tr = Memory()
        em = Emitter(tr, flush_s=0.01, name="replica-1", stats=lambda: {"x": 1})
        em.put(0)
        await asyncio.sleep(0.2)
        assert tr.reports == [("replica-1", {"x": 1})]
        await em.aclose()
    run(go())


def test_close_flushes_once_and_stops_the_task():
    async def go():
        tr = Memory()
        em = Emitter(tr, flush_s=60)
        em.put(1)
        task = em.task
        assert em.running and task is not None
        await em.aclose()
        assert tr.rows == 1 and task.done() and em.closed
        await em.aclose()                        # idempotent
        em.put(2)                                # no new task after close
        assert em.task is task
    run(go())


def test_bad_arguments():
    with pytest.raises(ValueError):
        Emitter(Memory(), buffer_rows=0)
    with pytest.raises(ValueError):
        Emitter(Memory(), flush_s=0)


def test_batch_rows_caps_each_send_and_a_size_flush_sends_only_full_batches():
    async def go():
        tr = Memory()
        em = Emitter(tr, batch_rows=3, flush_rows=1, flush_s=0.3)
        assert em.flush_rows == 3                  # the size trigger is a full batch
        for i in range(7):
            em.put(i)
        await asyncio.sleep(0.05)
        assert [b for _, b in tr.sent] == [[0, 1, 2], [3, 4, 5]]
        assert em.stats()["buffered"] == 1         # the rest waits for its age
        assert await wait_for(lambda: tr.rows == 7)
        assert [b for _, b in tr.sent][-1] == [6]
        for i in range(5):
            em.put(i)
        await em.flush()                           # an explicit flush sends everything
        assert [len(b) for _, b in tr.sent][-2:] == [3, 2]
        await em.aclose()
    run(go())
