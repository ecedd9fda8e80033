"""The Triton load generator: keep a fixed number of requests of one shape in flight for a while.

`run_load` measures one setting (batch, concurrency, sequence length) once: throughput over the
measuring window and latency percentiles. gRPC: asynchronous requests from one thread; HTTP: one
client per thread. `costs.measure` repeats it over a grid; benchmarks/serving.py uses it directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from drscaling.cost_stats import SPREAD_LIMIT
from drscaling.errors import DrscalingError
from drscaling.serving import Client, TritonServer


@dataclass
class LoadConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 8)
    duration_s: float = 5.0
    warmup_s: float = 0.5
    seq_len: int = 64
    max_requests: int = 100_000  # per (batch, concurrency) cell: a hard cap besides the duration
    protocol: str = "grpc"
    # Dual towers: queries one at a time (latency), passages in bulk (throughput).
    query_seq_len: int = 32
    query_concurrency: tuple[int, ...] = (1, 8)
    passage_batch: int = 32
    passage_seq_len: int = 128
    passage_concurrency: tuple[int, ...] = (1,)
    repeats: int = 3  # each setting measured this often; the costs use the median
    max_spread: float = SPREAD_LIMIT  # relative spread of a setting's tokens/s above which it is flagged

    def validate(self) -> None:
        if not 1 <= self.repeats <= 50:
            raise DrscalingError(f"repeats must lie in 1..50 (got {self.repeats})")
        if not self.max_spread > 0:
            raise DrscalingError(f"max_spread must be > 0 (got {self.max_spread})")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DrscalingError(f"batch_sizes must be >= 1 (got {self.batch_sizes})")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 256:
            raise DrscalingError(f"concurrency must lie in 1..256 (got {self.concurrency})")
        if not 0 < self.duration_s <= 600:
            raise DrscalingError(f"duration_s must lie in (0, 600] (got {self.duration_s})")
        for name in ("seq_len", "query_seq_len", "passage_seq_len"):
            if getattr(self, name) < 2:
                raise DrscalingError(f"{name} must be >= 2 (got {getattr(self, name)})")
        if self.passage_batch < 1:
            raise DrscalingError(f"passage_batch must be >= 1 (got {self.passage_batch})")
        for name in ("query_concurrency", "passage_concurrency"):
            values = getattr(self, name)
            if not values or min(values) < 1 or max(values) > 256:
                raise DrscalingError(f"{name} must lie in 1..256 (got {values})")
        if self.protocol not in ("http", "grpc"):
            raise DrscalingError(f"protocol must be 'http' or 'grpc' (got '{self.protocol}')")

    def cells(self, tower: str) -> list[tuple[int, int, int]]:
        """(batch, concurrency, seq_len) of every load cell a model of this role is measured at."""
        if tower == "query":
            return [(1, c, self.query_seq_len) for c in self.query_concurrency]
        if tower == "passage":
            return [(self.passage_batch, c, self.passage_seq_len) for c in self.passage_concurrency]
        return [(b, c, self.seq_len) for b in self.batch_sizes for c in self.concurrency]


def run_load(
    url: str | TritonServer, model: str, batch: int, concurrency: int, cfg: LoadConfig,
    seq_len: int | None = None,
) -> dict:
    """Keep `concurrency` fixed [batch, seq_len] requests in flight for cfg.duration_s (after
    cfg.warmup_s); returns throughput and latency. seq_len defaults to cfg.seq_len.

    gRPC: one client, one Python thread, asynchronous requests (each answer sends the next), so
    the load generator takes little CPU from a server on the same host. HTTP: one thread with
    its own client per concurrent request (tritonclient.http clients are bound to their thread)."""
    seq_len = seq_len or cfg.seq_len
    rng = np.random.default_rng(0)
    # Ids below 100 exist in every vocabulary here (train_tokenizer's minimum); inference cost
    # does not depend on which ids they are.
    ids = rng.integers(5, 100, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    book = _LoadBook(concurrency, cfg)
    drive = _drive_async if cfg.protocol == "grpc" else _drive_threads
    drive(url, model, ids, mask, book)
    if book.errors:
        raise DrscalingError(f"load test on '{model}' failed: {book.errors[0]}")
    return book.summary(batch, seq_len, model)


class _LoadBook:
    """The measuring window and what each request slot saw in it."""

    def __init__(self, concurrency: int, cfg: LoadConfig):
        self.concurrency, self.cfg = concurrency, cfg
        self.latencies: list[list[float]] = [[] for _ in range(concurrency)]
        self.first_start = [np.inf] * concurrency  # when each slot's first counted request was sent
        self.last_end = [0.0] * concurrency  # when each slot's last counted request completed
        self.errors: list[str] = []
        self.sent = 0
        self.lock = threading.Lock()
        self.start = self.end = np.inf

    def open_window(self) -> None:
        self.start = time.perf_counter() + self.cfg.warmup_s
        self.end = self.start + self.cfg.duration_s

    def take_ticket(self) -> bool:
        """May one more request be sent? (the hard cap on requests per cell). Hold self.lock."""
        if self.sent >= self.cfg.max_requests or self.errors:
            return False
        self.sent += 1
        return True

    def record(self, slot: int, t0: float, t1: float) -> bool:
        """Count a finished request; True if its slot should send another. Hold self.lock."""
        if t0 >= self.start:  # warm-up requests are not counted
            self.latencies[slot].append(t1 - t0)
            self.first_start[slot] = min(self.first_start[slot], t0)
            self.last_end[slot] = t1
        # Past the window a slot still sends until one request counts: a large model's batch can
        # outlast the whole window (SmolLM2 at batch 32 on a shared CPU).
        return not (t1 >= self.end and self.latencies[slot])

    def summary(self, batch: int, seq_len: int, model: str) -> dict:
        lat = np.array([x for per in self.latencies for x in per])
        if lat.size == 0:
            raise DrscalingError(f"load test on '{model}' completed no request in {self.cfg.duration_s} s")
        # Throughput over the measured window (or until the last request if the count cap hit
        # first); when requests outlast the window, over the span of the counted requests.
        elapsed = max(min(self.cfg.duration_s, time.perf_counter() - self.start),
                      max(self.last_end) - min(self.first_start), 1e-9)
        inferences = lat.size * batch
        return {
            "batch": batch, "concurrency": self.concurrency, "seq_len": seq_len,
            "requests": int(lat.size), "seconds": round(elapsed, 4),
            "inferences_per_s": inferences / elapsed,
            "tokens_per_s": inferences * seq_len / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
        }


def _drive_async(url, model: str, ids: np.ndarray, mask: np.ndarray, book: _LoadBook) -> None:
    with Client(url, "grpc") as client:
        try:
            client.check_ready(model)
            client.prepare(model, ids, mask)()  # connection set up outside the timed window
        except DrscalingError as exc:
            book.errors.append(str(exc))
            return
        submit = client.prepare_async(model, ids, mask)
        idle = threading.Event()
        in_flight = [0]

        def retire() -> None:  # a slot stops sending; hold book.lock
            in_flight[0] -= 1
            if in_flight[0] == 0:
                idle.set()

        def send(slot: int) -> None:
            t0 = time.perf_counter()

            def done(error: DrscalingError | None) -> None:
                t1 = time.perf_counter()
                with book.lock:
                    if error is not None:
                        book.errors.append(str(error))
                    again = error is None and book.record(slot, t0, t1) and book.take_ticket()
                    if not again:
                        retire()
                if again:
                    send(slot)

            try:
                submit(done)
            except DrscalingError as exc:  # the server went away between requests
                with book.lock:
                    book.errors.append(str(exc))
                    retire()

        book.open_window()
        with book.lock:
            slots = [i for i in range(book.concurrency) if book.take_ticket()]
            in_flight[0] = len(slots)
        for slot in slots:
            send(slot)
        if slots and not idle.wait(book.cfg.warmup_s + book.cfg.duration_s + 120):
            book.errors.append(f"requests still unanswered {book.cfg.duration_s + 120:.0f} s after the window")


def _drive_threads(url, model: str, ids: np.ndarray, mask: np.ndarray, book: _LoadBook) -> None:
    ready = threading.Barrier(book.concurrency + 1, action=book.open_window)

    def worker(slot: int) -> None:
        client = None
        try:
            client = Client(url, "http")
            client.check_ready(model)
            send = client.prepare(model, ids, mask)
            send()  # connection set up outside the timed window
        except Exception as exc:  # reported after the barrier, never left hanging
            book.errors.append(str(exc))
            if client is not None:
                client.close()  # an open HTTP connection would delay the server's shutdown
            client = None
        ready.wait()
        if client is None:
            return
        try:
            while True:
                with book.lock:
                    if not book.take_ticket():
                        break
                t0 = time.perf_counter()
                send()
                t1 = time.perf_counter()
                with book.lock:
                    if not book.record(slot, t0, t1):
                        break
        except Exception as exc:
            book.errors.append(str(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(book.concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join(timeout=book.cfg.warmup_s + book.cfg.duration_s + 120)
