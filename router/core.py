"""The router's request path, free of gRPC and Ray: authenticate, validate, admit, place, stream.

`RouterServicer` (gRPC) and tests drive it; `Directory` supplies the routing table, the
cluster view and the worker clients (from Ray in production, in-process in tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry

from router.admission import AdmissionController
from router.complexity import TierSelector, TierSelectorConfig
from router.dispatch import FailoverConfig, WorkerClient, run_placed
from router.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RouterError,
    Unauthenticated,
    Unavailable,
)
from router.kv_forecast import KvLedger
from router.length_predictor import LengthPredictor, prompt_features
from router.metrics import RouterMetrics
from router.placement import PlacementCore, ViewOverlay, without_workers
from router.policy import ClusterView, Decision, LeastLoadedPolicy, NoCapacityError, Policy, RouteRequest
from router.quota import QuotaExceededError, QuotaTracker
from router.table import DeploymentRoute, RoutingTable
from workers.engine.errors import InvalidRequestError
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall, TokenChunk

logger = logging.getLogger(__name__)

FORCED_REFRESH_INTERVAL_S = 0.1
"""At most one on-demand routing-table refresh per this interval (see `RouterCore._admit_fresh`)."""

MAX_PROMPT_CHARS = 1 << 20
"""Refuse absurd prompts before they cost a tokenizer pass (1 MiB of text)."""

MAX_PROMPT_TOKENS = 1 << 18
"""Longest `prompt_token_ids` accepted when the deployment's context is unknown (its context otherwise)."""

TOKENIZE_INLINE_MAX_CHARS = 4096
"""Text prompts longer than this are tokenized on a thread: a 1 MiB prompt holds the tokenizer ~1 s."""


@dataclass(kw_only=True, frozen=True)
class GenerateInput:
    """A client's request, converted from protobuf at the edge."""

    deployment: str
    prompt: str = ""
    prompt_token_ids: tuple[int, ...] = ()
    adapter: str = ""
    max_tokens: int = 0
    """0 means the default (16)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    """0 means 1.0."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    request_id: str = ""
    priority: int = 0
    tier: str = ""
    """When `deployment` names a tier group: `small` or `large` pins the tier; empty lets complexity choose."""
    logprobs: int | None = None
    """Return the logprobs of each sampled token and of the top-n alternatives (`TokenChunk.logprobs`); None: off."""


class Directory(Protocol):
    """Where the router's knowledge of the cluster comes from."""

    def table(self) -> RoutingTable: ...

    def view(self) -> ClusterView: ...

    def clients(self) -> Mapping[str, WorkerClient]: ...

    # Optional: `async def refresh_table(self) -> None` pulls the table now (see `RouterCore._admit_fresh`).
    # Optional: `def mark_unhealthy(self, worker_id: str) -> None` keeps a worker a request lost out of placement.
    # Optional: `def tokenize(self, deployment: str, text: str) -> tuple[int, ...] | None` tokenizes a text prompt
    # without blocking (None: tokenizer not loaded); the router then routes on, and sends, token ids.


