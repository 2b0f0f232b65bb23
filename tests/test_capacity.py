"""The adaptive limit on requests in flight to the VLM server (watcher/engines/capacity.py).

Pure asyncio on a fake clock: simulated servers answer with the latency or the gauges a
real one would show, so the control law is checked without waiting for anything. Only
the poller test talks HTTP, to a tiny server on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from waiting import eventually

from watcher.core.pages import Block, PageResult
from watcher.engines.capacity import AdaptiveLimit, parse_vllm_gauges, poll_server_gauges
from watcher.engines.child import ReaderSpec
from watcher.engines.paddleocr_vl import (
    FIXED_BATCH_PAGES,
    INITIAL_BLOCKS_PER_PAGE,
    MAX_BATCH_PAGES,
    PageBatches,
)
from watcher.engines.supervisor import SupervisedEngine, _Job
from watcher.service.http import serve_app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Requests:
    """Requests that hold slots until told to finish, oldest first."""

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self.held: list[contextlib.AbstractAsyncContextManager[None]] = []

    async def fill(self) -> None:
        # A backlog: every free slot is taken at once.
        while self.limit.inflight < self.limit.limit:
            await self.start()

    async def start(self) -> None:
        slot = self.limit.slot()
        await slot.__aenter__()
        self.held.append(slot)

    async def finish(self, n: int) -> None:
        for _ in range(min(n, len(self.held))):
            await self.held.pop(0).__aexit__(None, None, None)


async def latency_round(limit: AdaptiveLimit, clock: Clock, latency: Callable[[int], float]) -> None:
    """One round of a backlog: the whole limit sent together, answered together."""
    requests = Requests(limit)
    await requests.fill()
    clock.now += latency(len(requests.held))
    await requests.finish(len(requests.held))


def fixed_server(capacity: int, service: float) -> Callable[[int], float]:
    # n requests on `capacity` slots: beyond capacity, the mean request also queues.
    return lambda n: service * max(1.0, n / capacity)


# --- slots -------------------------------------------------------------------------------
async def test_slot_never_lets_more_requests_in_than_the_limit() -> None:
    limit = AdaptiveLimit(upper=3, lower=3, initial=3)
    active = peak = done = 0

    async def request() -> None:
        nonlocal active, peak, done
        async with limit.slot():
            active += 1
            peak = max(peak, active)
            assert active <= limit.inflight <= limit.limit
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            active -= 1
        done += 1

    await asyncio.gather(*(request() for _ in range(40)))
    assert (peak, done, limit.inflight) == (3, 40, 0)


async def test_waiters_follow_the_limit_when_it_shrinks_and_grows() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=20, initial=4, clock=clock)
    requests = Requests(limit)
    await requests.fill()
    entered = 0

    async def waiter() -> None:
        nonlocal entered
        async with limit.slot():
            entered += 1
            await asyncio.Event().wait()

    waiters = [asyncio.create_task(waiter()) for _ in range(6)]
    await asyncio.sleep(0)
    limit.observe_server(running=2, waiting=10)  # a long queue: shrink to 2 + Q = 4
    limit.record_failure()  # and a cut: 4 -> 2, below the 4 in flight
    assert limit.limit == 2
    await requests.finish(2)
    await asyncio.sleep(0)
    assert entered == 0, "two left, but two is the limit: nobody may enter"
    await requests.finish(1)
    await asyncio.sleep(0)
    assert entered == 1 and limit.inflight == 2

    clock.now += 100
    limit.observe_server(running=2, waiting=0)  # the server is idle and we use our limit
    assert limit.limit == 4
    await asyncio.sleep(0)
    assert entered == 3 and limit.inflight == 4
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await requests.finish(1)
    assert limit.inflight == 0


async def test_a_cancelled_waiter_never_keeps_or_loses_a_slot() -> None:
    limit = AdaptiveLimit(upper=1, initial=1)
    first = Requests(limit)
    await first.start()
    order: list[str] = []

    async def request(name: str) -> None:
        async with limit.slot():
            order.append(name)

    a = asyncio.create_task(request("a"))
    b = asyncio.create_task(request("b"))
    c = asyncio.create_task(request("c"))
    await asyncio.sleep(0)
    c.cancel()  # cancelled while waiting: simply leaves the queue
    await asyncio.sleep(0)
    await first.finish(1)  # grants the slot to a ...
    a.cancel()  # ... which is cancelled before it runs: the slot passes on to b
    await asyncio.gather(a, b, c, return_exceptions=True)
    assert order == ["b"]
    assert limit.inflight == 0 and not limit._waiters


async def test_an_exception_in_the_request_releases_the_slot() -> None:
    limit = AdaptiveLimit(upper=2, initial=2)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with limit.slot():
            raise aiohttp.ClientConnectionError("refused")
    assert limit.inflight == 0
    assert limit.recent_latency is None, "a failed request is no latency sample"


# --- metrics mode ------------------------------------------------------------------------
async def test_metrics_mode_grows_fast_while_the_server_has_no_queue() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=256, initial=4, clock=clock)
    requests = Requests(limit)
    seen = []
    for _ in range(12):
        await requests.fill()
        limit.observe_server(running=limit.inflight, waiting=0)
        seen.append(limit.limit)
        clock.now += 0.5
    assert limit.mode == "metrics"
    assert seen[:3] == [8, 16, 32]
    assert seen == sorted(seen) and seen[-1] == 256 and max(seen) <= 256


async def test_metrics_mode_does_not_grow_a_limit_that_is_not_used() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=256, initial=16, clock=clock)
    requests = Requests(limit)
    for _ in range(5):
        await requests.start()
    for _ in range(10):
        limit.observe_server(running=5, waiting=0)
        clock.now += 0.5
    assert limit.limit == 16


async def test_metrics_mode_shrinks_to_what_runs_plus_a_small_queue() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=256, initial=200, clock=clock)
    limit.observe_server(running=100, waiting=100)
    assert limit.limit == 100 + 10
    limit.observe_server(running=100, waiting=95)  # the same queue, seen again: no second cut
    assert limit.limit == 110
    limit.observe_server(running=3, waiting=50)
    assert limit.limit == 3 + 2


@pytest.mark.parametrize("capacity", [4, 64, 256])
async def test_metrics_mode_settles_against_a_fixed_capacity_server(capacity: int) -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=1024, initial=4, clock=clock)
    requests = Requests(limit)
    seen = []
    for _ in range(80):
        await requests.fill()
        running = min(limit.inflight, capacity)
        limit.observe_server(running=running, waiting=limit.inflight - running)
        seen.append(limit.limit)
        clock.now += 0.5
        await requests.finish(max(1, running // 3))
    queue = max(2, math.ceil(0.1 * capacity))
    settled = seen[-30:]
    assert len(set(settled)) == 1, f"no oscillation: {settled}"
    assert capacity + queue / 2 <= settled[0] <= capacity + queue


async def test_a_client_that_sends_from_elsewhere_grows_on_what_it_reports_in_use() -> None:
    clock = Clock()
    in_use = 10
    limit = AdaptiveLimit(upper=256, initial=32, clock=clock, in_use=lambda: in_use)
    limit.observe_server(running=10, waiting=0)
    assert limit.limit == 32  # not using its limit: no growth, whatever its own slots say
    in_use = 31
    limit.observe_server(running=31, waiting=0)
    assert limit.limit == 64


async def test_a_wave_client_keeps_a_queue_as_deep_as_its_share() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=1024, initial=512, clock=clock, in_use=lambda: 512,
                          queue_share=1.0)
    limit.observe_server(running=256, waiting=250)  # one wave waits behind the running one
    assert limit.limit == 512
    limit.observe_server(running=256, waiting=300)
    assert limit.limit == 256 + 256


# --- paddleocr-vl's pages per call --------------------------------------------------------
def page_with(labels: list[str]) -> PageResult:
    return PageResult(index=0, width=100, height=100,
                      blocks=[Block(type=label, bbox=[0, 0, 1, 1], text="x") for label in labels],
                      markdown="")


def test_pages_per_call_fill_the_limit_with_the_blocks_a_page_sends() -> None:
    batches = PageBatches(workers=2, per_worker=128, upper=256, timeout=120)
    assert batches.size() == FIXED_BATCH_PAGES  # no gauges yet: the fixed batch
    batches.limit.observe_server(running=0, waiting=0)
    assert batches.limit.mode == "metrics"
    assert batches.size() == math.ceil(batches.limit.limit / 2 / INITIAL_BLOCKS_PER_PAGE)
    for _ in range(40):  # pages of 3 text blocks and 2 pictures, which are not sent
        batches.observe(page_with(["text", "text", "table", "image", "chart"]))
    assert batches.blocks_per_page == pytest.approx(3, abs=0.05)
    batches.limit.limit = 240
    assert batches.size() == 40  # 120 requests per worker, 3 per page
    batches.limit.limit = 10_000
    assert batches.size() == MAX_BATCH_PAGES


def test_requests_in_flight_are_estimated_from_the_calls_and_capped_per_pipeline() -> None:
    batches = PageBatches(workers=2, per_worker=50, upper=256, timeout=120)
    for _ in range(40):
        batches.observe(page_with(["text"] * 10))
    batches.pages_in_calls = lambda: [2, 30]
    assert batches.in_flight() == pytest.approx(20 + 50, abs=1)  # 300 capped at 50


# --- latency mode ------------------------------------------------------------------------
async def test_latency_mode_grows_while_latency_stays_at_its_baseline() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=100, initial=4, clock=clock)
    seen = []
    for _ in range(40):
        await latency_round(limit, clock, lambda n: 2.0)
        seen.append(limit.limit)
    assert limit.mode == "latency"
    assert seen == sorted(seen) and seen[-1] == 100


async def test_latency_mode_shrinks_when_latency_rises() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=100, initial=4, clock=clock)
    for _ in range(40):
        await latency_round(limit, clock, lambda n: 2.0)
    assert limit.limit == 100
    for _ in range(10):
        # The server got busier (another client, say): four times slower at any load.
        await latency_round(limit, clock, lambda n: 8.0)
    assert limit.limit < 20


@pytest.mark.parametrize("capacity", [4, 32])
async def test_latency_mode_settles_against_a_fixed_capacity_server(capacity: int) -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=1024, initial=4, clock=clock)
    seen = []
    for _ in range(150):
        await latency_round(limit, clock, fixed_server(capacity, service=1.0))
        seen.append(limit.limit)
    settled = seen[-50:]
    # Every slot busy with a queue of about one batch: twice the baseline latency.
    assert min(settled) > capacity
    assert max(settled) <= 3 * capacity + 4
    assert max(settled) - min(settled) <= max(2, capacity // 4), settled


async def test_latency_mode_follows_the_server_down_and_back() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=1024, initial=4, clock=clock)
    for _ in range(100):
        await latency_round(limit, clock, fixed_server(32, service=1.0))
    before = limit.limit
    for _ in range(100):
        await latency_round(limit, clock, fixed_server(8, service=1.0))
    assert limit.limit < before / 2
    for _ in range(100):
        await latency_round(limit, clock, fixed_server(32, service=1.0))
    assert limit.limit >= before * 0.8


async def test_latency_near_the_timeout_cuts_the_limit() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=100, initial=40, timeout=100.0, clock=clock)
    await latency_round(limit, clock, lambda n: 70.0)
    assert limit.limit == 28  # one cut for the whole round, not one per request


async def test_failures_cut_the_limit_once_per_round_trip() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=100, initial=50, clock=clock)
    for _ in range(3):
        await latency_round(limit, clock, lambda n: 1.0)
    start = limit.limit

    async def failing() -> None:
        async with limit.slot():
            await asyncio.sleep(0)
            limit.record_failure()

    await asyncio.gather(*(failing() for _ in range(start)))
    assert limit.limit == math.floor(start * 0.7)
    clock.now += 5.0
    limit.record_failure()  # outside any slot, a round trip later: counts
    assert limit.limit == math.floor(math.floor(start * 0.7) * 0.7)


async def test_the_limit_stays_within_its_bounds() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=10, lower=3, initial=50, clock=clock)
    assert limit.limit == 10
    for _ in range(20):
        clock.now += 10
        limit.record_failure()
    assert limit.limit == 3
    for _ in range(20):
        await latency_round(limit, clock, lambda n: 1.0)
    assert limit.limit == 10


async def test_mode_is_metrics_only_while_the_gauges_are_fresh() -> None:
    clock = Clock()
    limit = AdaptiveLimit(upper=10, clock=clock)
    assert limit.mode == "latency"
    limit.observe_server(running=1, waiting=0)
    assert limit.mode == "metrics"
    clock.now += limit.stale_after + 0.1
    assert limit.mode == "latency"


# --- the server's gauges -----------------------------------------------------------------
VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="PaddleOCR-VL-0.9B"} 3.0
vllm:num_requests_running{engine="1",model_name="PaddleOCR-VL-0.9B"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="PaddleOCR-VL-0.9B"} 5.0
vllm:num_requests_waiting{engine="1",model_name="PaddleOCR-VL-0.9B"} 0.0
# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="PaddleOCR-VL-0.9B"} 0.42
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="PaddleOCR-VL-0.9B"} 1.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="PaddleOCR-VL-0.9B"} 7.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="PaddleOCR-VL-0.9B"} 7.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="PaddleOCR-VL-0.9B"} 12.5
"""


