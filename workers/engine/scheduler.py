"""Continuous-batching scheduler: a pure state machine over requests and KV blocks.

Shape follows vLLM v1's `schedule()` / `update_from_output()`: the scheduler picks how many tokens
of each request to compute this step; the engine runs the model and reports the sampled tokens back.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.engine.block_manager import KVCacheManager, cdiv
from workers.engine.errors import DuplicateRequestError, EmptyPromptError, PromptTooLongError
from workers.engine.request import Request, RequestStatus
from workers.engine.scheduler_types import NoKVCapacityError, ScheduledRequest, SchedulerConfig, SchedulerOutput
from workers.engine.waiting_order import waiting_order

__all__ = ["NoKVCapacityError", "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput"]

logger = logging.getLogger(__name__)


def _order(request: Request) -> tuple[int, float]:
    """Scheduling order: better (lower) priority first, then first come first served."""
    return (request.priority, request.arrival_time)


@dataclass
class _Step:
    """Scratch state of one `schedule()` call."""

    budget: int
    scheduled: dict[str, ScheduledRequest] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    is_kv_short: bool = False
    """A running request was preempted for blocks: admit nothing new this step."""


class Scheduler:
    """Sarathi-style chunked prefill under a token budget, with priorities and preemption by recompute.

    Each `schedule()` builds one step from `max_num_batched_tokens`:

    1. Running requests first, decodes (one token) before unfinished prefills (a chunk of what budget
       remains), so decodes never stall behind a long prompt. When a running request needs a block
       and the free queue (cached-but-unused blocks included) is empty, the worst running request
       (highest `priority` value, then latest arrival) is preempted: its blocks are freed, it goes
       back to waiting with `num_computed_tokens = 0` and recomputes later. If that victim was
       already scheduled this step, its tokens return to the budget. Nothing new is admitted in a
       step that preempted for blocks.
    2. Waiting requests are admitted in `(priority, arrival_time)` order while budget, seats
       (`max_num_seqs`) and blocks allow, each reusing its longest cached prefix and computing a
       prefill chunk that fits the remaining budget. The queue head blocks those behind it.
    3. Priority preemption: when the waiting head is short of blocks, running requests with a
       strictly worse `priority` value are preempted, worst first, but only if freeing all of them
       would make room (no pointless preemption). Equal priorities never preempt each other, so FCFS
       requests cannot ping-pong; a better request does not preempt for seats or budget, only blocks.
       A request preempted in a step is not re-admitted in that same step.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._init_kv()
        self._init_queues()
        self._init_counters()

    def _init_kv(self) -> None:
        self.kv = KVCacheManager(
            num_blocks=self.config.num_blocks,
            block_size=self.config.block_size,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        self.max_model_len = self.config.max_model_len
        # A request with N tokens needs KV for all N to produce the next one; past the pool it can never run.
        self.max_num_tokens = self.config.num_blocks * self.config.block_size

    def _init_queues(self) -> None:
        self.waiting: list[Request] = []
        """Sorted by `_order`; preempted requests rejoin at their priority position."""
        self.running: list[Request] = []
        """Sorted by `_order`, so the last one is the preemption victim."""
        self.requests: dict[str, Request] = {}
        self.paused: dict[str, Request] = {}
        """Running requests held out of scheduling (their blocks kept) while they migrate away."""

    def _init_counters(self) -> None:
        self.num_preemptions = 0
        self.num_prefix_cache_queries = 0
        """Tokens of admitted requests looked up in the prefix cache (recomputes included)."""
        self.num_prefix_cache_hits = 0
        """Of those, tokens served from cached blocks."""

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
        return self.kv.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.kv.num_cached_blocks

    @property
    def num_pending_prefill_tokens(self) -> int:
        """Prompt (and recompute) tokens still to prefill, waiting and running requests together."""
        # A decoding request's last sampled token is uncomputed too; that one is decode work, not prefill.
        return sum(max(r.num_tokens - r.num_computed_tokens - 1, 0) for r in (*self.waiting, *self.running))

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_cache_hits / self.num_prefix_cache_queries if self.num_prefix_cache_queries else 0.0

    def has_unfinished_requests(self) -> bool:
        """Whether a step has work; paused requests do not count, they wait for their migration to settle."""
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv.get_block_ids(request_id)

    # ---- lifecycle --------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request; refuse one that could never run (context or whole KV pool too small)."""
        self._check_new_request(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_order)

    def add_imported_request(self, request: Request, reservation: str | None = None) -> list[int]:
        """Run a request whose first `num_computed_tokens` tokens' KV arrives from another engine.

        Allocates blocks covering those tokens (or takes them from `reservation`, see `reserve_blocks`),
        makes the request RUNNING and returns its block ids for the caller to fill before the next step.
        Raises `NoKVCapacityError` when seats or blocks are short right now.
        """
        self._check_new_request(request)
        if not 0 <= request.num_computed_tokens < request.num_tokens:
            raise ValueError(
                f"imported request {request.request_id!r} must have 0 <= num_computed_tokens < num_tokens "
                f"(at least one token left to compute), got {request.num_computed_tokens} of {request.num_tokens}"
            )
        if len(self.running) + len(self.paused) >= self.config.max_num_seqs:
            raise NoKVCapacityError(
                f"cannot import {request.request_id!r}: {len(self.running)} requests already running (max_num_seqs)"
            )
        if reservation is not None:
            self.reserve_blocks(reservation, cdiv(request.num_computed_tokens, self.config.block_size))
            self.kv.adopt_reserved(reservation, request, request.num_computed_tokens)
        elif not self.kv.allocate(request, request.num_computed_tokens):
            raise NoKVCapacityError(
                f"cannot import {request.request_id!r}: it needs "
                f"{cdiv(request.num_computed_tokens, self.config.block_size)} KV blocks, "
                f"{self.num_free_blocks} are free"
            )
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        bisect.insort(self.running, request, key=_order)
        return self.kv.get_block_ids(request.request_id)

    def _check_new_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise DuplicateRequestError(f"request id {request.request_id!r} is already in the scheduler")
        if not request.prompt_token_ids:
            raise EmptyPromptError(f"request {request.request_id!r} has an empty prompt")
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"request {request.request_id!r} has {request.num_tokens} tokens; with one generated token it "
                f"exceeds the context of {self.max_model_len}"
            )
        if request.num_tokens > self.max_num_tokens:
            raise PromptTooLongError(
                f"request {request.request_id!r} has {request.num_tokens} tokens, which need "
                f"{cdiv(request.num_tokens, self.config.block_size)} KV blocks, but the whole pool has "
                f"{self.config.num_blocks} ({self.max_num_tokens} tokens)"
            )

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) requests wherever they are and free their blocks.

        Unknown or already finished ids are ignored.
        """
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if self.paused.pop(request_id, None) is None:
                queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
                queue.remove(request)
            request.status = status
            self.kv.free(request_id)

    # ---- migration --------------------------------------------------------------------------

    def reserve_blocks(self, reservation: str, num_blocks: int) -> list[int]:
        """Hold at least `num_blocks` blocks under `reservation` for an incoming request; grows, never shrinks.

        Reserved blocks belong to no request, so no step allocates, preempts or caches them until
        `add_imported_request(..., reservation)` adopts them or `release_reservation` frees them.
        Raises `NoKVCapacityError` (reserving nothing more) when too few blocks are free.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.config.num_blocks:
            raise NoKVCapacityError(f"cannot reserve {num_blocks} blocks: the pool has {self.config.num_blocks}")
        blocks = self.kv.reserve(reservation, num_blocks)
        if blocks is None:
            held = len(self.kv.reserved_block_ids(reservation))
            raise NoKVCapacityError(
                f"cannot reserve {num_blocks} KV blocks for {reservation!r}: {held} held, {self.num_free_blocks} free"
            )
        return blocks

    def release_reservation(self, reservation: str) -> int:
        """Free a reservation's blocks; returns how many (0 when there was none)."""
        return self.kv.release_reserved(reservation)

    def pause(self, request_id: str) -> None:
        """Stop scheduling a running request but keep its blocks (its final migration copy is taken now)."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING or request_id in self.paused:
            raise ValueError(f"only a running, unpaused request can be paused; {request_id!r} is not one")
        self.running.remove(request)
        self.paused[request_id] = request

    def unpause(self, request_id: str) -> bool:
        """Schedule a paused request again (its migration aborted); False when it is not paused."""
        request = self.paused.pop(request_id, None)
        if request is None:
            return False
        bisect.insort(self.running, request, key=_order)
        return True

    # ---- the step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: who computes how many tokens into which blocks (see the class docstring)."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.is_kv_short:
            self._schedule_waiting(step)
        # Stable sort: single-token entries first, as the attention kernel batches them as decodes.
        scheduled = sorted(step.scheduled.values(), key=lambda s: s.num_new_tokens != 1)
        return SchedulerOutput(scheduled=scheduled, preempted_request_ids=step.preempted)

    def _schedule_running(self, step: _Step) -> None:
        queue = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, _order(r)))
        for request in queue:
            if step.budget == 0:
                return
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            if self._allocate_or_preempt(request, request.num_computed_tokens + num_new, step):
                self._add_scheduled(step, request, num_new)

    def _allocate_or_preempt(self, request: Request, num_total_tokens: int, step: _Step) -> bool:
        """Cover `num_total_tokens` for a running request, preempting the worst running ones while short."""
        while not self.kv.allocate(request, num_total_tokens):
            victim = self.running[-1]
            self._preempt(victim, step, reason="kv_full")
            step.is_kv_short = True
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, step: _Step) -> None:
        ordered = waiting_order(
            self.waiting,
            short_prompt_tokens=self.config.short_prompt_tokens,
            max_long_wait_s=self.config.max_long_wait_s,
            now=time.monotonic(),
        )
        for request in list(ordered):
            if step.budget <= 0 or len(self.running) + len(self.paused) >= self.config.max_num_seqs:
                return
            # A request whose adapter has no free slot waits; requests behind it may still start.
            if not self._fits_lora_slots(request):
                continue
            if request.request_id in step.preempted or not self._admit(request, step):
                return

    def _fits_lora_slots(self, request: Request) -> bool:
        if self.config.max_loras is None or request.lora_id == 0:
            return True
        active = {r.lora_id for r in self.running if r.lora_id}
        return request.lora_id in active or len(active) < self.config.max_loras

    def _admit(self, request: Request, step: _Step) -> bool:
        """Start (or restart) a waiting request with its first chunk; False when blocks are short."""
        chunk_budget = step.budget  # fixed up front: budget a victim returns must not grow the chunk
        while True:
            prefix = self.kv.find_cached_prefix(request)
            num_cached = len(prefix) * self.config.block_size
            num_new = min(request.num_tokens - num_cached, chunk_budget)
            if self.kv.allocate(request, num_cached + num_new, prefix):
                break
            if not self._preempt_for_priority(request, num_cached + num_new, prefix, step):
                return False
        self.waiting.remove(request)
        request.num_computed_tokens = num_cached
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
        self.num_prefix_cache_queries += request.num_tokens
        self.num_prefix_cache_hits += num_cached
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=_order)
        self._add_scheduled(step, request, num_new)
        return True

    def _preempt_for_priority(self, request: Request, num_total_tokens: int, prefix: list[int], step: _Step) -> bool:
        """Preempt the worst running request of strictly worse priority, if all of them together make room."""
        victims = [r for r in self.running if r.priority > request.priority]
        if not victims:
            return False
        needed = self.kv.num_blocks_to_allocate(request, num_total_tokens, prefix)
        reclaimable = self.kv.num_blocks_freed_by((r.request_id for r in victims), exclude=prefix)
        if self.num_free_blocks + reclaimable < needed:
            return False
        self._preempt(victims[-1], step, reason="priority", for_request_id=request.request_id)
        return True

    def _preempt(self, request: Request, step: _Step, *, reason: str, for_request_id: str | None = None) -> None:
        self.running.remove(request)
        unscheduled = step.scheduled.pop(request.request_id, None)
        if unscheduled is not None:
            step.budget += unscheduled.num_new_tokens
        self.kv.free(request.request_id)
        num_lost = request.num_computed_tokens
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_order)
        step.preempted.append(request.request_id)
        logger.info(
            "preempt request_id=%s reason=%s for_request_id=%s priority=%d num_tokens=%d num_lost_tokens=%d "
            "num_preemptions=%d free_blocks=%d",
            request.request_id,
            reason,
            for_request_id,
            request.priority,
            request.num_tokens,
            num_lost,
            request.num_preemptions,
            self.num_free_blocks,
        )

    def _add_scheduled(self, step: _Step, request: Request, num_new: int) -> None:
        step.scheduled[request.request_id] = ScheduledRequest(
            request=request,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=num_new,
            block_ids=self.kv.get_block_ids(request.request_id),
        )
        step.budget -= num_new

    # ---- after the model ran ----------------------------------------------------------------

    def update_from_output(
        self, out: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[tuple[Request, list[int]]]:
        """Advance every scheduled request by its chunk and apply the sampled tokens.

        A request whose chunk reached its last token gets `sampled_token_ids[request_id]` appended;
        a partial prefill chunk yields no token. Then the stop checks run (EOS unless `ignore_eos`,
        `stop_token_ids`, `max_tokens`, `max_model_len`) and finished requests free their blocks.
        Returns `(request, new_token_ids)` per scheduled request, in batch order; requests finished
        while the step ran (aborted) are left out. `request.status` tells whether one finished.
        """
        items = [s for s in out.scheduled if not s.request.is_finished]
        completing = [s.request.request_id for s in items if s.is_last_chunk]
        missing = [rid for rid in completing if rid not in sampled_token_ids]
        if missing:
            raise ValueError(f"no sampled token for requests that finished their chunk: {missing}")
        results = []
        for item in items:
            request = item.request
            assert request.num_computed_tokens == item.num_computed_tokens, "scheduler output applied twice"
            request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(request)
            new_token_ids: list[int] = []
            if request.num_computed_tokens == request.num_tokens:
                token = sampled_token_ids[request.request_id]
                request.append_output_token(token)
                new_token_ids.append(token)
                status = self._stop_status(request, token)
                if status is not None:
                    self.finish_requests([request.request_id], status)
            results.append((request, new_token_ids))
        return results

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if (not params.ignore_eos and token in request.eos_token_ids) or token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        # The next step would need KV for every token; past the whole pool it can never run.
        if request.num_tokens > self.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
