"""Backpressure for one replica: a bounded queue in front of model work, and a deadline per request.

TGI refuses beyond ``max_concurrent_requests``, Ollama beyond ``OLLAMA_MAX_QUEUE``; without a
bound every request is accepted and all of them get slow together. :class:`Admission` lets
``max_active`` requests work at once and ``max_queued`` wait; the next one is refused at once with
:class:`Overloaded` (429). A freed slot goes to the waiting request whose tenant holds the fewest
slots, in arrival order among equals: a tenant with many requests queued does not keep the slots
that another tenant's request has been waiting for (with one tenant, this is arrival order).
A request that cannot get a slot before its deadline gets :class:`TimedOut` (503);
``Deadline.remaining()`` bounds the work after admission. Both carry ``retry_after_s`` for the
Retry-After header: the measured mean time a slot was held times the queue ahead, per slot (1 s
before anything was measured), clamped to
``[1, max_retry_after_s]``.

One instance per lane (e.g. streams and batches), all on the replica's event loop (not
thread-safe, and need not be). The limits are deployment config: ``ServeConfig.admission``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from greencode.config import AdmissionLimits


class Refused(Exception):
    """Base of the refusals; ``status`` and ``retry_after_s`` go into the HTTP response."""

    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class Overloaded(Refused):
    status = 429


class TimedOut(Refused):
    status = 503


@dataclass
class Deadline:
    at: float  # time.monotonic() value

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


class Admission:
    """Bounded admission for one lane: ``async with admission.slot() as deadline: ...``."""

    def __init__(self, limits: AdmissionLimits, smoothing: float = 0.2) -> None:
        self.limits = limits
        self.smoothing = smoothing
        self.active = 0
        self._held: Counter[str] = Counter()  # slots held per tenant
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()  # in arrival order
        self._mean_hold_s: float | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def accepting(self) -> bool:
        """Whether a request arriving now would get a slot or a place in the queue (not a 429)."""
        return self.active < self.limits.max_active or self.queued < self.limits.max_queued

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free for a newcomer, from measured slot times."""
        per_slot = self._mean_hold_s if self._mean_hold_s is not None else 1.0
        estimate = math.ceil(per_slot * (self.queued + 1) / self.limits.max_active)
        return int(min(max(1, estimate), self.limits.max_retry_after_s))

    @asynccontextmanager
    async def slot(self, arrived: float | None = None, tenant: str = "") -> AsyncIterator[Deadline]:
        """Hold one slot for ``tenant`` while the body runs; raises Overloaded (queue full) or TimedOut (no slot
        in time).

        The deadline is ``request_timeout_s`` after ``arrived`` (a ``time.monotonic()`` value: when the replica
        first saw the request, before its body was read), or after now."""
        deadline = Deadline((time.monotonic() if arrived is None else arrived) + self.limits.request_timeout_s)
        if self.active >= self.limits.max_active or self._waiters:
            await self._wait(deadline, tenant)
        else:
            self.active += 1
            self._held[tenant] += 1
        start = time.monotonic()
        try:
            yield deadline
        finally:
            self._observe(time.monotonic() - start)
            self._release(tenant)

    async def _wait(self, deadline: Deadline, tenant: str) -> None:
        if len(self._waiters) >= self.limits.max_queued:
            raise Overloaded(f"the server is busy: {self.active} requests running and {self.queued} waiting; "
                             "retry later", self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tenant, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), deadline.remaining())
        except (asyncio.TimeoutError, asyncio.CancelledError) as err:
            if waiter.done() and not waiter.cancelled():
                self._release(tenant)  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(entry)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise TimedOut(f"no capacity within the request timeout of {self.limits.request_timeout_s:g} s; "
                           "retry later", self.retry_after_s()) from None

    def _release(self, tenant: str) -> None:
        """Hand ``tenant``'s slot to the live waiter whose tenant holds the fewest slots, the earliest among
        equals (active stays the same), or free it."""
        self._held[tenant] -= 1
        live = [entry for entry in self._waiters if not entry[1].done()]
        if live:
            entry = min(live, key=lambda e: self._held[e[0]])  # min keeps the first of equals: arrival order
            self._waiters.remove(entry)
            self._held[entry[0]] += 1
            entry[1].set_result(None)
            return
        self._waiters.clear()
        self.active -= 1

    def _observe(self, held_s: float) -> None:
        if self._mean_hold_s is None:
            self._mean_hold_s = held_s
        else:
            self._mean_hold_s += self.smoothing * (held_s - self._mean_hold_s)