def test_parse_vllm_gauges_sums_every_label_set() -> None:
    assert parse_vllm_gauges(VLLM_METRICS) == (7.0, 5.0)


@pytest.mark.parametrize("text", [
    "",
    "# HELP up x\n# TYPE up gauge\nup 1.0\n",
    VLLM_METRICS.replace("vllm:num_requests_waiting{", "other{"),
    'vllm:num_requests_running{model_name="x"} 1.0\nvllm:num_requests_waiting{model_name="x"} oops\n',
])
def test_parse_vllm_gauges_is_none_without_both_gauges(text: str) -> None:
    assert parse_vllm_gauges(text) is None


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[str, dict[str, Any], Callable[[], Awaitable[None]]]]:
    state: dict[str, Any] = {"status": 200, "polls": 0}

    async def metrics(_request: web.Request) -> web.Response:
        state["polls"] += 1
        if state["status"] != 200:
            return web.Response(status=state["status"])
        return web.Response(text=VLLM_METRICS)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}/v1", state, runner.cleanup
    await runner.cleanup()


async def test_poller_feeds_the_gauges_and_falls_back_to_latency_mode(
    metrics_server: tuple[str, dict[str, Any], Callable[[], Awaitable[None]]],
) -> None:
    url, state, stop_server = metrics_server
    limit = AdaptiveLimit(upper=64, initial=20)
    failed: list[BaseException] = []  # the polls that got no answer at all

    async def on_request_exception(_session: aiohttp.ClientSession, _context: Any,
                                   params: aiohttp.TraceRequestExceptionParams) -> None:
        failed.append(params.exception)

    trace = aiohttp.TraceConfig()
    trace.on_request_exception.append(on_request_exception)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        poller = asyncio.create_task(poll_server_gauges(limit, session, url, interval=0.02))
        try:
            await eventually(lambda: limit.mode == "metrics", 30, "metrics mode", every=0.01)
            assert limit.limit == 7 + 2, "7 running and 5 waiting: shrink to running + Q"

            state["status"] = 404
            await eventually(lambda: limit.mode == "latency", 30, "latency mode", every=0.01)

            await stop_server()  # connection refused from now on: the poller lives on
            polls, before = state["polls"], len(failed)
            # A second failed poll after the server went: the first one did not end the poller.
            await eventually(lambda: len(failed) >= before + 2, 30, "two polls to fail", every=0.01)
            assert not poller.done() and state["polls"] == polls
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller


async def test_a_worker_batch_is_not_cut_short_by_calls_that_go_alone() -> None:
    # A document's finish call, or a page retried alone, between the pages of others: the
    # worker keeps it for its next call and fills this one with pages.
    engine = SupervisedEngine(ReaderSpec("unused:Reader"), name="batches", model="-", batch_pages=4)
    engine._jobs = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def job(op: str, solo: bool = False) -> _Job:
        return _Job(op, None, loop.create_future(), solo=solo)

    first, finish, alone = job("pages"), job("finish"), job("pages", solo=True)
    queued = [job("pages"), finish, job("pages"), alone, job("pages"), job("pages")]
    for item in queued:
        engine._jobs.put_nowait(item)
    worker = engine.workers[0]
    batch = engine._take_more(first, worker)
    assert batch == [first, queued[0], queued[2], queued[4]]
    assert worker.carry == [finish, alone] and engine._jobs.qsize() == 1