class RouterCore:
    """One router replica's request path. Not thread-safe: everything runs on one event loop."""

    def __init__(
        self,
        directory: Directory,
        *,
        policy: Policy | None = None,
        quotas: QuotaTracker | None = None,
        predictor: LengthPredictor | None = None,
        admission: AdmissionController | None = None,
        failover: FailoverConfig | None = None,
        tiers: TierSelectorConfig | None = None,
        metrics: RouterMetrics | None = None,
    ):
        self.directory = directory
        # A private registry by default: only the process's router (`RouterReplica`) records into the served one.
        self.metrics = metrics or RouterMetrics(CollectorRegistry())
        self.failover = failover or FailoverConfig()
        self.quotas = quotas or QuotaTracker()
        # None places at once wherever the policy says, as before predictive admission existed.
        self.admission = admission
        # predict → admit → place → ledger, the same object the simulator runs. Its ledger is always kept (cheap):
        # it feeds `WorkerView.kv_ledger`, which length-aware scorers and admission read.
        self.placement = PlacementCore(
            policy or LeastLoadedPolicy(),
            predictor=predictor,
            admission=admission.config if admission is not None else None,
        )
        self._inflight: Counter[str] = Counter()
        self._overlay = ViewOverlay(self._inflight, self.placement.ledger)
        self._request_ids: set[str] = set()
        """Ids of the requests in flight on this router; a second request under one of them is refused."""
        self._ledger_keys = itertools.count()
        self._last_forced_refresh = 0.0
        self._forced_refresh: asyncio.Future | None = None
        self.tier_config = tiers or TierSelectorConfig()
        self._tier_selectors: dict[str, TierSelector] = {}
        """Tier group name -> its selector; each calibrates on its own group's traffic."""

    @property
    def policy(self) -> Policy:
        return self.placement.policy

    @property
    def predictor(self) -> LengthPredictor | None:
        return self.placement.predictor

    @predictor.setter
    def predictor(self, predictor: LengthPredictor | None) -> None:
        self.placement.predictor = predictor  # a router restores the saved one after it started

    @property
    def kv_ledger(self) -> KvLedger:
        return self.placement.ledger

    def authenticate(self, api_key: str | None) -> str:
        """The tenant behind `api_key`, or `Unauthenticated`."""
        if not api_key:
            raise Unauthenticated("missing API key: send metadata `authorization: Bearer <key>`")
        tenant = self.directory.table().tenant_for_key(api_key)
        if tenant is None:
            raise Unauthenticated("unknown or revoked API key")
        return tenant

    def prepare(self, tenant: str, inp: GenerateInput) -> tuple[GenerateCall, RouteRequest]:
        """Validate `inp` for `tenant` and build the worker call; raises `RouterError` subclasses."""
        table = self.directory.table()
        if not inp.deployment:
            raise InvalidArgument("deployment is required")
        _check_finite(inp)
        deployment = self._resolve_tier(table, inp)
        if deployment not in table.deployments:
            # Never list the deployments: they are other tenants' business.
            raise NotFound(f"unknown deployment {deployment!r}")
        if bool(inp.prompt) == bool(inp.prompt_token_ids):
            raise InvalidArgument("give exactly one of prompt or prompt_token_ids (non-empty)")
        if len(inp.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt is {len(inp.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if len(inp.prompt_token_ids) > MAX_PROMPT_TOKENS:
            raise InvalidArgument(
                f"prompt_token_ids has {len(inp.prompt_token_ids)} ids; the limit is {MAX_PROMPT_TOKENS}"
            )
        adapter = inp.adapter or None
        if adapter is not None:
            owner = table.adapter_owners.get((deployment, adapter))
            if owner is None:
                raise NotFound(f"unknown adapter {adapter!r} for deployment {deployment!r}")
            if owner != tenant:
                raise PermissionDenied(f"adapter {adapter!r} belongs to another tenant")
        try:
            sampling = SamplingParams(
                max_tokens=inp.max_tokens or 16,
                temperature=inp.temperature,
                top_k=inp.top_k,
                top_p=inp.top_p or 1.0,
                seed=inp.seed,
                stop=inp.stop,
                stop_token_ids=inp.stop_token_ids,
                ignore_eos=inp.ignore_eos,
                logprobs=inp.logprobs,
            )
        except InvalidRequestError as exc:
            raise InvalidArgument(str(exc)) from None
        request_id = f"{tenant}/{inp.request_id or uuid.uuid4().hex}"
        token_ids = tuple(inp.prompt_token_ids) or self._tokenize(deployment, inp.prompt)
        _check_lengths(table.deployments[deployment], len(token_ids) if token_ids else None, sampling.max_tokens)
        call = GenerateCall(
            request_id=request_id,
            prompt=None if token_ids else inp.prompt,
            prompt_token_ids=token_ids or None,
            sampling=sampling,
            adapter=adapter,
            priority=inp.priority,
        )
        estimate = len(token_ids) if token_ids else len(inp.prompt) // 4 + 1
        route = RouteRequest(
            request_id=request_id,
            deployment=deployment,
            tenant=tenant,
            adapter=adapter,
            num_prompt_tokens_estimate=estimate,
            max_tokens=sampling.max_tokens,
            prompt_token_ids=call.prompt_token_ids,
        )
        return call, route

    def _tokenize(self, deployment: str, text: str) -> tuple[int, ...] | None:
        # The worker would tokenize anyway; doing it here lets prefix affinity hash the prompt, and is exact
        # because router and worker use the same tokenizer class on the same model folder.
        tokenize = getattr(self.directory, "tokenize", None)
        if tokenize is None or not text or len(text) > TOKENIZE_INLINE_MAX_CHARS:
            return None  # a long text is left to `_tokenize_off_loop`
        return tokenize(deployment, text) or None

    async def _tokenize_off_loop(self, call: GenerateCall, route: RouteRequest) -> tuple[GenerateCall, RouteRequest]:
        """Tokenize a text prompt `prepare` left as text because it is long, on a thread, then check its length."""
        tokenize = getattr(self.directory, "tokenize", None)
        if call.prompt is None or tokenize is None or len(call.prompt) <= TOKENIZE_INLINE_MAX_CHARS:
            return call, route
        token_ids = tuple(await asyncio.to_thread(tokenize, route.deployment, call.prompt) or ())
        if not token_ids:
            return call, route
        deployment = self.directory.table().deployments.get(route.deployment)
        if deployment is not None:
            _check_lengths(deployment, len(token_ids), route.max_tokens)
        call = dataclasses.replace(call, prompt=None, prompt_token_ids=token_ids)
        route = dataclasses.replace(route, prompt_token_ids=token_ids, num_prompt_tokens_estimate=len(token_ids))
        return call, route

    def _resolve_tier(self, table: RoutingTable, inp: GenerateInput) -> str:
        """The deployment `inp` runs on: itself, or the tier its tier group's selector picks."""
        if inp.tier not in ("", "small", "large"):
            raise InvalidArgument(f"tier must be 'small', 'large' or empty, got {inp.tier!r}")
        group = table.groups.get(inp.deployment)
        if group is None:
            if inp.tier:
                raise InvalidArgument(f"tier applies to tier groups; {inp.deployment!r} is not one")
            return inp.deployment
        selector = self._tier_selectors.get(inp.deployment)
        if selector is None or selector.group != group:
            selector = self._tier_selectors[inp.deployment] = TierSelector(group, config=self.tier_config)
        # Token-id prompts carry no text to score: they take the small tier unless they pin one.
        pinned = inp.tier or (None if inp.prompt else "small")
        return selector.select(inp.request_id or "-", inp.prompt, pinned_tier=pinned).deployment

    async def generate(self, api_key: str | None, inp: GenerateInput) -> AsyncIterator[TokenChunk]:
        """The whole request path; closing the iterator early (cancel, deadline) aborts on the worker."""
        request = self.metrics.start_request()
        try:
            tenant, call, route = await self._admit_fresh(api_key, inp)
            request.bind(route.deployment, tenant)
            call, route = await self._tokenize_off_loop(call, route)
            if route.request_id in self._request_ids:
                # Two streams under one id would run twice on different workers and mix in every log and ledger.
                raise InvalidArgument(
                    f"request_id {inp.request_id!r} is already in flight; give each request its own id"
                )
            features = prompt_features(inp.prompt) if self.predictor is not None and inp.prompt else None
            route = self.placement.predict(route, features)
            limits = self.directory.table().tenants.get(tenant)
            if limits is None:
                raise Unauthenticated(f"tenant {tenant!r} no longer exists")
            try:
                reservation = self.quotas.acquire(tenant, limits, route.num_prompt_tokens_estimate + route.max_tokens)
            except QuotaExceededError as exc:
                request.on_rejected("quota")
                raise ResourceExhausted(str(exc), retry_after_s=exc.retry_after_s) from None
            used_tokens = route.num_prompt_tokens_estimate
            num_output_tokens = 0
            # One key per attempt: clients may reuse a request id, the ledger must not mix two attempts.
            ledger_key = f"{route.request_id}#{next(self._ledger_keys)}"
            self._request_ids.add(route.request_id)
            try:
                decision = await self._place_admitted(route, ledger_key)
                request.on_placed()
                placed = [w for w in (decision.worker_id, decision.prefill_worker_id) if w]
                self._count_inflight(placed, +1)

                def replan(lost: frozenset[str]) -> tuple[Decision, Mapping[str, WorkerClient]]:
                    return self._replan(route, lost), self.directory.clients()

                def on_placed(moved: Decision) -> None:
                    # Load accounting follows the request to its new worker (failover or migration).
                    nonlocal placed
                    self._count_inflight(placed, -1)
                    placed = [w for w in (moved.worker_id, moved.prefill_worker_id) if w]
                    self._count_inflight(placed, +1)
                    if ledger_key in self.kv_ledger:  # not once its finish released it
                        self._overlay.mark([self.kv_ledger.worker_of(ledger_key) or "", moved.worker_id])
                        self.placement.move(ledger_key, moved.worker_id)

                try:
                    stream = run_placed(
                        decision,
                        call,
                        self.directory.clients(),
                        replan=replan,
                        failover=self.failover,
                        on_placed=on_placed,
                    )
                    async with aclosing(stream):
                        while (chunk := await _next_chunk(stream)) is not None:
                            used_tokens += len(chunk.token_ids)
                            num_output_tokens += len(chunk.token_ids)
                            self.kv_ledger.record_tokens(
                                ledger_key, len(chunk.token_ids), num_prompt_tokens=chunk.num_prompt_tokens
                            )
                            self._overlay.mark(placed)
                            if chunk.token_ids:
                                request.on_tokens(len(chunk.token_ids))
                            if chunk.finished:
                                self._release_kv(ledger_key)  # before the client reads it: waiters go sooner
                                request.on_finished(chunk.finish_reason or "", chunk.num_prompt_tokens)
                            if chunk.finished and chunk.finish_reason in ("stop", "length") and self.predictor:
                                # Only complete generations teach the predictor; aborted lengths are unknown.
                                self.placement.observe(route, num_output_tokens, features)
                            yield chunk
                finally:
                    self._count_inflight(placed, -1)
            except RouterError:
                if not num_output_tokens:
                    used_tokens = 0  # refused by the worker or failed before its first token: nothing to charge
                raise
            finally:
                self._request_ids.discard(route.request_id)
                self._release_kv(ledger_key)  # cancel, deadline, worker error, or a placement that never ran
                self.quotas.release(reservation, limits, used_tokens)
        except BaseException as exc:  # cancellation and client disconnects included: every request is counted
            request.on_end(exc)
            raise
        request.on_end(None)

    async def _admit_fresh(self, api_key: str | None, inp: GenerateInput) -> tuple[str, GenerateCall, RouteRequest]:
        """Authenticate and validate; on an unknown key, deployment or adapter, refresh the table once and retry.

        A key issued (or a deployment applied) a moment ago works on its first request instead of
        after the next periodic refresh. Requests that miss while a forced refresh is running wait for
        that one; new forced refreshes start at most once per FORCED_REFRESH_INTERVAL_S (a miss in
        between waits for the next one rather than failing: its key may postdate the last refresh), so
        a flood of bad keys cannot flood the control plane.
        """
        try:
            tenant = self.authenticate(api_key)
            return (tenant, *self.prepare(tenant, inp))
        except (Unauthenticated, InvalidArgument):
            refresh = getattr(self.directory, "refresh_table", None)
            if not api_key or refresh is None:
                raise
        running = await self._forced_refresh_slot(refresh)
        # shield: one caller's cancellation must not cancel the refresh the others wait on.
        await asyncio.shield(running)
        tenant = self.authenticate(api_key)
        return (tenant, *self.prepare(tenant, inp))

    async def _forced_refresh_slot(self, refresh) -> asyncio.Future:
        """The running forced refresh, or a new one once the rate limit allows it."""
        while True:
            running = self._forced_refresh
            if running is not None and not running.done():
                return running
            wait_s = self._last_forced_refresh + FORCED_REFRESH_INTERVAL_S - time.monotonic()
            if wait_s <= 0:
                self._last_forced_refresh = time.monotonic()
                self._forced_refresh = asyncio.ensure_future(refresh())
                return self._forced_refresh
            await asyncio.sleep(wait_s)

    def _replan(self, route: RouteRequest, lost: frozenset[str]) -> Decision:
        """Place a request again after it lost the workers in `lost`, never on one of them."""
        mark_unhealthy = getattr(self.directory, "mark_unhealthy", None)
        for worker_id in lost:
            if mark_unhealthy is not None:
                mark_unhealthy(worker_id)
        return self._route(route, without_workers(self._view(), lost))

    async def _place_admitted(self, route: RouteRequest, ledger_key: str) -> Decision:
        """Place `route` (through admission when configured) and start tracking it in the KV ledger."""

        def place(view: ClusterView) -> Decision:
            return self._route(route, view, ledger_key)

        if self.admission is None:
            return place(self._view())
        try:
            return await self.admission.admit(route, view=self._view, place=place)
        except ResourceExhausted:
            self.metrics.on_rejected("queue_full", route.deployment, route.tenant)
            raise
        except _NoCapacity:
            raise  # counted by `_route`
        except Unavailable:
            self.metrics.on_rejected("wait_timeout", route.deployment, route.tenant)
            raise

    def _release_kv(self, ledger_key: str) -> None:
        worker_id = self.kv_ledger.worker_of(ledger_key)
        if worker_id is None or not self.placement.finish(ledger_key):
            return
        self._overlay.mark((worker_id,))
        if self.admission is not None:
            self.admission.notify_capacity_freed()

    def _count_inflight(self, worker_ids: Sequence[str], delta: int) -> None:
        for worker_id in worker_ids:
            self._inflight[worker_id] += delta
        self._overlay.mark(worker_ids)

    def _view(self) -> ClusterView:
        """The directory's view with what only this router knows (in-flight counts, KV ledger), kept incrementally:
        only workers whose counts changed since the last view are re-derived."""
        return self._overlay.view(self.directory.view())

    def _route(self, route: RouteRequest, view: ClusterView, ledger_key: str | None = None) -> Decision:
        """The placement core's decision (tracked under `ledger_key` when given), with its metrics."""
        try:
            if ledger_key is None:
                decision = self.placement.route(route, view)
            else:
                decision = self.placement.place(route, view, ledger_key)
        except NoCapacityError as exc:
            self.metrics.on_rejected("no_capacity", route.deployment, route.tenant)
            raise _NoCapacity(str(exc), retry_after_s=exc.retry_after_s) from None
        roles = _DISAGGREGATED if decision.prefill_worker_id else _MIXED
        self.metrics.on_routed(self.policy.name, route.deployment, roles, decision.deciding_terms)
        return decision


_MIXED = ("mixed",)
_DISAGGREGATED = ("prefill", "decode")
"""The pool roles a decision places on, for `raylane_routing_decisions_total{pool}`."""


class _NoCapacity(Unavailable):
    """No healthy worker for the request (as opposed to an admission wait that ran out)."""


def _check_finite(inp: GenerateInput) -> None:
    """Every float of a request must be finite: NaN passes every range check after this one."""
    for f in dataclasses.fields(inp):
        value = getattr(inp, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{f.name} must be a finite number, got {value}")


def _check_lengths(deployment: DeploymentRoute, num_prompt_tokens: int | None, max_tokens: int) -> None:
    """Refuse what the workers would refuse, before the request reserves quota (None: prompt not tokenized yet)."""
    context = deployment.max_model_len
    if context is None:
        return
    if max_tokens > context:
        raise InvalidArgument(
            f"max_tokens is {max_tokens} but deployment {deployment.name!r} has a context of {context}"
        )
    if num_prompt_tokens is not None and num_prompt_tokens >= context:
        raise InvalidArgument(
            f"the prompt has {num_prompt_tokens} tokens but deployment {deployment.name!r} has a context of {context} "
            "(prompt plus at least one generated token must fit)"
        )


async def _next_chunk(stream: AsyncIterator[TokenChunk]) -> TokenChunk | None:
    """The stream's next chunk (None at its end); worker failures become client-facing `RouterError`s.

    A coroutine, not a wrapping generator: each token passes through one generator less."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except RouterError:
        raise
    except InvalidRequestError as exc:
        raise InvalidArgument(_cause_message(exc)) from None
    except Exception as exc:
        logger.warning("worker call failed error=%s", type(exc).__name__, exc_info=True)
        raise Unavailable("the worker serving this request failed; retry", retry_after_s=0.5) from None


def _cause_message(exc: BaseException) -> str:
    # Ray wraps worker exceptions; the first line of the cause is the engine's own message.
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
