"""Dynamic micro-batching: concurrent requests share one padded forward pass.

Requests wait in a bounded asyncio queue. One worker task takes the first waiting request, then
whatever else is already waiting, then, while other requests are on their way (announced with
`arriving`: reading their histories), waits up to max_wait for more, until max_batch_size. The
batch runs in a single worker thread, so the event loop keeps accepting and answering requests
while the model computes (PyTorch releases the GIL inside its kernels). Requests that arrive during
a forward pass queue up, so under load batches fill without any waiting; at low load a request
waits at most max_wait, and a lone request not at all (it waited the whole max_wait before: 2.1 of
the 11 ms of a 4-layer request at concurrency 1, docs/benchmarks.md).

A request that is alone (nothing queued, no batch gathered or running, no other request on its way)
has nothing to batch with, so with `lone_on_loop` its pass runs on the event loop's own thread: no hop
to the worker thread and back, and no sleeping thread to wake on either side of the pass (0.27-0.36 ms
of a 4-layer request at concurrency 1, docs/benchmarks.md "The lone request's pass"). Meanwhile the
loop reads nothing; requests that come in during that pass are read after it, find each other on their
way and are batched by the worker as before. The request's deadline is not checked during such a
pass: its answer comes when the pass is done, where a pass in the worker thread gets its 504 at the
deadline (and runs on; a pass cannot be interrupted).

A full queue refuses new requests at once (Overloaded, 503) instead of letting latency grow without
bound. A request whose caller gave up (timeout, disconnect) is dropped before its forward pass.

A failed forward pass fails its own requests only. Should the worker itself end other than by stop()
(a bug), `on_death` is called: the server then reports itself unready and exits, so that its
supervisor (Kubernetes) restarts it instead of it accepting requests that nobody will answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service import metrics

log = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")


class Overloaded(RuntimeError):
    """The queue is full (or the batcher is stopping): the client should retry later."""


@dataclass
class Pending:
    job: Any
    future: asyncio.Future
    enqueued_at: float


class Batcher(Generic[Job, Result]):
    def __init__(self, run_batch: Callable[[Sequence[Job]], Sequence[Result]], max_batch_size: int,
                 max_wait_s: float, queue_size: int, thread_initializer: Callable[[], None] | None = None,
                 on_death: Callable[[str], None] | None = None, lone_on_loop: bool = False):
        self.run_batch = run_batch  # jobs -> one result per job, in order; in the worker thread (or the loop's)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(queue_size)
        # One thread: forward passes run one after another, each using all of torch's threads.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cllm4rec-forward", initializer=thread_initializer)
        self.thread_initializer = thread_initializer
        self.lone_on_loop = lone_on_loop
        self.worker_idle = True  # the worker waits for a first request: no batch is gathered or running
        self.worker: asyncio.Task | None = None
        self.on_death = on_death
        self.stopping = False
        self.on_their_way = 0  # requests announced by `arriving` that have not submitted yet

    def start(self) -> None:
        if self.lone_on_loop and self.thread_initializer is not None:
            self.thread_initializer()  # lone requests' passes run on this thread
        self.worker = asyncio.get_running_loop().create_task(self.work(), name="cllm4rec-batcher")
        self.worker.add_done_callback(self.worker_ended)
        metrics.batcher_alive.set(1)

    @property
    def alive(self) -> bool:
        return self.worker is not None and not self.worker.done()

    def worker_ended(self, worker: asyncio.Task) -> None:
        metrics.batcher_alive.set(0)
        if self.stopping:
            return
        reason = ("the forward-pass worker was cancelled" if worker.cancelled() else
                  f"the forward-pass worker died: {worker.exception()!r}")
        log.critical("%s; the server stops so that it is restarted", reason)
        if self.on_death is not None:
            self.on_death(reason)

    async def stop(self) -> None:
        self.stopping = True
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self, n: int = 1) -> Iterator[None]:
        """n requests on their way to submit (reading what their prompts need) meanwhile: a batch waits
        for them, up to max_wait, instead of running without them."""
        self.on_their_way += n
        try:
            yield
        finally:
            self.on_their_way -= n

    def refuse_unless_serving(self) -> None:
        if self.worker is None or self.worker.done():
            raise Overloaded("the model is not serving (starting up or shutting down)")

    async def submit(self, job: Job, siblings: bool = False) -> Result:
        """The job's result, computed in a batch with whatever else is waiting. `siblings`: other jobs of the
        same call are submitted with this one (a POST /recommend/batch), so it is never alone."""
        self.refuse_unless_serving()
        if self.lone_on_loop and not siblings and self.worker_idle and self.queue.empty() and not self.on_their_way:
            return self.run_lone(job)
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Pending(job, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue.maxsize} requests are already waiting for the model") from None
        return await future  # a caller that is cancelled cancels the future: the worker skips it

    async def warm_up(self, job: Job) -> None:
        """`job` through the worker thread and, where lone requests run on the loop, on the loop's thread."""
        self.refuse_unless_serving()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, [job])
        if self.lone_on_loop:
            self.run_batch([job])

    async def next_batch(self) -> list[Pending]:
        self.worker_idle = True
        batch = [await self.queue.get()]
        self.worker_idle = False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            if not self.on_their_way:  # nothing is coming: waiting would only delay this batch
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def work(self) -> None:
        while True:
            # A call per batch: nothing of a finished batch stays referenced while the worker waits
            # for the next one (its jobs hold their model, which a reload must be able to free).
            await self.run(await self.next_batch())

    async def run(self, batch: list[Pending]) -> None:
        if not batch:
            return
        started = self.observe_start([p.enqueued_at for p in batch])
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch,
                                                                       [p.job for p in batch])
        except Exception as e:  # a failed batch fails its own requests, not the server
            log.exception("forward pass of a batch of %d failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        finally:
            metrics.model_forward_duration.observe(time.perf_counter() - started)
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result(result)

    def run_lone(self, job: Job) -> Result:
        """A lone request's pass, on the event loop's thread; its failure is its own, as in a batch."""
        started = self.observe_start([time.perf_counter()])
        try:
            return self.run_batch([job])[0]
        finally:
            metrics.model_forward_duration.observe(time.perf_counter() - started)

    @staticmethod
    def observe_start(enqueued_at: list[float]) -> float:
        """A pass starts now: each request's wait and the batch's size go to the metrics."""
        started = time.perf_counter()
        for enqueued in enqueued_at:
            metrics.batch_queue_wait.observe(started - enqueued)
        metrics.batch_size.observe(len(enqueued_at))
        return started
