"""Continuous-batching scheduler: a pure state machine over requests and KV blocks.

Shape follows vLLM's `schedule()` / `update_from_output()`: the scheduler picks how many
tokens of each request to compute this step; the engine runs the model and reports the
sampled tokens back.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.engine.block_manager import KVCacheManager
from workers.engine.errors import InvalidRequestError, PromptTooLongError
from workers.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SchedulerConfig:
    """Limits of one scheduler."""

    block_size: int
    """Tokens per KV block."""
    num_blocks: int
    """Blocks in the KV pool."""
    max_num_batched_tokens: int
    """Token budget of one step: decodes plus prefill chunks."""
    max_num_seqs: int
    """Most running requests."""
    enable_prefix_caching: bool = True
    """Reuse cached full blocks across requests with a shared prefix."""
    max_model_len: int = 1 << 30
    """Longest prompt plus output."""

    def __post_init__(self) -> None:
        if min(self.block_size, self.num_blocks, self.max_num_batched_tokens, self.max_num_seqs) <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass
class ScheduledRequest:
    """Compute `num_new_tokens` of `request` starting at token `num_computed_tokens`."""

    request: Request
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    """Decodes (one new token) first, then prefill chunks."""
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def _order(request: Request) -> tuple[int, float]:
    """Scheduling order: better (lower) priority first, then first come first served."""
    return (request.priority, request.arrival_time)


class Scheduler:
    """Sarathi-style chunked-prefill scheduling under a token budget, with preemption by recompute.

    Each step: (1) if the best waiting request outranks the worst running one and cannot
    fit, running requests of worse priority are preempted for it; (2) every running request
    gets its next tokens (one for a decode, a chunk for an unfinished prefill) so decodes never
    stall behind a long prompt; when blocks run out, the worst running request (highest
    priority value, latest arrival) is preempted: its blocks are freed and it recomputes from
    scratch later; (3) waiting requests are admitted in priority order with their prefill
    chunked to the remaining budget.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        # A request can never hold more tokens than the whole pool.
        self.max_model_len = min(config.max_model_len, config.num_blocks * config.block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    # ---- queries ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.config.num_blocks - self.kv.num_free_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv.block_ids(request_id)

    # ---- lifecycle --------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.num_tokens + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"request {request.request_id!r} has {request.num_tokens} tokens; with one generated token it "
                f"needs {request.num_tokens + 1} but at most {self.max_model_len} fit (context or KV pool)"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_order)

    def add_imported_request(self, request: Request) -> list[int]:
        """Admit a request whose first `num_computed_tokens` tokens' KV arrives from elsewhere."""
        if request.num_tokens > self.max_model_len:
            raise PromptTooLongError(f"imported request has {request.num_tokens} tokens; at most {self.max_model_len}")
        if len(self.running) >= self.config.max_num_seqs:
            raise InvalidRequestError(f"cannot import: {len(self.running)} requests already running (the limit)")
        if not self._reserve_imported(request):
            raise InvalidRequestError(
                f"cannot import {request.request_id!r}: it needs "
                f"{-(-request.num_computed_tokens // self.config.block_size)} KV blocks, {self.num_free_blocks} free"
            )
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        bisect.insort(self.running, request, key=_order)
        return self.kv.block_ids(request.request_id)

    def _reserve_imported(self, request: Request) -> bool:
        computed, request.num_computed_tokens = request.num_computed_tokens, 0
        ok = self.kv.allocate(request, computed)
        request.num_computed_tokens = computed
        return ok

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (abort or stop) requests wherever they are, freeing their blocks."""
        assert status.is_finished
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.kv.free(request_id)

    # ---- the step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._preempt_for_priority(out)
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_request_ids:
            self._schedule_waiting(out, budget)
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, out, reason="kv_full")
                if victim is request:
                    return budget
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            is_fresh = request.num_computed_tokens == 0
            prefix = self.kv.find_cached_prefix(request) if is_fresh else []
            num_cached = len(prefix) * self.config.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_new, prefix):
                return
            self.waiting.pop(0)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                self.num_prefix_queries += request.num_prompt_tokens
                self.num_prefix_hits += num_cached
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=_order)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        if not self.waiting or not self.running:
            return
        candidate = self.waiting[0]
        while self.running and _order(self.running[-1]) > _order(candidate):
            blocks_short = self.kv.num_blocks_needed(candidate, candidate.num_tokens) > self.num_free_blocks
            if not blocks_short and len(self.running) < self.config.max_num_seqs:
                return
            self._preempt(self.running[-1], out, reason="priority")

    def _preempt(self, request: Request, out: SchedulerOutput, *, reason: str) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_order)
        out.preempted_request_ids.append(request.request_id)
        logger.info(
            "preempt request_id=%s reason=%s priority=%d num_tokens=%d free_blocks=%d",
            request.request_id,
            reason,
            request.priority,
            request.num_tokens,
            self.num_free_blocks,
        )

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=num_new,
            block_ids=self.kv.block_ids(request.request_id),
        )

    def update_from_output(
        self, out: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[tuple[Request, list[int]]]:
        """Advance each scheduled request; append its sampled token when its last token was computed."""
        results = []
        for item in out.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(request)
            new_tokens: list[int] = []
            if request.num_computed_tokens == request.num_tokens:
                token = sampled_token_ids[request.request_id]
                request.append_output_token(token)
                new_tokens.append(token)
                status = self._stop_status(request, token)
                if status is not None:
                    self.finish_requests([request.request_id], status)
            results.append((request, new_tokens))
        return results

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if (not params.ignore_eos and token in request.eos_token_ids) or token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
