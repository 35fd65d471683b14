"""serve_app/fair.py: the model thread's tenants take turns call by call (no Ray)."""

import threading
import time

import pytest

from serve_app.fair import FairWorker


def test_tenants_take_turns_whatever_their_number_of_calls():
    worker = FairWorker("test-fair")
    gate = threading.Event()
    order = []
    worker.submit("busy", gate.wait)  # holds the thread while both queues fill
    for i in range(16):
        worker.submit("busy", order.append, f"busy-{i}")
    calm = [worker.submit("calm", order.append, f"calm-{i}") for i in range(3)]
    gate.set()
    for future in calm:
        future.result(timeout=10)
    # the calm tenant's three calls ran within its first turns, not after the busy tenant's sixteen
    assert sorted(order[:6]) == ["busy-0", "busy-1", "busy-2", "calm-0", "calm-1", "calm-2"], order
    assert all(order[i][:4] != order[i + 1][:4] for i in range(5)), order  # alternating


def test_a_tenants_calls_keep_their_order_and_errors_reach_the_caller():
    worker = FairWorker("test-fair-order")
    seen = []
    futures = [worker.submit("t", seen.append, i) for i in range(50)]
    failing = worker.submit("t", int, "not a number")
    for future in futures:
        future.result(timeout=10)
    assert seen == list(range(50))
    with pytest.raises(ValueError, match="not a number"):
        failing.result(timeout=10)


def test_a_call_cancelled_before_it_runs_is_skipped():
    worker = FairWorker("test-fair-cancel")
    gate = threading.Event()
    worker.submit("t", gate.wait)
    ran = []
    skipped = worker.submit("t", ran.append, "skipped")
    assert skipped.cancel()
    done = worker.submit("t", ran.append, "ran")
    gate.set()
    done.result(timeout=10)
    time.sleep(0.05)
    assert ran == ["ran"]
