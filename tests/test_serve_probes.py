"""Health, readiness and deadlines under load (issue 22).

``/health`` is its own Serve application (serve_app/probe.py): it answers while the model replica
cannot answer anything (its generation thread holds the GIL for seconds). ``/ready`` is the model
replica's: 503 with Retry-After while a lane is full. A request's deadline counts from the
replica's first sight of it, before its body has arrived. The shipped Serve config keeps the
proxy's timeout just after the admission deadline.
"""

import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from greencode.config import PROXY_TIMEOUT_MARGIN_S, AdmissionLimits, ServeConfig, load_yaml, validate
from serve_app.admission import Admission
from serve_helpers import TGI, assert_error, shared_app, tiny_loader

SERVE_APP = "probes"
TIMEOUT_S = 3.0
CONFIG = {"default_gate": "full", "max_batch_size": 4, "batch_wait_timeout_s": 0.01,
          "admission": {"max_active": 1, "max_queued": 1, "request_timeout_s": TIMEOUT_S},
          "limits": {"body_grace_s": 10}}
STEP_S = 0.05  # each forward pass of the probes model sleeps this long (the GIL released, like torch's kernels)
STALL_WORD = " stall"  # a prompt holding it makes the model hold the GIL for STALL_S in one forward pass
STALL_S = 2.0  # below TIMEOUT_S: the stalled request itself still succeeds


def probes_loader(cfg):
    """``tiny_loader``'s model, slowed to STEP_S a step; on STALL_WORD its forward pass holds the GIL for STALL_S
    (the switch interval raised, so no other thread of the replica, its event loop included, runs meanwhile)."""
    lm = tiny_loader(cfg)
    trigger = lm.tokenizer(STALL_WORD)["input_ids"][-1]

    def slow(module, args):
        if bool((args[0] == trigger).any()):
            interval = sys.getswitchinterval()
            sys.setswitchinterval(STALL_S + 5)
            try:
                end = time.perf_counter() + STALL_S
                while time.perf_counter() < end:
                    pass
            finally:
                sys.setswitchinterval(interval)
        time.sleep(STEP_S)

    lm.model.get_input_embeddings().register_forward_pre_hook(slow)
    return lm


@pytest.fixture(scope="module")
def server(request):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loader travels to the replica by value
    yield from shared_app(request, SERVE_APP, lambda: CONFIG, probes_loader)


# --------------------------------------------------------------------------- no Ray


def test_the_shipped_config_times_the_proxy_out_just_after_the_admission_deadline():
    config = load_yaml(Path(__file__).parents[1] / "serve_app" / "config.yaml")
    [model] = [app for app in config["applications"] if app["route_prefix"] == "/"]
    [health] = [app for app in config["applications"] if app["route_prefix"] == "/health"]
    assert health["import_path"] == "serve_app.probe:build_probe" and health["args"] == model["args"]
    cfg = validate(ServeConfig, model["args"])
    assert config["http_options"]["request_timeout_s"] == cfg.proxy_timeout_s
    assert cfg.proxy_timeout_s == cfg.admission.request_timeout_s + PROXY_TIMEOUT_MARGIN_S
    assert cfg.ongoing_requests > cfg.admitted_requests + cfg.limits.max_body_readers  # Serve never holds a burst


def test_the_deadline_counts_from_arrival_and_accepting_says_whether_a_request_would_be_taken():
    async def scenario():
        admission = Admission(AdmissionLimits(max_active=1, max_queued=1, request_timeout_s=10))
        async with admission.slot(arrived=time.monotonic() - 9.5) as late:
            remaining = late.remaining()
            accepting_with_one_working = admission.accepting
            waiter = asyncio.ensure_future(admission.slot(arrived=time.monotonic()).__aenter__())
            await asyncio.sleep(0.01)
            accepting_with_one_waiting = admission.accepting
        await waiter
        return remaining, accepting_with_one_working, accepting_with_one_waiting

    remaining, working, waiting = asyncio.run(scenario())
    assert 0 < remaining <= 0.5 and (working, waiting) == (True, False)


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.ray
def test_health_answers_while_the_model_replica_cannot(server):
    """The model replica holds the GIL for STALL_S: /health (another process) still answers within 1 s each poll,
    with what the model replica described before."""
    before = httpx.get(f"{server}/health", timeout=30).json()
    assert before["status"] == "ok" and before["exit_points"] == [4, 6, 10] and "/" not in str(before["model"])
    stalled: dict[str, float] = {}

    def stall():
        start = time.perf_counter()
        response = httpx.post(f"{server}/generate", json=TGI.body(prompt=f"x{STALL_WORD}", max_new_tokens=1),
                              timeout=60)
        stalled.update(status=response.status_code, seconds=time.perf_counter() - start)

    thread = threading.Thread(target=stall)
    thread.start()
    time.sleep(1.0)  # the stall has begun
    polls = []
    while thread.is_alive() and len(polls) < 8:
        start = time.perf_counter()
        response = httpx.get(f"{server}/health", timeout=10)
        polls.append((response.status_code, time.perf_counter() - start, response.json()))
        time.sleep(0.25)
    thread.join()
    assert stalled["status"] == 200 and stalled["seconds"] >= STALL_S, stalled
    assert len(polls) >= 2, polls  # polled while the model replica stalled
    for status, seconds, body in polls:
        assert status == 200 and seconds < 1.0 and body == before, (status, seconds, body)


@pytest.mark.ray
def test_ready_is_503_with_retry_after_while_a_lane_is_full_and_200_after(server):
    with httpx.Client(base_url=server, timeout=30) as http:
        idle = http.get("/ready")
        assert idle.status_code == 200 and idle.json() == {"status": "ready", "model": idle.json()["model"],
                                                             "streams": "accepting", "batches": "accepting"}
        with http.stream("POST", "/generate_stream", json=TGI.body(max_new_tokens=30)) as first:
            lines = first.iter_lines()
            next(lines)  # streaming: the stream lane's one slot is taken
            queued = threading.Thread(target=httpx.post, args=(f"{server}/generate_stream",),
                                      kwargs={"json": TGI.body(max_new_tokens=1), "timeout": 30})
            queued.start()  # waits in the lane's one queue place
            time.sleep(0.5)
            busy = http.get("/ready")
            rest = list(lines)
        queued.join()
        assert any(line.startswith("data:") for line in rest)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, busy.headers
        assert busy.json() == {"status": "busy", "model": idle.json()["model"], "streams": "full",
                               "batches": "accepting"}
        assert http.get("/ready").status_code == 200


@pytest.mark.ray
def test_the_deadline_counts_from_arrival_not_from_the_end_of_the_body(server):
    """A request whose body takes 2 s to arrive and whose generation would take 7.5 s more: its 503 comes TIMEOUT_S
    after it was sent (not TIMEOUT_S after its body ended), in its client's shape with Retry-After."""
    text = httpx.Request("POST", "/", json=TGI.body(max_new_tokens=150)).content

    def slow_body():
        yield text[:5]
        time.sleep(2.0)
        yield text[5:]

    start = time.perf_counter()
    late = httpx.post(f"{server}/generate", content=slow_body(), headers={"content-type": "application/json"},
                      timeout=30)
    seconds = time.perf_counter() - start
    assert_error(late, 503, "request timeout", TGI)
    assert TIMEOUT_S - 0.2 < seconds < TIMEOUT_S + 1.5, seconds
