"""The replica's one model thread, shared fairly: tenants take turns call by call.

All model work of a replica (every generation step of every stream and batch) runs on one
thread, one call at a time, so steps of different requests interleave instead of one request
holding the model until it ends. A plain FIFO executor shares that thread per *call*: a tenant
with 16 open streams gets 16 turns for every turn of a tenant with one. :class:`FairWorker` keeps
a queue per tenant and serves the tenants round robin, so each tenant with work waiting gets the
thread equally often, whatever number of requests it runs (within a tenant, calls run in the
order they were submitted: a generator's steps, then its close).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class FairWorker:
    """A single worker thread with one FIFO queue per tenant, served round robin."""

    def __init__(self, name: str) -> None:
        self._queues: OrderedDict[str, deque[tuple[Future, Callable[..., Any], tuple[Any, ...]]]] = OrderedDict()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)  # ends with the replica process
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, tenant: str, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the worker thread in ``tenant``'s turn; its result or exception comes in the Future."""
        future: Future = Future()
        with self._ready:
            self._queues.setdefault(tenant, deque()).append((future, fn, args))
            self._ready.notify()
        return future

    def _next(self) -> tuple[Future, Callable[..., Any], tuple[Any, ...]]:
        with self._ready:
            while not self._queues:
                self._ready.wait()
            tenant, queue = self._queues.popitem(last=False)  # the tenant whose turn it is
            call = queue.popleft()
            if queue:
                self._queues[tenant] = queue  # back of the line
            return call

    def _run(self) -> None:
        while True:
            future, fn, args = self._next()
            if not future.set_running_or_notify_cancel():  # its caller stopped waiting before it ran
                continue
            try:
                result = fn(*args)
            except BaseException as err:  # noqa: BLE001 (handed to the caller, whatever it is)
                future.set_exception(err)
            else:
                future.set_result(result)
