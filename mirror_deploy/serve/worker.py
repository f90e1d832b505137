"""One engine, one thread: requests wait in a bounded queue and run one at a time (the compiled graphs and
their KV buffers belong to one generation at a time). Results travel back to the asyncio side as events."""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine
from .text import StopText

log = logging.getLogger("mirror_deploy.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    tokens: list[int]
    text: str
    finish_reason: str          # stop | length | cancelled
    summary: dict
    seconds: float              # engine time
    waited: float               # time in the queue


@dataclass
class Failed:
    error: BaseException


@dataclass
class Job:
    ids: list[int]
    cfg: GenerationConfig
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    stream: bool = True                 # send text as it commits (else only the result: fewer wake-ups)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def send(self, event) -> None:
        """Hand an event to the request's coroutine (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:    # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


_STOP = object()


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int, on_done=None):
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.on_done = on_done or (lambda done: None)
        self.busy = False
        self.closing = False
        self._mean_seconds = 1.0          # running estimate of one generation, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        """Requests waiting (not counting the one generating)."""
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ShuttingDown()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, math.ceil(self._mean_seconds * (self.depth() + 1)))) from None

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread (the server drains before it gets here)."""
        self.closing = True
        if self._thread.is_alive():
            self.jobs.put(_STOP)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                return
            self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        waited = time.perf_counter() - job.enqueued_at
        if job.cancelled.is_set():          # the client left while its request waited
            return
        text = StopText(self.engine.tokenizer, job.stops)

        def on_tokens(new: list[int]) -> bool:
            delta = text.push(new)
            if delta and job.stream:
                job.send(Delta(delta))
            return text.stopped or job.cancelled.is_set()

        t0 = time.perf_counter()
        try:
            result = self.engine.generate(job.ids, job.cfg, on_tokens=on_tokens)
        except Exception as error:          # reported to the client; the engine stays up for the next one
            log.exception("generation failed")
            job.send(Failed(error))
            return
        seconds = time.perf_counter() - t0
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        tail = text.finish()
        if tail and job.stream:
            job.send(Delta(tail))
        done = Done(result.tokens, text.text, self._finish_reason(job, text, result.tokens), result.summary,
                    seconds, waited)
        self.on_done(done)
        job.send(done)

    def _finish_reason(self, job: Job, text: StopText, tokens: list[int]) -> str:
        if text.stopped or (tokens and tokens[-1] in self.engine.eos and job.cfg.stop_at_eos):
            return "stop"
        if job.cancelled.is_set() and len(tokens) < job.cfg.max_new_tokens:
            return "cancelled"
        return "length"
