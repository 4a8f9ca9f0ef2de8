"""The bridge between the asyncio server and the continuous-batching ``Generator``.

One engine thread owns the generator: it is the only caller of ``step()`` and ``cancel()``. It sleeps on a
condition while there is no work (no busy spin). Handlers call ``submit`` from the event loop; it checks
capacity (running rows plus a bounded queue), queues the request and returns a ``Handle`` whose events (text
deltas, then exactly one finish) arrive on an ``asyncio.Queue`` through ``loop.call_soon_threadsafe``.
Cancellations are handed to the engine thread and applied between steps, so a step never sees a row change
under it. A row counts against capacity until the engine has actually freed it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from dspark.runtime.generate import Generator, Request, Sequence

log = logging.getLogger("dspark.serve")


class QueueFull(Exception):
    """Every row is busy and the waiting queue is at its bound."""


class EngineStopped(Exception):
    """The engine is shutting down or has failed; no new requests are taken."""


@dataclass
class Handle:
    """One submitted request as the server sees it."""

    seq: Sequence
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class Engine:
    def __init__(self, generator: Generator, max_queue: int = 64,
                 on_finish: Callable[[Sequence], None] | None = None):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.generator = generator
        self.max_queue = max_queue
        self.capacity = generator.max_batch + max_queue
        self.on_finish = on_finish
        self._cond = threading.Condition()
        self._active: dict[int, Handle] = {}  # id(seq) -> handle, until the engine frees the row
        self._cancels: list[Sequence] = []
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)

    # ------------------------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    def in_flight(self) -> int:
        with self._cond:
            return len(self._active)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue ``request``; raises ``QueueFull``, ``EngineStopped`` or the generator's ``DsparkError``."""
        with self._cond:
            if self._stopping or self.error is not None or not self._thread.is_alive():
                raise EngineStopped("the server is shutting down" if self._stopping else "the engine is not running")
            if len(self._active) >= self.capacity:
                raise QueueFull(f"all {self.generator.max_batch} rows are busy and {self.max_queue} requests are waiting")
            holder: list[Handle] = []
            seq = self.generator.submit(request, on_text=lambda delta: holder[0].post(("text", delta)))
            handle = Handle(seq, loop)
            holder.append(handle)
            self._active[id(seq)] = handle
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """The client went away: free the row at the engine's next step (no-op once finished)."""
        with self._cond:
            if id(handle.seq) in self._active and not handle.seq.done:
                self._cancels.append(handle.seq)
                self._cond.notify()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Take no new requests, cancel what is still in flight, let the engine free every row, then join."""
        with self._cond:
            self._stopping = True
            self._cancels.extend(h.seq for h in self._active.values() if not h.seq.done)
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        gen = self.generator
        try:
            while True:
                with self._cond:
                    while not (gen.has_work() or self._cancels or self._stopping):
                        self._cond.wait()
                    cancels, self._cancels = self._cancels, []
                    if self._stopping and not gen.has_work() and not cancels:
                        break
                for seq in cancels:
                    gen.cancel(seq)
                if gen.has_work():
                    gen.step()
                self._retire()
        except BaseException as e:  # a bug in a step: fail every request rather than hang them
            log.exception("the engine failed; every in-flight request gets an error")
            with self._cond:
                self.error = e
                handles, self._active = list(self._active.values()), {}
            for h in handles:
                h.post(("error", f"the engine failed: {type(e).__name__}: {e}"))

    def _retire(self) -> None:
        with self._cond:
            done = [h for h in self._active.values() if h.seq.done_event.is_set()]
            for h in done:
                del self._active[id(h.seq)]
        for h in done:
            if self.on_finish is not None:
                try:
                    self.on_finish(h.seq)
                except Exception:  # metrics must never take the engine down
                    log.exception("on_finish failed")
            h.post(("done", h.seq))
