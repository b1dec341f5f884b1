"""Decode requests that arrive together as one batch (the server's decoding worker).

Request threads call :meth:`Batcher.generate`, which has the signature of
``decoding.greedy_generate`` (so ``generate.answer_questions`` takes it as its ``generate_fn``):
the prompts join a bounded queue and the caller waits. One worker thread takes the waiting jobs
in arrival order, up to ``max_batch`` prompts, and decodes them in one ``greedy_generate`` call
with one KV cache. Jobs that retrieve per chunk (a ``neighbors_fn``) and jobs that do not are
decoded in separate calls (the former also only with jobs of the same ``max_new_tokens``);
within a call, row ``b``'s neighbor requests go to its own job's
function with the job's own row number. Each job decodes up to its own ``max_new_tokens`` (the
call runs to the largest; a row's greedy tokens do not depend on the other rows, so its first
``n`` tokens are the ones it would get alone).

A full queue raises :class:`Busy` at once (the server answers 503 with Retry-After).
``max_batch=1`` decodes each job alone (batching off, for comparison).
"""

from __future__ import annotations

import collections
import threading
import time

from .decoding import greedy_generate


class Busy(Exception):
    """The decoding queue is full."""


class _Job:
    __slots__ = ("prompts", "max_new_tokens", "eod_id", "pad_id", "neighbors_fn", "done", "result", "error")

    def __init__(self, prompts, max_new_tokens, eod_id, neighbors_fn, pad_id=None):
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = int(max_new_tokens)
        self.eod_id = eod_id
        self.pad_id = pad_id
        self.neighbors_fn = neighbors_fn
        self.done = threading.Event()
        self.result = None
        self.error = None


def _submit(owner, job: _Job, what: str):
    """Queue ``job`` on ``owner`` (a :class:`Batcher` or :class:`Coalescer`: ``_jobs``,
    ``_cond``, ``max_queue``), wake its worker, and wait for the result; a full queue raises
    :class:`Busy` naming ``what``."""
    with owner._cond:
        if len(owner._jobs) >= owner.max_queue:
            raise Busy(f"the {what} queue is full ({owner.max_queue} requests waiting)")
        owner._jobs.append(job)
        owner._cond.notify()
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.result


class Batcher:
    """A bounded queue of decoding jobs and the worker thread that batches them."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 64, decode=greedy_generate,
                 gather_s: float = 0.0):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.model = model
        self.gather_s = gather_s  # after the first job, wait this long for more (batching on only)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.decode = decode
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self.batches = 0  # decode calls made, and the prompts they held (for /health)
        self.prompts = 0
        self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def generate(self, model, prompts, max_new_tokens, eod_id, neighbors_fn=None, pad_id=None):
        """Queue the prompts, wait for their new tokens (``greedy_generate``'s contract)."""
        if not prompts:
            return []
        return _submit(self, _Job(prompts, max_new_tokens, eod_id, neighbors_fn, pad_id), "decoding")

    @staticmethod
    def _kind(job: _Job) -> tuple:
        """Jobs of one kind share a decode call. With per-chunk retrieval the length must match
        too, so that no row is asked for neighbors past the tokens it would decode alone."""
        if job.neighbors_fn is None:
            return (job.eod_id, job.pad_id, False, None)
        return (job.eod_id, job.pad_id, True, job.max_new_tokens)

    def _take(self) -> list[_Job]:
        """The next batch: the oldest job, then later jobs of the same kind that fit."""
        with self._cond:
            while not self._jobs:
                self._cond.wait()
            if self.max_batch > 1 and self.gather_s > 0:  # let requests arriving together meet
                deadline = time.monotonic() + self.gather_s
                while sum(len(j.prompts) for j in self._jobs) < self.max_batch and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
            first = self._jobs.popleft()
            batch, n = [first], len(first.prompts)
            kind = self._kind(first)
            rest = collections.deque()
            while self._jobs:
                job = self._jobs.popleft()
                if self._kind(job) == kind and n + len(job.prompts) <= self.max_batch:
                    batch.append(job)
                    n += len(job.prompts)
                else:
                    rest.append(job)
            self._jobs.extendleft(reversed(rest))  # the others keep their order at the front
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                self._decode(batch)
            except BaseException as exc:  # the callers get the error; the worker goes on
                for job in batch:
                    job.error = exc
            for job in batch:
                job.done.set()

    def _decode(self, batch: list[_Job]) -> None:
        prompts, owner = [], []  # owner[b] = (job, its own row)
        for job in batch:
            for r, p in enumerate(job.prompts):
                prompts.append(p)
                owner.append((job, r))
        fn = None
        if batch[0].neighbors_fn is not None:
            def fn(b, j, chunk_tokens):
                job, r = owner[b]
                return job.neighbors_fn(r, j, chunk_tokens)
        longest = max(job.max_new_tokens for job in batch)
        pad = {} if batch[0].pad_id is None else {"pad_id": batch[0].pad_id}  # the tokenizer's pad
        outs = self.decode(self.model, prompts, longest, batch[0].eod_id, neighbors_fn=fn, **pad)
        self.batches += 1
        self.prompts += len(prompts)
        b = 0
        for job in batch:
            job.result = [list(outs[b + r])[: job.max_new_tokens] for r in range(len(job.prompts))]
            b += len(job.prompts)


class Coalescer:
    """Calls ``fn(items) -> rows`` once for the items of every caller waiting together.

    The retrieval queries of concurrent requests are embedded in one encoder call this way
    (``fn`` is ``Encoder.encode``): callers pass lists of items and get their own rows back, in
    order. At most ``max_items`` items per call (a caller's list is never split); a full queue
    raises :class:`Busy`. ``max_items=1`` calls ``fn`` for each caller alone.
    """

    def __init__(self, fn, max_items: int = 32, max_queue: int = 64, name: str = "coalescer", gather_s: float = 0.0):
        if max_items < 1 or max_queue < 1:
            raise ValueError("max_items and max_queue must be >= 1")
        self.fn = fn
        self.gather_s = gather_s
        self.max_items = max_items
        self.max_queue = max_queue
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, items):
        items = list(items)
        job = _Job([], 0, None, None)
        job.prompts = items
        return _submit(self, job, "retrieval")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                if self.max_items > 1 and self.gather_s > 0:
                    deadline = time.monotonic() + self.gather_s
                    while sum(len(j.prompts) for j in self._jobs) < self.max_items and time.monotonic() < deadline:
                        self._cond.wait(deadline - time.monotonic())
                batch = [self._jobs.popleft()]
                n = len(batch[0].prompts)
                while self._jobs and n + len(self._jobs[0].prompts) <= self.max_items:
                    job = self._jobs.popleft()
                    batch.append(job)
                    n += len(job.prompts)
            try:
                rows = self.fn([x for job in batch for x in job.prompts])
                b = 0
                for job in batch:
                    job.result = rows[b:b + len(job.prompts)]
                    b += len(job.prompts)
            except BaseException as exc:
                for job in batch:
                    job.error = exc
            for job in batch:
                job.done.set()
