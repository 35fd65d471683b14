"""Overload (issue 13): a bounded queue, 429/503 with Retry-After beyond it, /health up, streams not starved.

Unit tests of serve_app/admission.py (asyncio, no Ray), then bursts over real HTTP against one
replica running the default AdmissionLimits (one lane for streams, one for batches; model
work interleaves step by step, so streams keep moving).
"""

import asyncio
import math
import random
import time

import httpx
import pytest

from greencode.config import AdmissionLimits
from serve_app.admission import Admission, Overloaded, TimedOut
from serve_helpers import PROMPT, PROTOCOLS, TGI, assert_error, metric

SERVE_APP = "abuse"
LIMITS = AdmissionLimits()


# --------------------------------------------------------------------------- serve_app/admission.py (no Ray)


def test_slots_are_given_in_arrival_order_and_a_full_queue_is_a_429():
    async def scenario():
        admission = Admission(AdmissionLimits(max_active=2, max_queued=2, request_timeout_s=10))
        releases = [asyncio.Event() for _ in range(4)]
        entered = []

        async def job(i):
            async with admission.slot() as deadline:
                entered.append(i)
                assert 9 < deadline.remaining() <= 10
                await releases[i].wait()

        tasks = [asyncio.create_task(job(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert (entered, admission.active, admission.queued) == ([0, 1], 2, 2)
        with pytest.raises(Overloaded) as refused:
            async with admission.slot():
                pass
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1
        releases[1].set()
        await asyncio.sleep(0.01)
        assert entered == [0, 1, 2]  # the first waiter, not the last
        for event in releases:
            event.set()
        await asyncio.gather(*tasks)
        return entered, admission.active, admission.queued

    assert asyncio.run(scenario()) == ([0, 1, 2, 3], 0, 0)


def test_no_slot_before_the_deadline_is_a_503_and_leaves_the_queue():
    async def scenario():
        admission = Admission(AdmissionLimits(max_active=1, max_queued=4, request_timeout_s=0.05))
        release = asyncio.Event()

        async def holder():
            async with admission.slot():
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        with pytest.raises(TimedOut) as late:
            async with admission.slot():
                pass
        queued = admission.queued
        release.set()
        await task
        return late.value, queued, admission.active

    late, queued, active = asyncio.run(scenario())
    assert late.status == 503 and late.retry_after_s >= 1 and "timeout" in late.message
    assert (queued, active) == (0, 0)


def test_a_cancelled_waiter_gives_up_its_place():
    async def scenario():
        admission = Admission(AdmissionLimits(max_active=1, max_queued=2))
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        holder, waiter = asyncio.create_task(hold()), asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.01)
        queued = admission.queued
        release.set()
        await holder
        return queued, admission.active, waiter.cancelled()

    assert asyncio.run(scenario()) == (0, 0, True)


def test_retry_after_follows_measured_slot_times_and_is_capped():
    async def scenario(cap):
        admission = Admission(AdmissionLimits(max_active=1, max_queued=8, max_retry_after_s=cap), smoothing=1.0)
        assert admission.retry_after_s() == 1  # nothing measured yet
        start = time.monotonic()
        async with admission.slot():
            await asyncio.sleep(0.3)
        held = time.monotonic() - start  # a little more than the slot measured itself
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(6)]  # 1 working, 5 waiting
        await asyncio.sleep(0.01)
        estimate = admission.retry_after_s()
        release.set()
        await asyncio.gather(*tasks)
        return estimate, held

    estimate, held = asyncio.run(scenario(60))
    assert 2 <= estimate <= math.ceil(held * 6)  # the newcomer waits for 6 slot times on 1 slot
    assert asyncio.run(scenario(1))[0] == 1


def test_random_arrivals_timeouts_and_cancels_never_lose_a_slot():
    async def scenario():
        rng = random.Random(0)
        admission = Admission(AdmissionLimits(max_active=2, max_queued=6, request_timeout_s=0.03))
        outcomes = {"ok": 0, "429": 0, "503": 0}

        async def job():
            try:
                async with admission.slot():
                    await asyncio.sleep(rng.uniform(0, 0.03))
                outcomes["ok"] += 1
            except Overloaded:
                outcomes["429"] += 1
            except TimedOut:
                outcomes["503"] += 1

        tasks = []
        for _ in range(120):
            tasks.append(asyncio.create_task(job()))
            pending = [t for t in tasks if not t.done()]  # a finished task cannot be cancelled
            if pending and rng.random() < 0.1:
                rng.choice(pending).cancel()
            await asyncio.sleep(rng.uniform(0, 0.003))
        await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, sum(t.cancelled() for t in tasks), admission.active, admission.queued

    outcomes, cancelled, active, queued = asyncio.run(scenario())
    assert (active, queued) == (0, 0)
    assert sum(outcomes.values()) + cancelled == 120 and cancelled > 0
    assert outcomes["ok"] > 0 and outcomes["429"] + outcomes["503"] > 0


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.ray
def test_a_burst_beyond_the_queue_is_refused_with_retry_after_while_health_answers(server):
    """Capacity + 16 requests at once: each is a 200 or a 429/503 in its client's shape, in time."""
    burst, new_tokens = LIMITS.max_active + LIMITS.max_queued + 16, 24
    calls = [(PROTOCOLS[i % 3], PROTOCOLS[i % 3].body(prompt=f"{PROMPT}# {i}\n", max_new_tokens=new_tokens))
             for i in range(burst)]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=LIMITS.request_timeout_s + 30,
                                     limits=httpx.Limits(max_connections=burst + 4)) as client:
            async def timed(protocol, body):
                start = time.perf_counter()
                response = await client.post(protocol.path, json=body)
                return protocol, response, time.perf_counter() - start

            work = asyncio.gather(*(timed(p, b) for p, b in calls))
            health = []
            while not work.done():
                start = time.perf_counter()
                status = (await client.get("/health", timeout=10)).status_code
                health.append((status, time.perf_counter() - start))
                await asyncio.sleep(0.2)
            return await work, health

    with httpx.Client(base_url=server, timeout=30) as http:
        before = metric(http, "greencode_request_errors_total", status="429")
        answers, health = asyncio.run(run())
        counted = metric(http, "greencode_request_errors_total", status="429") - before
    statuses = [r.status_code for _, r, _ in answers]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(429) + statuses.count(503) >= 1 and statuses.count(200) >= LIMITS.max_active
    for protocol, response, seconds in answers:
        assert seconds < LIMITS.request_timeout_s + 5
        if response.status_code == 200:
            assert protocol.text(response.json()) == " x" * new_tokens
        else:
            assert_error(response, response.status_code, protocol=protocol)
    assert counted == statuses.count(429)
    assert health and all(status == 200 for status, _ in health)
    assert max(seconds for _, seconds in health) < 2.0, health


