"""A small load harness for the chaos tests: K concurrent client streams that retry the way a careful user would.

Each stream runs through the real gRPC client (`router.client.Client`). An attempt either completes (then its
chunks must be gap-free and duplicate-free, and its tokens identical to a fault-free reference run) or fails; a
failure must carry a retryable status (UNAVAILABLE or RESOURCE_EXHAUSTED) with a message, and is retried from
scratch on the next router after the server's retry hint. Every wait is bounded: a stream that neither completes
nor fails within its deadline is reported as hung.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from router.client import Chunk, Client, RaylaneError

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
MAX_RETRY_PAUSE_S = 2.0
"""Cap on the pause a retry hint can ask for, so a scenario's time stays bounded."""


@dataclass(kw_only=True, frozen=True)
class StreamSpec:
    """One stream of the load: greedy, `ignore_eos`, so its output is fixed by its prompt."""

    deployment: str
    """Deployment the stream asks for."""
    prompt: str
    """Text prompt."""
    tenant: str
    """Tenant whose key the stream uses."""
    max_tokens: int = 24
    """Tokens to generate; the stream must end with exactly these."""


@dataclass
class StreamResult:
    """What one stream went through: every failed attempt, then the tokens of the attempt that completed."""

    spec: StreamSpec
    failures: list[RaylaneError] = field(default_factory=list)
    tokens: list[int] | None = None
    """The completed attempt's tokens; None if no attempt completed."""
    broken: str = ""
    """Why an attempt broke the stream contract (a gap, a duplicate, a chunk after the end); empty when none did."""
    fatal: BaseException | None = None
    """A non-retryable failure, which ends the stream."""
    chunks_seen: int = 0
    """Chunks received by the current attempt: a fault is injected once every stream has a few."""


class Load:
    """Start `specs` as concurrent streams on threads, spread over `routers`; `join` waits for all of them."""

    def __init__(
        self,
        specs: Sequence[StreamSpec],
        routers: Callable[[], Sequence[str]],
        keys: dict[str, str],
        *,
        prefix: str,
        deadline_s: float = 150.0,
        max_attempts: int = 30,
    ) -> None:
        self.results = [StreamResult(spec=spec) for spec in specs]
        self._routers = routers
        self._keys = keys
        self._prefix = prefix
        self._deadline = time.monotonic() + deadline_s
        self._max_attempts = max_attempts
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(specs))]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        result = self.results[i]
        for attempt in range(self._max_attempts):
            if time.monotonic() >= self._deadline:
                return
            routers = self._routers()
            # Stream i starts on router i; each retry moves to the next, as a client would after a dead replica.
            address = routers[(i + attempt) % len(routers)]
            try:
                chunks = self._attempt(result, address, f"{self._prefix}-{i}-a{attempt}")
            except RaylaneError as exc:
                if exc.code not in RETRYABLE or not exc.message:
                    result.fatal = exc
                    return
                result.failures.append(exc)
                time.sleep(min(exc.retry_after_s or 0.5, MAX_RETRY_PAUSE_S))
                continue
            except BaseException as exc:
                result.fatal = exc
                return
            result.broken = _contract_violation(chunks, result.spec.max_tokens)
            result.tokens = [t for c in chunks for t in c.token_ids]
            return

    def _attempt(self, result: StreamResult, address: str, request_id: str) -> list[Chunk]:
        spec = result.spec
        chunks: list[Chunk] = []
        result.chunks_seen = 0
        timeout_s = max(1.0, self._deadline - time.monotonic())
        with Client(address, self._keys[spec.tenant], timeout_s=timeout_s) as client:
            stream = client.generate(
                spec.deployment, spec.prompt, max_tokens=spec.max_tokens, ignore_eos=True, request_id=request_id
            )
            for chunk in stream:
                chunks.append(chunk)
                result.chunks_seen = len(chunks)
        return chunks

    def wait_started(self, num_chunks: int = 2, timeout_s: float = 60.0) -> None:
        """Until every stream has `num_chunks` chunks in its current attempt (or has finished)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(r.chunks_seen >= num_chunks or r.tokens is not None or r.fatal for r in self.results):
                return
            time.sleep(0.05)
        raise AssertionError(f"the load did not start within {timeout_s}s: {[r.chunks_seen for r in self.results]}")

    def num_finished(self) -> int:
        """Streams already done: a fault meant to land mid-stream must find none."""
        return sum(1 for r in self.results if r.tokens is not None or r.fatal is not None)

    def join(self) -> LoadReport:
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - time.monotonic()) + 5.0)
        return LoadReport(results=self.results, num_hung=sum(t.is_alive() for t in self._threads))


def _contract_violation(chunks: list[Chunk], max_tokens: int) -> str:
    expected = 0
    for n, chunk in enumerate(chunks):
        if chunk.seq != expected:
            return f"chunk {n}: seq {chunk.seq}, expected {expected} (a gap or a duplicate)"
        expected += len(chunk.token_ids)
        if chunk.finished and n != len(chunks) - 1:
            return f"chunk {n} finished the stream but {len(chunks) - n - 1} more followed"
    if not chunks or not chunks[-1].finished:
        return "the stream ended without a finished chunk"
    if chunks[-1].finish_reason != "length" or expected != max_tokens:
        return f"finished with {chunks[-1].finish_reason!r} after {expected} tokens, expected 'length' at {max_tokens}"
    return ""


@dataclass(frozen=True)
class LoadReport:
    """The outcome of a load: checked against the fault-free reference by `assert_exactly_once`."""

    results: list[StreamResult]
    """One per stream, in spec order."""
    num_hung: int
    """Streams still running after their deadline."""

    @property
    def num_retried(self) -> int:
        return sum(1 for r in self.results if r.failures)

    @property
    def failure_codes(self) -> dict[str, int]:
        return dict(Counter(f.code.name for r in self.results for f in r.failures))

    def summary(self) -> dict[str, object]:
        return {
            "streams": len(self.results),
            "completed": sum(1 for r in self.results if r.tokens is not None and not r.broken),
            "retried": self.num_retried,
            "retryable_failures": self.failure_codes,
            "fatal": sum(1 for r in self.results if r.fatal is not None),
            "hung": self.num_hung,
        }

    def assert_exactly_once(
        self, reference: Callable[[StreamSpec], list[int]], *, max_retried: int | None = None
    ) -> None:
        """Every stream completed exactly once, token-identical to `reference`, after only retryable failures."""
        assert self.num_hung == 0, f"{self.num_hung} stream(s) hung: {self.summary()}"
        for i, r in enumerate(self.results):
            assert r.fatal is None, f"stream {i} failed without a retryable status: {r.fatal!r}"
            assert r.tokens is not None, f"stream {i} never completed: {len(r.failures)} retryable failures"
            assert not r.broken, f"stream {i}: {r.broken}"
            assert r.tokens == reference(r.spec), f"stream {i} differs from the fault-free reference"
        if max_retried is not None:
            first = next((f for r in self.results for f in r.failures), None)
            assert self.num_retried <= max_retried, f"{self.num_retried} stream(s) had to retry; first: {first!r}"
