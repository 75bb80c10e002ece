"""One modelled worker: a paged KV pool, continuous batching with chunked prefill, preemption by recompute.

The step policy mirrors `workers/engine/scheduler.py` (Sarathi-style, vLLM v1 shape): decodes first, then the
unfinished prefill chunks, then new admissions from the waiting queue in FIFO order while budget, seats and
blocks allow; a request short of a block preempts the latest-admitted running request, which frees its blocks
and recomputes later; nothing new is admitted in a step that preempted. The engine's scheduler itself works
on token lists and block ids, one step at a time, which is too slow for millions of steps, so this is a
count-only re-statement of its rules.

Fast-forward: when a step would be pure decode with nothing to admit, the worker plans a *run* of k identical
steps (until the first finish or the first block shortage) and asks the cost model for their summed time in
closed form. An outside event during a run (arrival, KV pulled in, failure) truncates it at the step in
progress (`truncate`), so no event is ever delayed by fast-forwarding.

Prefix caching (`sim/prefix_cache.py`, as vLLM's): a request with block hashes (a Mooncake trace's) reuses its
cached leading blocks at admission and prefills only the rest; cached blocks no request holds count as free
blocks and are evicted, least recently used, by the allocations that need them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.policy import PromptHashes
from router.trace import TraceRequest, chain_block_ids
from sim.cost import CostModel, StepShape, decode_run_time_s
from sim.prefix_cache import PrefixCache


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request's progress as the simulator tracks it."""

    index: int
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    num_generated: int = 0
    """Output tokens produced so far (kept across preemption, migration and failover)."""
    num_computed: int = 0
    """Tokens whose KV is on the current worker."""
    num_blocks: int = 0
    """KV blocks held on the current worker."""
    admit_seq: int = 0
    """Admission order on the current worker: the latest admitted is the preemption victim."""
    first_token_s: float = -1.0
    finish_s: float = -1.0
    decode_worker: str = ""
    """The worker that decodes it (equal to the prefill worker for mixed pools)."""
    prefill_worker: str = ""
    num_preemptions: int = 0
    num_restarts: int = 0
    num_migrations: int = 0
    transfer_s: float = 0.0
    """Seconds spent in P/D KV transfers."""
    predicted_p50: float | None = None
    predicted_p90: float | None = None
    migrate_to: str = ""
    """Destination of a migration whose copy has finished and commits at the source's next step boundary."""
    is_migrating: bool = False
    epoch: int = 0
    """Bumped on every restart, so events of an earlier life (a transfer in flight) are ignored."""
    block_hashes: tuple[int, ...] = ()
    """Chained hashes of the prompt's full blocks of `hash_block_size` tokens (empty: no prefix information)."""
    hash_block_size: int = 0
    """Tokens per block of `block_hashes`."""
    prompt_hashes: PromptHashes | None = None
    """What the router is told: the hashes of the blocks a cache hit can cover (never the last prompt token)."""
    cached_hashes: list[int] | None = None
    """Hashes of cached blocks it holds on its current worker (refcounted there); None: none."""
    num_hashed: int = 0
    """Leading prompt blocks already looked up or registered on its current worker."""
    num_cached_tokens: int = 0
    """Prompt tokens its first-token prefill took from the prefix cache."""

    @classmethod
    def from_trace(cls, index: int, t: TraceRequest, *, output_len: int) -> SimRequest:
        """Request `index` of the trace, with its prompt's block hashes when the trace has them."""
        r = cls(
            index=index, request_id=f"r{index}", arrival_s=t.arrival_s, prompt_len=t.prompt_len, output_len=output_len
        )
        if t.block_hash_ids and t.hash_block_size > 0:
            size = t.hash_block_size
            r.block_hashes = chain_block_ids(t.block_hash_ids[: t.prompt_len // size])
            r.hash_block_size = size
            r.prompt_hashes = PromptHashes(block_size=size, hashes=r.block_hashes[: (t.prompt_len - 1) // size])
        return r

    @property
    def prefill_target(self) -> int:
        # Recompute covers the prompt and every output token so far; the step that finishes it emits a token.
        return self.prompt_len + self.num_generated


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class StepPlan:
    """What a worker is computing until `end_s`: one mixed step or a run of `num_steps` pure-decode steps."""

    start_s: float
    end_s: float
    decodes: list[SimRequest]
    chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    num_steps: int = 1
    context_sum: int = 0
    """Decode context of the first step (runs only; the sum grows by len(decodes) per step)."""


class SimWorker:
    """Counts, not tokens: every list holds `SimRequest`s in the order the scheduler would visit them."""

    def __init__(
        self,
        *,
        worker_id: str,
        role: str,
        cost: CostModel,
        kv_blocks: int,
        block_size: int,
        max_batched_tokens: int,
        max_num_seqs: int,
        num_gpus: int = 1,
        chunked_prefill: bool = True,
    ) -> None:
        self.worker_id, self.role, self.cost = worker_id, role, cost
        self.kv_blocks, self.block_size = kv_blocks, block_size
        self.max_batched_tokens, self.max_num_seqs = max_batched_tokens, max_num_seqs
        self.num_gpus = num_gpus
        self.chunked_prefill = chunked_prefill
        self.prefix = PrefixCache(block_size)
        self._init_state()

    def _init_state(self) -> None:
        self.is_healthy = True
        self.prefix.clear()
        self._free_blocks = self.kv_blocks
        self.decoding: list[SimRequest] = []
        self.prefilling: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        """Needs a prefill (new, preempted, or restarted), FIFO; preempted ones rejoin at the head."""
        self.pulls: deque[SimRequest] = deque()
        """P/D: prefilled elsewhere, waiting for blocks here before their KV is pulled."""
        self.num_pulling = 0
        """Pulls admitted (blocks reserved) whose transfer is still on the link."""
        self.ready: list[SimRequest] = []
        """KV arrived (pull or migration); joins the decode batch at the next step boundary."""
        self.plan: StepPlan | None = None
        self.version = 0
        self.admit_counter = 0
        self.busy_s = 0.0
        self.num_steps = 0
        self.slowdown = 1.0
        """Multiplier on the cost model's step times, set by the simulator before each plan (CPU sharing)."""
        self.num_preemptions = 0

    # --- KV blocks and the prefix cache -----------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation may take, cached blocks no request holds included (taking them evicts them)."""
        return self._free_blocks

    @free_blocks.setter
    def free_blocks(self, value: int) -> None:
        self._free_blocks = value
        self.prefix.trim(value)

    @property
    def prefix_block_size(self) -> int:
        """Tokens per block of `prefix_block_hashes` (0 before any request with block hashes)."""
        return self.prefix.block_size

    def prefix_block_hashes(self) -> frozenset[int] | None:
        """Every prefix block findable here, for the router's view; None before any request with block hashes."""
        return self.prefix.hashes()

    # --- what the router sees ----------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling) + len(self.ready) + self.num_pulling

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.pulls)

    @property
    def used_blocks(self) -> int:
        return self.kv_blocks - self.free_blocks

    @property
    def num_pending_prefill_tokens(self) -> int:
        """Prompt (and recompute) tokens queued or mid-prefill, as the engine reports them."""
        return sum(max(r.prefill_target - r.num_computed, 0) for r in (*self.prefilling, *self.waiting))

    def all_requests(self) -> list[SimRequest]:
        """Every request whose state lives here (pulls still hold KV on their prefill worker)."""
        return [*self.decoding, *self.prefilling, *self.waiting, *self.ready]

    # --- planning ----------------------------------------------------------------------------------------------

    def admit_pulls(self) -> list[SimRequest]:
        """Reserve blocks for queued pulls, FIFO; the caller starts their transfers."""
        started = []
        while self.pulls and self.num_running < self.max_num_seqs:
            r = self.pulls[0]
            need = cdiv(r.num_computed + 1, self.block_size)
            if need > self.free_blocks:
                break
            self.pulls.popleft()
            self.free_blocks -= need
            self.num_pulling += 1
            started.append(r)
        return started

    def plan_step(self, now: float) -> StepPlan | None:
        """Build the next step (or fast-forward run); None when there is nothing to compute."""
        if self.ready:
            for r in self.ready:
                self.admit_counter += 1
                r.admit_seq = self.admit_counter
            self.decoding.extend(self.ready)
            self.ready.clear()
        if not self.decoding and not self.prefilling and not self.waiting:
            return None
        if not self.prefilling and self.decoding and not self._can_admit_waiting():
            plan = self._plan_run(now)
            if plan is not None:
                return plan
        return self._plan_single(now)

    def _can_admit_waiting(self) -> bool:
        if not self.waiting or self.num_running >= self.max_num_seqs:
            return False
        head = self.waiting[0]
        if not self.chunked_prefill:
            return self._admission(head, None)[2] <= self.free_blocks
        budget = self.max_batched_tokens - len(self.decoding)
        if budget <= 0:
            return False
        return self._admission(head, budget)[2] <= self.free_blocks

    def _admission(self, r: SimRequest, budget: int | None) -> tuple[int, int, int]:
        """(cached leading blocks, tokens of its first chunk, free blocks admitting it takes); `budget` None:
        the whole rest of the prompt in one chunk."""
        num_hit, hit_cost = self.prefix.lookup(r)
        cached = num_hit * r.hash_block_size
        chunk = r.prefill_target - cached if budget is None else min(r.prefill_target - cached, budget)
        return num_hit, chunk, hit_cost + cdiv(cached + chunk, self.block_size) - num_hit * self.prefix.blocks_per_hash

    def _claim(self, r: SimRequest, num_hit: int) -> None:
        if r.block_hashes:
            # Cached blocks no one held leave the free pool with their entries, so nothing else is evicted.
            self._free_blocks -= self.prefix.claim(r, num_hit)

    def _plan_run(self, now: float) -> StepPlan | None:
        decodes = self.decoding
        if len(decodes) > self.max_batched_tokens:
            return None
        max_steps = min(r.output_len - r.num_generated for r in decodes)
        num_steps = self._steps_kv_allows(decodes, max_steps)
        if num_steps < 1:
            return None
        bs = self.block_size
        for r in decodes:
            need = cdiv(r.num_computed + num_steps, bs) - r.num_blocks
            r.num_blocks += need
            self.free_blocks -= need
        context_sum = sum(r.num_computed for r in decodes) + len(decodes)
        duration = decode_run_time_s(self.cost, len(decodes), context_sum, num_steps) * self.slowdown
        return StepPlan(
            start_s=now, end_s=now + duration, decodes=list(decodes), num_steps=num_steps, context_sum=context_sum
        )

    def _steps_kv_allows(self, decodes: list[SimRequest], max_steps: int) -> int:
        """Largest k <= max_steps such that k more tokens per request fit in the free blocks."""
        bs, free = self.block_size, self.free_blocks

        def need(k: int) -> int:
            return sum(cdiv(r.num_computed + k, bs) - r.num_blocks for r in decodes)

        if need(max_steps) <= free:
            return max_steps
        lo, hi = 0, max_steps  # need(lo) fits, need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _plan_single(self, now: float) -> StepPlan | None:
        if not self.chunked_prefill:
            plan = self._plan_prefill_first(now)
            if plan is not None:
                return plan
        bs = self.block_size
        budget = self.max_batched_tokens
        did_preempt = False
        decodes: list[SimRequest] = []
        for r in list(self.decoding):
            if budget <= 0:
                break
            if did_preempt and r not in self.decoding:
                continue  # preempted earlier in this loop
            need = cdiv(r.num_computed + 1, bs) - r.num_blocks
            while need > self.free_blocks:
                victim = self._preempt_latest()
                did_preempt = True
                if victim is r:
                    break
                if victim in decodes:
                    decodes.remove(victim)
                    budget += 1
            if did_preempt and r not in self.decoding:
                continue
            r.num_blocks += need
            self.free_blocks -= need
            decodes.append(r)
            budget -= 1
        chunks: list[tuple[SimRequest, int]] = []
        for r in list(self.prefilling):
            if budget <= 0:
                break
            chunk = min(r.prefill_target - r.num_computed, budget)
            fits = (r.num_blocks + self.free_blocks) * bs - r.num_computed
            chunk = min(chunk, fits)
            if chunk <= 0:
                continue
            self._grow(r, r.num_computed + chunk)
            chunks.append((r, chunk))
            budget -= chunk
        while (
            self.chunked_prefill
            and not did_preempt
            and self.waiting
            and budget > 0
            and self.num_running < self.max_num_seqs
        ):
            r = self.waiting[0]
            num_hit, chunk, need = self._admission(r, budget)
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            self.admit_counter += 1
            r.admit_seq = self.admit_counter
            self._claim(r, num_hit)
            self.prefilling.append(r)
            self._grow(r, r.num_computed + chunk)
            chunks.append((r, chunk))
            budget -= chunk
        if not decodes and not chunks:
            if len(self.prefilling) > 1:
                # Partial prefills hold every block and none can grow: recompute the latest later.
                self._preempt_latest()
                return self._plan_single(now)
            return None
        shape = StepShape(
            num_prefill_tokens=sum(c for _, c in chunks),
            prefill_attn_work=sum(c * (r.num_computed + c) for r, c in chunks),
            num_decodes=len(decodes),
            decode_context_sum=sum(r.num_computed + 1 for r in decodes),
        )
        duration = self.cost.step_time_s(shape) * self.slowdown
        return StepPlan(start_s=now, end_s=now + duration, decodes=decodes, chunks=chunks)

    def _plan_prefill_first(self, now: float) -> StepPlan | None:
        """vLLM v0's default without chunked prefill: whole prompts in a prefill-only step, decodes wait."""
        chunks: list[tuple[SimRequest, int]] = []
        budget = self.max_batched_tokens
        while self.waiting and self.num_running < self.max_num_seqs:
            r = self.waiting[0]
            num_hit, tokens, need = self._admission(r, None)
            # A prompt longer than the budget still runs, alone, as v0 does up to its max model length.
            if (chunks and tokens > budget) or need > self.free_blocks:
                break
            self.waiting.popleft()
            self.admit_counter += 1
            r.admit_seq = self.admit_counter
            self._claim(r, num_hit)
            self.prefilling.append(r)
            self._grow(r, r.num_computed + tokens)
            chunks.append((r, tokens))
            budget -= tokens
        if not chunks:
            return None
        shape = StepShape(
            num_prefill_tokens=sum(c for _, c in chunks),
            prefill_attn_work=sum(c * (r.num_computed + c) for r, c in chunks),
        )
        return StepPlan(start_s=now, end_s=now + self.cost.step_time_s(shape), decodes=[], chunks=chunks)

    def _grow(self, r: SimRequest, num_tokens: int) -> None:
        need = cdiv(num_tokens, self.block_size) - r.num_blocks
        assert need <= self.free_blocks, (self.worker_id, need, self.free_blocks)
        r.num_blocks += need
        self.free_blocks -= need

    def _preempt_latest(self) -> SimRequest:
        running = self.decoding + self.prefilling
        assert running, f"{self.worker_id}: short of blocks with nothing to preempt"
        victim = max(running, key=lambda r: r.admit_seq)
        if victim in self.decoding:
            self.decoding.remove(victim)
        else:
            self.prefilling.remove(victim)
        self.release(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def release(self, r: SimRequest) -> None:
        """Free `r`'s blocks here and forget its KV (it recomputes if it runs here again); its cached prompt
        blocks stay findable until evicted."""
        self.free_blocks += r.num_blocks - self.prefix.release(r)
        r.num_blocks = 0
        r.num_computed = 0
        assert self.free_blocks <= self.kv_blocks

    # --- time ----------------------------------------------------------------------------------------------------

    def truncate(self, now: float) -> bool:
        """Cut a fast-forward run at the step in progress at `now`; True when its end moved earlier."""
        plan = self.plan
        if plan is None or plan.num_steps <= 1 or now >= plan.end_s:
            return False
        n, elapsed = len(plan.decodes), now - plan.start_s
        lo, hi = 0, plan.num_steps  # steps done by `now`: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if decode_run_time_s(self.cost, n, plan.context_sum, mid) * self.slowdown <= elapsed:
                lo = mid
            else:
                hi = mid
        keep = lo + 1  # the step in progress completes
        if keep >= plan.num_steps:
            return False
        plan.num_steps = keep
        plan.end_s = plan.start_s + decode_run_time_s(self.cost, n, plan.context_sum, keep) * self.slowdown
        return True

    def finish_plan(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the finished plan; returns (requests done with prefill this step, requests that finished)."""
        plan = self.plan
        assert plan is not None
        self.plan = None
        self.busy_s += plan.end_s - plan.start_s
        self.num_steps += plan.num_steps
        k, bs = plan.num_steps, self.block_size
        finished: list[SimRequest] = []
        for r in plan.decodes:
            r.num_computed += k
            r.num_generated += k
            extra = r.num_blocks - cdiv(r.num_computed, bs)
            if extra > 0:  # a truncated run gives back blocks reserved for steps it did not take
                r.num_blocks -= extra
                self.free_blocks += extra
            if r.num_generated >= r.output_len:
                finished.append(r)
        prefilled: list[SimRequest] = []
        for r, chunk in plan.chunks:
            r.num_computed += chunk
            if r.block_hashes:
                self.prefix.register(r)
            if r.num_computed >= r.prefill_target:
                r.num_generated += 1
                prefilled.append(r)
        if finished:
            done = set(map(id, finished))
            self.decoding = [r for r in self.decoding if id(r) not in done]
        if prefilled:
            done = set(map(id, prefilled))
            self.prefilling = [r for r in self.prefilling if id(r) not in done]
        return prefilled, finished

    def fail(self) -> list[SimRequest]:
        """The worker dies: every request whose KV or queue slot was here, for the caller to restart elsewhere.

        Queued pulls (`self.pulls`) are not included: their KV lives on their prefill worker; the caller reads
        them before calling this.
        """
        lost = [*self.decoding, *self.prefilling, *self.waiting, *self.ready]
        for r in lost:
            r.num_blocks = 0
            r.num_computed = 0
            r.cached_hashes, r.num_hashed = None, 0
        self._init_state()
        self.is_healthy = False
        self.version += 1
        return lost