@pytest.mark.ray
def test_a_stream_is_not_starved_by_a_running_batch(server):
    """A stream opened while a batch generates gets its first token long before the batch ends."""
    batch = [TGI.body(prompt=f"{PROMPT}# {i}\n", max_new_tokens=160) for i in range(8)]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            async def batch_request(body):
                response = await client.post("/generate", json=body)
                return response.status_code, time.perf_counter()

            start = time.perf_counter()
            work = asyncio.gather(*(batch_request(b) for b in batch))
            await asyncio.sleep(0.5)
            opened = time.perf_counter()
            async with client.stream("POST", "/generate_stream", json=TGI.body(max_new_tokens=4)) as response:
                lines = response.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):
                    pass
                first_token = time.perf_counter() - opened
                rest = [line async for line in lines]
            done = await work
            return first_token, max(t for _, t in done) - start, [s for s, _ in done], rest

    first_token, batch_s, statuses, rest = asyncio.run(run())
    assert statuses == [200] * 8 and any(line.startswith("data:") for line in rest)
    assert first_token < 0.25 * batch_s, (first_token, batch_s)


def test_a_freed_slot_goes_to_the_tenant_holding_the_fewest():
    """Alice holds both slots and has two more requests queued; bob's, queued after them, gets the next freed
    slot. With one tenant the order stays arrival order."""
    async def scenario():
        admission = Admission(AdmissionLimits(max_active=2, max_queued=4, request_timeout_s=10))
        releases: dict[str, asyncio.Event] = {}
        entered = []

        async def job(name):
            releases[name] = asyncio.Event()
            async with admission.slot(tenant=name.split("-")[0]):
                entered.append(name)
                await releases[name].wait()

        tasks = []
        for name in ["alice-1", "alice-2", "alice-3", "alice-4", "bob-1"]:
            tasks.append(asyncio.create_task(job(name)))
            await asyncio.sleep(0.01)  # arrival order
        assert (entered, admission.queued) == (["alice-1", "alice-2"], 3)
        releases["alice-1"].set()
        await asyncio.sleep(0.01)
        assert entered[-1] == "bob-1"  # not alice-3, queued before him
        releases["alice-2"].set()
        await asyncio.sleep(0.01)
        assert entered[-1] == "alice-3"  # alice and bob hold one each: arrival order
        for event in releases.values():
            event.set()
        await asyncio.gather(*tasks)
        return entered, admission.active, admission.queued

    assert asyncio.run(scenario()) == (["alice-1", "alice-2", "bob-1", "alice-3", "alice-4"], 0, 0)
