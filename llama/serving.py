"""The engine behind the HTTP server: rank 0 decides, every rank decodes.

HTTP handlers (on rank 0, in the web server's thread) hand requests and cancellations to a
`Scheduler`. The engine loop runs on every rank's main thread: at each step rank 0 takes what
arrived and broadcasts it as that step's plan (a one-integer broadcast when nothing did), and
every rank applies the plan to its engine and runs the same step. Rank 0 then hands each
request's token events back to its handler. Shutdown is part of the plan, so every rank
leaves the loop at the same step; a rank that dies makes the others' next collective fail.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llama.distributed import Runtime, stop_cleanly_on_sigterm
from llama.engine import Engine, EngineStats, Request, SamplingParams, TokenEvent
from llama.logits_processing import LogitsParams
from llama.structured import grammar_tokenizer
from llama.streaming import IncrementalDecoder
from llama.tokenizer import Tokenizer

# While nothing runs, rank 0 still broadcasts an empty plan this often, so the other ranks'
# wait never reaches the collective timeout, and checks for shutdown between polls.
IDLE_BROADCAST_S = 1.0
IDLE_POLL_S = 0.05
# After SIGTERM, how long a rank may take to leave with the others before it is ended anyway.
SHUTDOWN_GRACE_S = 10.0
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(Exception):
    """More requests wait than --max_queue allows."""


class ServerStopping(Exception):
    """The server shuts down, or lost a rank, before the request finished."""


@dataclass
class Plan:
    """What every rank applies before one step (decided by rank 0)."""

    submit: list[Request] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    shutdown: bool = False

    def __bool__(self) -> bool:
        return bool(self.submit or self.cancel or self.shutdown)


class Metrics:
    """Prometheus metrics of the serving loop, named as vLLM names its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prefix = "tp_llama:"
        self.running = Gauge(prefix + "num_requests_running", "Requests holding KV cache blocks",
                             registry=self.registry)
        self.waiting = Gauge(prefix + "num_requests_waiting", "Requests waiting to be admitted",
                             registry=self.registry)
        self.kv_cache_usage = Gauge(prefix + "kv_cache_usage_perc", "Fraction of the KV cache pool's blocks in use",
                                    registry=self.registry)
        self.prefix_queries = Counter(prefix + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=self.registry)
        self.prefix_hits = Counter(prefix + "prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=self.registry)
        self.preemptions = Counter(prefix + "num_preemptions", "Sequences preempted for room, to be recomputed",
                                   registry=self.registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generation_tokens = Counter(prefix + "generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter(prefix + "request_success", "Requests finished, by reason", ["finished_reason"],
                                registry=self.registry)
        self.ttft = Histogram(prefix + "time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.itl = Histogram(prefix + "inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram(prefix + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS_S, registry=self.registry)


@dataclass
class Subscription:
    """One request's link from the engine loop back to its HTTP handler's event loop."""

    request: Request
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None

    def push(self, item: TokenEvent | Exception) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    """Rank 0's side: takes requests from handlers (any thread) and gives each step its plan."""

    def __init__(self, max_running: int, max_queue: int, metrics: Metrics) -> None:
        self.capacity = max_running + max_queue
        self.metrics = metrics
        self._ids = itertools.count()
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: dict[int, Subscription] = {}  # submitted, not yet finished
        self.running = 0  # requests holding KV cache blocks after the last step
        self.stopping = threading.Event()

    def new_id(self) -> int:
        return next(self._ids)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def submit(self, requests: list[Request], loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue requests that share one event queue (a prompt list); QueueFull if over capacity."""
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.stopping.is_set():
                raise ServerStopping("the server is shutting down")
            if len(self._live) + len(requests) > self.capacity:
                raise QueueFull
            for request in requests:
                self._live[request.id] = Subscription(request, events, loop)
        for request in requests:
            self._commands.put(("submit", request))
        return events

    def cancel(self, request_id: int) -> None:
        self._commands.put(("cancel", request_id))

    def next_plan(self, idle: bool) -> Plan:
        """What arrived since the last step. While the engine is idle, wait for something (up to
        IDLE_BROADCAST_S); otherwise take only what is already there."""
        plan = Plan()
        deadline = time.monotonic() + (IDLE_BROADCAST_S if idle else 0.0)
        while True:
            try:
                kind, value = self._commands.get(timeout=IDLE_POLL_S) if idle else self._commands.get_nowait()
                (plan.submit if kind == "submit" else plan.cancel).append(value)
                idle = False  # something came: take the rest without waiting
                continue
            except queue.Empty:
                pass
            if plan or self.stopping.is_set() or time.monotonic() >= deadline:
                break
        plan.shutdown = self.stopping.is_set()
        return plan

    def deliver(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        with self._lock:
            for event in events:
                sub = self._live.get(event.request_id)
                if sub is None:  # a cancellation of a request that had already finished
                    continue
                if event.token is not None:
                    self.metrics.generation_tokens.inc()
                    if sub.last_token_at is None:
                        self.metrics.ttft.observe(now - sub.arrival)
                    else:
                        self.metrics.itl.observe(now - sub.last_token_at)
                    sub.last_token_at = now
                if event.finish_reason is not None:
                    del self._live[event.request_id]
                    self.metrics.requests.labels(event.finish_reason).inc()
                    self.metrics.e2e.observe(now - sub.arrival)
                sub.push(event)

    def record(self, stats: EngineStats) -> None:
        """The engine's state after a step, in the metrics (counters from its running totals)."""
        metrics = self.metrics
        self.running = stats.running
        metrics.running.set(stats.running)
        metrics.waiting.set(max(0, self.in_flight - stats.running))
        metrics.kv_cache_usage.set(stats.blocks_used / stats.blocks_total)
        for counter, total in ((metrics.prefix_queries, stats.prefix_queried_tokens),
                               (metrics.prefix_hits, stats.prefix_hit_tokens),
                               (metrics.preemptions, stats.preemptions)):
            counter.inc(total - counter._value.get())

    def fail_all(self, error: Exception) -> None:
        """End every unfinished request with `error` (shutdown, or a lost rank)."""
        with self._lock:
            for sub in self._live.values():
                sub.push(error)
            self._live.clear()


def share_plan(plan: Plan | None, runtime: Runtime) -> Plan:
    """Rank 0's plan on every rank: one small broadcast, and the plan itself only when not empty."""
    if runtime.world_size == 1:
        return plan
    flag = torch.tensor([int(bool(plan)) if runtime.is_main else 0], device=runtime.device)
    dist.broadcast(flag, src=0)
    if not flag.item():
        return Plan()
    shared = [plan]
    dist.broadcast_object_list(shared, src=0, device=runtime.device)
    return shared[0]


def run_engine_loop(engine: Engine, runtime: Runtime, scheduler: Scheduler | None) -> None:
    """Serve until rank 0's scheduler is told to stop; every rank calls it (only rank 0 passes
    a scheduler). SIGINT and SIGTERM start a clean shutdown: torchrun forwards them to every
    rank, but only rank 0's decides the step at which all ranks leave."""
    def on_signal() -> None:
        if scheduler is not None:
            scheduler.stopping.set()

    stop_cleanly_on_sigterm(on_signal, SHUTDOWN_GRACE_S)
    try:
        while True:
            plan = share_plan(scheduler.next_plan(idle=not engine.busy) if scheduler else None, runtime)
            for request in plan.submit:
                engine.submit(request)
                if scheduler:
                    scheduler.metrics.prompt_tokens.inc(len(request.prompt))
            cancelled = [e for e in map(engine.cancel, plan.cancel) if e is not None]
            if plan.shutdown:
                break
            events = cancelled + engine.step()
            if scheduler:
                scheduler.deliver(events)
                scheduler.record(engine.stats())
    except BaseException:
        if scheduler:
            scheduler.stopping.set()
            scheduler.fail_all(ServerStopping("the server lost a rank or failed; the request was not completed"))
        raise
    if scheduler:
        scheduler.fail_all(ServerStopping("the server shut down before the request finished"))


class TextStream:
    """A request's text as its tokens arrive, cut before the first stop string. Text that
    might still become a stop string is held back, so a stop string is never partly sent."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of it already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that may be sent now; after a stop string, `stopped` is set."""
        self.text += self.decoder.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once no more tokens come."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # Held-back text guarantees no stop string starts before what was sent.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def longest_prompt(engine: Engine) -> int:
    """Tokens of the longest prompt the engine takes: one new token must fit within max_seq_len
    and within the whole KV cache pool."""
    return min(engine.max_seq_len, engine.capacity_tokens) - 1


def warm_up(engine: Engine) -> float:
    """Run greedy and sampled requests, with and without logits processing, through the
    engine before serving, so that the first client does not pay for compilation (and CUDA
    graph capture) of any step variant; and then the last chunk of the longest prompt the
    server accepts, so that a prefill too large for the device's memory fails here, at start,
    rather than on a client's request (taking every rank down). Returns the seconds it took."""
    start = time.perf_counter()
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    processed = LogitsParams(top_logprobs=1)  # a grammar would take the same variant
    tokenizer = engine.sampler.processor.tokenizer
    if tokenizer is not None:  # the grammar engine's view of the vocabulary (1 s for Llama 3's)
        grammar_tokenizer(tokenizer)
    # One after the other: a step with any sampled row runs the sampled variant for all rows,
    # and one with any row asking for logits processing (penalties, grammars...) that variant.
    for i, (sampling, logits) in enumerate([(greedy, LogitsParams()), (sampled, LogitsParams()),
                                            (greedy, processed), (sampled, processed)]):
        engine.submit(Request(-1 - i, [0], 3, frozenset(), sampling, logits))
        while engine.busy:
            engine.step()
    engine.prefill_last_chunk([0] * longest_prompt(engine))
    return time.perf_counter() - start
