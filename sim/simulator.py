"""The discrete-event loop: arrivals, placement, worker steps, KV transfers, migrations and failures.

Every decision is production code: requests are predicted, admitted, placed and tracked by the router's
`PlacementCore` (its `Policy`, `decide_admission` and `KvLedger`), and decoding requests are rebalanced by
`control_plane/migration_policy.plan_rebalance`, fed *predicted* remaining lengths (never the trace's true ones).
The simulator only models time, and does the waiting the router does around a pure admission decision: a
request admission holds back waits, FIFO, and is tried again when a finish frees KV (the router's notify).

Events sit in one heap keyed by (time, sequence number), so equal-time events run in the order they were
scheduled and a run is a pure function of the config. Arrivals are merged in from the sorted trace instead of
being pushed up front. The policies see a `ClusterView` whose `WorkerView`s are rebuilt only for the workers
whose state changed since the last routing decision.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.migration_policy import MigrationDecision, MigrationHistory, plan_rebalance
from control_plane.migration_policy import WorkerView as MigrationView
from router.length_predictor import LengthPredictor
from router.placement import PlacementCore
from router.policy import Decision, NoCapacityError, RouteRequest
from router.registry import make_policy
from sim.config import SimConfig, make_cost_model, worker_gpus
from sim.results import SimResult, build_result
from sim.views import ViewTracker, migration_view
from sim.worker import SimRequest, SimWorker, cdiv

logger = logging.getLogger(__name__)

(
    STEP_END,
    RETRY,
    TRANSFER_DONE,
    MIGRATION_COPIED,
    MIGRATION_LANDED,
    FAILURE,
    RECOVER,
    SAMPLE,
    MIGRATION_TICK,
    ADMISSION_RECHECK,
) = range(10)
LENGTH_AWARE_POLICIES = frozenset({"raylane"})
TENANT = "sim"

ProgressFn = Callable[[float, int, int], None]
"""Called now and then with (simulated seconds, requests finished, requests total)."""


@dataclass(slots=True)
class _Counters:
    events: int = 0
    placements: int = 0
    """Requests the placement core placed (policy decision plus ledger entry)."""
    no_capacity: int = 0
    """Policy decisions that found no worker (the request retries later)."""
    admitted: int = 0
    """Admission verdicts that admitted (admission on only)."""
    admission_waits: int = 0
    """Admission verdicts that said wait (a queued request is asked again at every finish)."""
    admission_queued: int = 0
    """Times a request joined the admission queue (held back, or arriving behind earlier waiters)."""
    migrations_started: int = 0
    migrations_committed: int = 0
    migrations_aborted: int = 0
    restarts: int = 0
    reroutes: int = 0


class Simulator:
    """`Simulator(config).run()` replays the config's trace once and returns a `SimResult`."""

    def __init__(self, config: SimConfig, *, progress: ProgressFn | None = None) -> None:
        self.config = config
        self.progress = progress
        self._init_workers()
        self._init_policy()
        self._init_state()

    def _init_workers(self) -> None:
        cfg = self.config
        self.workers: dict[str, SimWorker] = {}
        self.kv_bytes_per_token = 0
        for pool in cfg.pools:
            spec = pool.cost_model or cfg.cost_model
            cost = make_cost_model(spec)
            blocks = pool.kv_blocks or cfg.kv_blocks
            if blocks is None and hasattr(cost, "kv_capacity_tokens"):
                blocks = cost.kv_capacity_tokens(memory_utilization=cfg.kv_memory_utilization) // cfg.block_size
            if blocks is None:
                raise ValueError(
                    f"pool {pool.role}: set kv_blocks (the {cost.name} cost model cannot size the KV pool)"
                )
            model = getattr(cost, "model", None)
            self.kv_bytes_per_token = max(self.kv_bytes_per_token, getattr(model, "kv_bytes_per_token", 0))
            start = sum(w.role == pool.role for w in self.workers.values())
            for i in range(start, start + pool.num_workers):
                worker_id = f"{pool.role}-{i}"
                self.workers[worker_id] = SimWorker(
                    worker_id=worker_id,
                    role=pool.role,
                    cost=cost,
                    kv_blocks=blocks,
                    block_size=cfg.block_size,
                    max_batched_tokens=pool.max_batched_tokens or cfg.max_batched_tokens,
                    max_num_seqs=cfg.max_num_seqs,
                    num_gpus=worker_gpus(spec),
                    chunked_prefill=cfg.chunked_prefill,
                )
        if cfg.kv_bytes_per_token is not None:
            self.kv_bytes_per_token = cfg.kv_bytes_per_token
        self.link = cfg.link

    def _init_policy(self) -> None:
        cfg = self.config
        policy = make_policy(cfg.policy)
        if cfg.policy == "p2c":
            policy.rng.seed(cfg.seed)
        admission = cfg.admission if cfg.admission.enabled else None
        reads_lengths = cfg.policy in LENGTH_AWARE_POLICIES or admission is not None or cfg.migration.enabled
        use = cfg.use_length_predictor if cfg.use_length_predictor is not None else reads_lengths
        self.placement = PlacementCore(policy, predictor=LengthPredictor() if use else None, admission=admission)
        self.policy, self.predictor = policy, self.placement.predictor
        tracked = self.predictor is not None or admission is not None
        self.views = ViewTracker(
            self.workers,
            deployment=cfg.deployment,
            kv_bytes_per_token=self.kv_bytes_per_token,
            ledger=self.placement.ledger if tracked else None,
            ledger_refresh_s=cfg.ledger_refresh_s,
        )
        self.inflight = self.views.inflight
        self.admission_queue: deque[SimRequest] = deque()
        """Requests admission held back, FIFO (one tenant); tried again when a finish frees KV."""
        self._recheck_pending = False
        self._wake_pending = False

    def _init_state(self) -> None:
        self.heap: list[tuple[float, int, int, object, object]] = []
        self.seq = 0
        self.now = 0.0
        self.counters = _Counters()
        self.held_for_pull: dict[str, dict[int, SimRequest]] = {wid: {} for wid in self.workers}
        """Per prefill worker, prefilled requests whose KV waits there for their decode worker to pull it."""
        self.transfers: dict[int, SimRequest] = {}
        self.migrations: dict[int, SimRequest] = {}
        self.migration_routes: dict[int, tuple[str, str]] = {}
        """Per migrating request, (source, destination): the production policy's rate limit counts them."""
        self.migration_last_started: dict[str, float] = {}
        self.commit_pending: dict[str, list[SimRequest]] = {wid: [] for wid in self.workers}
        self.series: list[dict[str, float]] = []
        self.num_finished = 0

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        cfg = self.config
        trace = cfg.load_requests()
        if not trace:
            raise ValueError("the trace has no requests after slicing")
        max_kv_tokens = min(w.kv_blocks for w in self.workers.values()) * cfg.block_size
        self.requests = []
        for i, t in enumerate(trace):
            output_len = min(t.output_len, cfg.max_tokens)
            if t.prompt_len + output_len + 1 > max_kv_tokens:
                raise ValueError(
                    f"request {i} needs {t.prompt_len + output_len} tokens of KV but a worker holds {max_kv_tokens}; "
                    "raise kv_blocks or clip the trace"
                )
            self.requests.append(SimRequest.from_trace(i, t, output_len=output_len))
        for failure in cfg.failures:
            if failure.worker_id not in self.workers:
                raise ValueError(f"failure names unknown worker {failure.worker_id!r}; workers: {sorted(self.workers)}")
            self._push(failure.at_s, FAILURE, failure.worker_id, failure.recover_after_s)
        self._push(0.0, SAMPLE, None, None)
        if cfg.migration.enabled:
            self._push(cfg.migration.interval_s, MIGRATION_TICK, None, None)
        wall_start = time.perf_counter()
        self._loop()
        wall_s = time.perf_counter() - wall_start
        return build_result(self, wall_s=wall_s)

    def _loop(self) -> None:
        requests, heap = self.requests, self.heap
        next_arrival, num_requests = 0, len(requests)
        report_every, handlers = 20000, self._handlers()
        while True:
            if next_arrival < num_requests and (not heap or requests[next_arrival].arrival_s <= heap[0][0]):
                r = requests[next_arrival]
                next_arrival += 1
                self.now = r.arrival_s
                self._arrive(r)
            elif heap:
                t, _, kind, a, b = heapq.heappop(heap)
                self.now = t
                handlers[kind](a, b)
            else:
                break
            self.counters.events += 1
            if self.progress is not None and self.counters.events % report_every == 0:
                self.progress(self.now, self.num_finished, num_requests)
        if self.num_finished != num_requests:
            stuck = {
                wid: (w.num_running, w.num_waiting, w.free_blocks)
                for wid, w in self.workers.items()
                if w.num_running or w.num_waiting
            }
            raise RuntimeError(
                f"simulation stalled with {num_requests - self.num_finished} unfinished requests; {stuck}"
            )
        if self.progress is not None:
            self.progress(self.now, self.num_finished, num_requests)

    def _handlers(self) -> dict[int, Callable[[object, object], None]]:
        return {
            STEP_END: self._on_step_end,
            RETRY: lambda r, _: self._route(r),
            TRANSFER_DONE: self._on_transfer_done,
            MIGRATION_COPIED: self._on_migration_copied,
            MIGRATION_LANDED: self._on_migration_landed,
            FAILURE: self._on_failure,
            RECOVER: self._on_recover,
            SAMPLE: self._on_sample,
            MIGRATION_TICK: self._on_migration_tick,
            ADMISSION_RECHECK: self._on_admission_recheck,
        }

    def _push(self, t: float, kind: int, a: object, b: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def _is_busy(self) -> bool:
        """Work other than periodic ticks remains."""
        return self.num_finished < len(self.requests)

    # --- routing -------------------------------------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        request = self.placement.predict(self._route_request(r))
        r.predicted_p50, r.predicted_p90 = request.predicted_output_p50, request.predicted_output_p90
        self._route(r)

    def _route_request(self, r: SimRequest) -> RouteRequest:
        return RouteRequest(
            request_id=r.request_id,
            deployment=self.config.deployment,
            tenant=TENANT,
            num_prompt_tokens_estimate=r.prompt_len,
            max_tokens=self.config.max_tokens,
            predicted_output_p50=r.predicted_p50,
            predicted_output_p90=r.predicted_p90,
            prompt_hashes=r.prompt_hashes,
        )

    def _route(self, r: SimRequest) -> None:
        """Place `r` through the placement core; it waits (behind earlier waiters) when admission says so."""
        if self.admission_queue:
            self._queue_for_admission(r, retry_after_s=None)
            self._wake_admission()
            return
        retry_after_s = self._try_place(r)
        if retry_after_s is not None:
            self._queue_for_admission(r, retry_after_s=retry_after_s)

    def _try_place(self, r: SimRequest) -> float | None:
        """Admit and place `r` (or schedule a retry when no worker is healthy); a retry-after: admission says wait."""
        request = self._route_request(r)
        verdict = self.placement.admit(request, self.views.view(self.now))
        if verdict.view is None:
            self.counters.admission_waits += 1
            return verdict.retry_after_s
        if self.placement.admission is not None:
            self.counters.admitted += 1
        try:
            decision = self.placement.place(request, verdict.view, r.request_id)
        except NoCapacityError as e:
            self.counters.no_capacity += 1
            self._push(self.now + e.retry_after_s, RETRY, r, None)
            return None
        self.counters.placements += 1
        self._dispatch(r, decision)
        return None

    def _dispatch(self, r: SimRequest, decision: Decision) -> None:
        decode = self.workers[decision.worker_id]
        prefill = self.workers[decision.prefill_worker_id] if decision.prefill_worker_id else decode
        r.decode_worker, r.prefill_worker = decode.worker_id, prefill.worker_id
        self.views.assign(decode.worker_id, r)
        if prefill is not decode:
            self.inflight[decode.worker_id] += 1
        self.views.mark(decode.worker_id)
        prefill.waiting.append(r)
        self._kick(prefill)

    def _queue_for_admission(self, r: SimRequest, *, retry_after_s: float | None) -> None:
        self.admission_queue.append(r)
        self.counters.admission_queued += 1
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "admission decision=queue request_id=%s at_s=%.3f queued=%d retry_after_s=%s",
                r.request_id,
                self.now,
                len(self.admission_queue),
                "-" if retry_after_s is None else f"{retry_after_s:.2f}",
            )
        if retry_after_s is not None:
            self._schedule_recheck(retry_after_s)

    def _schedule_recheck(self, retry_after_s: float) -> None:
        # Finishes wake the queue; the recheck covers KV that frees without one (a restart, a migration).
        if not self._recheck_pending:
            self._recheck_pending = True
            self._push(self.now + retry_after_s, ADMISSION_RECHECK, False, None)

    def _wake_admission(self) -> None:
        """The router's notify: try the waiters again once the event in progress is done (placing from inside a
        worker's step end would start a second step on it)."""
        if self.admission_queue and not self._wake_pending:
            self._wake_pending = True
            self._push(self.now, ADMISSION_RECHECK, True, None)

    def _on_admission_recheck(self, is_wake: bool, _b: object) -> None:
        if is_wake:
            self._wake_pending = False
        else:
            self._recheck_pending = False
        while self.admission_queue:  # FIFO, while admission lets the head go
            retry_after_s = self._try_place(self.admission_queue[0])
            if retry_after_s is not None:
                self._schedule_recheck(retry_after_s)
                return
            self.admission_queue.popleft()

    def _reroute_decode(self, r: SimRequest) -> str | None:
        """A new decode worker for a prefilled request whose own died (the router's replan); None: no healthy one."""
        try:
            decision = self.placement.route(self._route_request(r), self.views.view(self.now))
        except NoCapacityError:
            self.counters.no_capacity += 1
            return None
        target = decision.worker_id
        return target if self.workers[target].is_healthy else None

    # --- worker steps --------------------------------------------------------------------------------------------

    def _kick(self, w: SimWorker) -> None:
        """Something changed on `w`: start a step if it is idle, or cut its fast-forward run short."""
        self.views.mark(w.worker_id)
        if not w.is_healthy:
            return
        if w.plan is None:
            self._start_step(w)
        elif w.truncate(self.now):
            w.version += 1
            self._push(w.plan.end_s, STEP_END, w, w.version)

    def _start_step(self, w: SimWorker) -> None:
        for r in w.admit_pulls():
            dt = self.link.transfer_time_s(r.num_computed * self.kv_bytes_per_token)
            r.transfer_s += dt
            self.transfers[r.index] = r
            self._push(self.now + dt, TRANSFER_DONE, r, r.epoch)
        w.slowdown = self._slowdown(w)
        w.plan = w.plan_step(self.now)
        if w.plan is not None:
            self._push(w.plan.end_s, STEP_END, w, w.version)
        self.views.mark(w.worker_id)

    def _slowdown(self, w: SimWorker) -> float:
        """CPU sharing: a cost model with `contention(num_busy_workers)` stretches steps while others step too."""
        contention = getattr(w.cost, "contention", None)
        if contention is None:
            return 1.0
        return contention(1 + sum(1 for o in self.workers.values() if o is not w and o.plan is not None))

    def _on_step_end(self, w: SimWorker, version: int) -> None:
        if version != w.version or w.plan is None:
            return
        prefilled, finished = w.finish_plan()
        for r in finished:
            w.release(r)
            self._finish(r)
        for r in prefilled:
            if r.first_token_s < 0:
                r.first_token_s = self.now
            if r.num_generated >= r.output_len:
                w.release(r)
                self._finish(r)
            elif w.role == "prefill":
                self._hand_off(r, w)
            else:
                w.decoding.append(r)
        if self.commit_pending[w.worker_id]:
            self._commit_migrations(w)
        self._start_step(w)

    def _finish(self, r: SimRequest) -> None:
        assert r.finish_s < 0, f"request {r.request_id} finished twice"
        r.finish_s = self.now
        self.views.unassign(r.decode_worker, r)
        self.placement.finish(r.request_id)
        self.views.mark(r.decode_worker)
        self.num_finished += 1
        self.placement.observe(self._route_request(r), r.output_len)
        self._wake_admission()  # a finish frees KV

    def _hand_off(self, r: SimRequest, prefill: SimWorker) -> None:
        """P/D: the prompt's KV waits on `prefill` until its decode worker has blocks and pulls it."""
        decode = self.workers[r.decode_worker]
        if not decode.is_healthy:
            target = self._reroute_decode(r)
            if target is None:
                prefill.release(r)
                self._restart(r)
                return
            self.views.unassign(decode.worker_id, r)
            decode = self.workers[target]
            r.decode_worker = target
            self.views.assign(target, r)
            self.placement.move(r.request_id, target)
            self.counters.reroutes += 1
        else:
            self.inflight[decode.worker_id] -= 1
        self.held_for_pull[prefill.worker_id][r.index] = r
        decode.pulls.append(r)
        self._kick(decode)

    def _on_transfer_done(self, r: SimRequest, epoch: int) -> None:
        if epoch != r.epoch:
            return
        del self.transfers[r.index]
        src, dst = self.workers[r.prefill_worker], self.workers[r.decode_worker]
        computed = r.num_computed
        src.release(r)
        del self.held_for_pull[src.worker_id][r.index]
        r.num_computed, r.num_blocks = computed, cdiv(computed + 1, dst.block_size)
        dst.num_pulling -= 1
        dst.ready.append(r)
        self._kick(dst)
        self._kick(src)

    # --- failures --------------------------------------------------------------------------------------------------

    def _restart(self, r: SimRequest) -> None:
        """Start `r` over on another worker by recompute (its blocks must already be released)."""
        r.epoch += 1
        r.num_restarts += 1
        r.num_computed = r.num_blocks = 0  # the KV is gone (freed by the caller where its worker lives on)
        r.is_migrating, r.migrate_to = False, ""
        self.counters.restarts += 1
        self.placement.finish(r.request_id)  # placed again below, as a new attempt
        if self.views.unassign(r.decode_worker, r) and r.prefill_worker != r.decode_worker:
            self.inflight[r.decode_worker] = max(self.inflight[r.decode_worker] - 1, 0)
        self.views.mark(r.decode_worker)
        self._route(r)

    def _on_failure(self, worker_id: str, recover_after_s: float | None) -> None:
        w = self.workers[worker_id]
        if not w.is_healthy:
            return
        logger.info(
            "worker failed worker_id=%s at_s=%.3f requests=%d", worker_id, self.now, w.num_running + w.num_waiting
        )
        pulls = list(w.pulls)
        lost = w.fail()
        self.inflight[worker_id] = 0
        self.views.mark(worker_id)
        victims: list[SimRequest] = []
        for r in pulls:  # their KV is on a live prefill worker; free it there
            self.workers[r.prefill_worker].release(r)
            del self.held_for_pull[r.prefill_worker][r.index]
            victims.append(r)
        for r in list(self.held_for_pull[worker_id].values()):  # prefilled here, waiting for a pull elsewhere
            if r.index in self.transfers:
                continue  # on the link: handled with the transfers below
            self.workers[r.decode_worker].pulls.remove(r)
            victims.append(r)
        self.held_for_pull[worker_id].clear()
        for r in list(self.transfers.values()):
            if worker_id in (r.prefill_worker, r.decode_worker):
                src, dst = self.workers[r.prefill_worker], self.workers[r.decode_worker]
                if dst.is_healthy:
                    dst.num_pulling -= 1
                    dst.free_blocks += cdiv(r.num_computed + 1, dst.block_size)
                if src.is_healthy:
                    src.release(r)
                    del self.held_for_pull[src.worker_id][r.index]
                r.num_computed = r.num_blocks = 0
                del self.transfers[r.index]
                victims.append(r)
        for r in list(self.migrations.values()):
            if worker_id == r.migrate_to or r in lost:
                self._abort_migration(r)
        self.commit_pending[worker_id].clear()
        for r in lost + victims:
            self._restart(r)
        for other in {r.prefill_worker for r in victims} | {r.decode_worker for r in victims}:
            if self.workers[other].is_healthy:
                self._kick(self.workers[other])
        if recover_after_s is not None:
            self._push(self.now + recover_after_s, RECOVER, worker_id, None)

    def _on_recover(self, worker_id: str, _: object) -> None:
        w = self.workers[worker_id]
        w.is_healthy = True
        self.views.mark(worker_id)
        logger.info("worker recovered worker_id=%s at_s=%.3f", worker_id, self.now)
        self._wake_admission()

    # --- migration -------------------------------------------------------------------------------------------------

    def _on_migration_tick(self, _a: object, _b: object) -> None:
        """One rebalancer pass per role, as the control plane runs it: the production policy over the workers'
        running requests, with remaining lengths from the router's predictions."""
        cfg = self.config.migration
        in_flight: Counter[str] = Counter()
        for source, destination in self.migration_routes.values():
            in_flight.update((source, destination))
        history = MigrationHistory(in_flight=in_flight, last_started=self.migration_last_started)
        by_role: dict[str, list[MigrationView]] = {}
        predicted: dict[str, int] = {}
        for w in self.workers.values():
            if w.role == "prefill" or not w.is_healthy:
                continue
            by_role.setdefault(w.role, []).append(
                migration_view(w, max_tokens=self.config.max_tokens, predicted=predicted)
            )
        for views in by_role.values():
            if len(views) < 2:
                continue
            for decision in plan_rebalance(
                views, history=history, now=self.now, config=cfg.policy, predicted=predicted
            ):
                self._start_migration(decision)
        if self._is_busy():
            self._push(self.now + cfg.interval_s, MIGRATION_TICK, None, None)

    def _start_migration(self, decision: MigrationDecision) -> None:
        src, dst = self.workers[decision.source_id], self.workers[decision.destination_id]
        r = next(r for r in src.decoding if r.request_id == decision.request_id)
        r.is_migrating = True
        self.migrations[r.index] = r
        self.migration_routes[r.index] = (src.worker_id, dst.worker_id)
        self.migration_last_started[src.worker_id] = self.migration_last_started[dst.worker_id] = self.now
        self.counters.migrations_started += 1
        # Stage 1 copies what is there now while the request keeps decoding on the source (pre-copy).
        dt = self.link.transfer_time_s(r.num_computed * self.kv_bytes_per_token)
        self._push(self.now + dt, MIGRATION_COPIED, r, (r.epoch, dst.worker_id))
        logger.info(
            "migration started request_id=%s source=%s destination=%s", r.request_id, src.worker_id, dst.worker_id
        )

    def _end_migration(self, r: SimRequest) -> None:
        self.migrations.pop(r.index, None)
        self.migration_routes.pop(r.index, None)

    def _on_migration_copied(self, r: SimRequest, data: tuple[int, str]) -> None:
        epoch, destination = data
        if epoch != r.epoch or not r.is_migrating or r.finish_s >= 0:
            self._end_migration(r)
            return
        r.migrate_to = destination
        src = self.workers[r.decode_worker]
        self.commit_pending[src.worker_id].append(r)
        self._kick(src)  # commit at the step boundary in progress

    def _commit_migrations(self, src: SimWorker) -> None:
        pending, self.commit_pending[src.worker_id] = self.commit_pending[src.worker_id], []
        for r in pending:
            dst = self.workers[r.migrate_to] if r.migrate_to else None
            need = cdiv(r.num_computed + 1, src.block_size)
            if r.finish_s >= 0 or r not in src.decoding or dst is None or not dst.is_healthy or dst.free_blocks < need:
                self._abort_migration(r)
                continue
            src.decoding.remove(r)
            computed = r.num_computed
            src.release(r)
            r.num_computed, r.num_blocks = computed, need
            dst.free_blocks -= need
            dst.num_pulling += 1
            self.views.unassign(src.worker_id, r)
            self.views.assign(dst.worker_id, r)
            self.placement.move(r.request_id, dst.worker_id)
            r.decode_worker = dst.worker_id
            if src.role == "mixed":
                r.prefill_worker = dst.worker_id
            r.num_migrations += 1
            self.counters.migrations_committed += 1
            # Last stage: the blocks written since the pre-copy, while the request is paused.
            downtime = self.link.transfer_time_s(src.block_size * self.kv_bytes_per_token)
            self._push(self.now + downtime, MIGRATION_LANDED, r, (r.epoch, dst.worker_id))
            self.views.mark(src.worker_id)
            self.views.mark(dst.worker_id)
            logger.info(
                "migration committed request_id=%s source=%s destination=%s", r.request_id, src.worker_id, dst.worker_id
            )

    def _abort_migration(self, r: SimRequest) -> None:
        r.is_migrating, r.migrate_to = False, ""
        self._end_migration(r)
        self.counters.migrations_aborted += 1

    def _on_migration_landed(self, r: SimRequest, data: tuple[int, str]) -> None:
        epoch, destination = data
        self._end_migration(r)
        r.is_migrating, r.migrate_to = False, ""
        if epoch != r.epoch:
            return
        dst = self.workers[destination]
        if not dst.is_healthy:  # failed during the pause: its restart already covered this request
            return
        dst.num_pulling -= 1
        dst.ready.append(r)
        self._kick(dst)

    # --- sampling --------------------------------------------------------------------------------------------------

    def _on_sample(self, _a: object, _b: object) -> None:
        point: dict[str, float] = {"t": round(self.now, 6)}
        for role in sorted({w.role for w in self.workers.values()}):
            pool = [w for w in self.workers.values() if w.role == role and w.is_healthy]
            if not pool:
                continue
            point[f"{role}_queued"] = sum(w.num_waiting for w in pool)
            point[f"{role}_running"] = sum(w.num_running for w in pool)
            point[f"{role}_kv_mean"] = round(sum(w.used_blocks / w.kv_blocks for w in pool) / len(pool), 5)
            point[f"{role}_kv_max"] = round(max(w.used_blocks / w.kv_blocks for w in pool), 5)
        self.series.append(point)
        if self._is_busy():
            self._push(self.now + self.config.sample_interval_s, SAMPLE, None, None)


def run(config: SimConfig, *, progress: ProgressFn | None = None) -> SimResult:
    """Simulate `config` once."""
    return Simulator(config, progress=progress).run()
