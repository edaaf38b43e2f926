"""One model, many clients: a bounded queue drained by a single worker thread that batches.

Every request becomes a :class:`Job`. The worker takes the oldest job, gathers the queued jobs
that can share its engine call (same ``n`` and sampling parameters) up to ``max_batch_sequences``
sequences, and runs them as one batched ``engine.generate`` — so concurrent clients share the
prefill and every decode step; majority votes (``majority@K``) share a call with the votes
of the same K and parameters. Jobs that cannot share (a fixed ``seed``, whose samples must not
depend on other traffic, and PaCoRe runs) run alone. At most ``max_pending`` jobs are queued or
running; :meth:`Batcher.submit` refuses the next one with :class:`QueueFull` (HTTP 429), which
bounds the server's memory whatever the load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from step3vl.api import vote
from step3vl.rl.rollout import Prompt, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """``max_pending`` jobs are already queued or running."""


@dataclass(eq=False)
class Job:
    """One request's work: ``n`` samples of ``prompt``, ``n`` PaCoRe runs when ``pacore_rounds`` is set, or ``n``
    majority votes over ``vote_k`` samples each.

    ``future`` resolves to ``list[Completion]`` (or ``list[PaCoReResult]``, or ``list[Vote]``, one per choice).
    """

    prompt: Prompt
    n: int
    params: SamplingParams
    pacore_rounds: tuple[int, ...] | None = None
    vote_k: int | None = None  # majority@K: K samples per choice, voted
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[Any, ...]:
        if self.pacore_rounds is not None or self.params.seed is not None:
            return ("alone", id(self))
        if self.vote_k is not None:
            return ("vote", self.n, self.vote_k, self.params)
        return ("batch", self.n, self.params)

    @property
    def sequences(self) -> int:
        if self.pacore_rounds is not None:
            return self.n * sum(self.pacore_rounds)
        return self.n * (self.vote_k or 1)


class Batcher:
    """Owns the engine: only its worker thread ever calls it."""

    def __init__(self, engine: Any, *, max_pending: int, max_batch_sequences: int, batch_wait_s: float = 0.005,
                 pacore_seed: int = 0) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self.max_batch_sequences = max_batch_sequences
        self.batch_wait_s = batch_wait_s
        self._pacore_seed = pacore_seed
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="step3vl-batcher", daemon=True)
        self.stats = {"batches": 0, "jobs": 0, "sequences": 0, "largest_batch_jobs": 0}

    # ------------------------------------------------------------------ client side

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, finish the queued ones, join the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are already queued or running (limit {self.max_pending})")
            self._pending += 1
            self._queue.append(job)
            self._cv.notify()
        return job.future

    # ------------------------------------------------------------------ worker side

    def _take_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            was_alone = not self._queue
        shares = first.key[0] in ("batch", "vote")
        if shares and was_alone and self.batch_wait_s:
            # an idle server: give clients that started at the same moment a chance to join
            time.sleep(self.batch_wait_s)
        batch, total = [first], first.sequences
        if shares:
            with self._cv:
                keep: deque[Job] = deque()
                while self._queue:
                    job = self._queue.popleft()
                    if job.key == first.key and total + job.sequences <= self.max_batch_sequences:
                        batch.append(job)
                        total += job.sequences
                    else:
                        keep.append(job)
                self._queue = keep
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            outcomes = self._run(batch)
            with self._cv:
                self._pending -= len(batch)
            self.stats["batches"] += 1
            self.stats["jobs"] += len(batch)
            self.stats["sequences"] += sum(j.sequences for j in batch)
            self.stats["largest_batch_jobs"] = max(self.stats["largest_batch_jobs"], len(batch))
            for job, (ok, value) in zip(batch, outcomes):
                if job.future.set_running_or_notify_cancel():
                    (job.future.set_result if ok else job.future.set_exception)(value)

    def _run(self, batch: list[Job]) -> list[tuple[bool, Any]]:
        first = batch[0]
        try:
            if first.pacore_rounds is not None:
                return [(True, self._pacore(first))]
            if first.vote_k is not None:  # every job's n choices, K samples each, in one call
                groups = self.engine.generate([j.prompt for j in batch for _ in range(j.n)], first.vote_k,
                                              first.params)
                votes = [vote(g) for g in groups]
                return [(True, votes[i * first.n:(i + 1) * first.n]) for i in range(len(batch))]
            out = self.engine.generate([j.prompt for j in batch], first.n, first.params)
            return [(True, r) for r in out]
        except Exception as e:  # one bad job must not fail the others batched with it
            if len(batch) == 1:
                log.warning("generation failed: %s", e)
                return [(False, e)]
            return [self._run([j])[0] for j in batch]

    def _pacore(self, job: Job) -> list[Any]:
        from step3vl.pacore.inference import pacore_generate

        seed = job.params.seed if job.params.seed is not None else self._next_seed()
        return pacore_generate(self.engine, [job.prompt] * job.n, list(job.pacore_rounds or ()), job.params,
                               seed=seed)

    def _next_seed(self) -> int:
        self._pacore_seed += 1
        return self._pacore_seed
