"""The in-process engine: add requests, step, abort, read stats, and move KV between engines."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.config import EngineConfig, parse_dtype
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownAdapterError,
    UnknownRequestError,
)
from workers.engine.kv_transfer import BLOCK_DIM, KVExport, gather_blocks, scatter_blocks
from workers.engine.loader import load_model
from workers.engine.lora import LoRAManager, token_slots
from workers.engine.model_runner import ModelRunner, allocate_kv_cache, build_step_inputs, num_blocks_for_budget
from workers.engine.request import Completion, GenerateCall, Request, RequestOutput, RequestStatus
from workers.engine.sampler import sample, sample_each, token_generator
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig
from workers.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_THROUGHPUT_WINDOW_S = 10.0


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for routers, autoscalers and `raylane status`."""

    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    kv_usage: float
    """Used blocks over total blocks, in [0, 1]."""
    output_tokens_per_s: float
    """Generated tokens per second over the last ten seconds."""
    num_generated_tokens: int
    """Tokens generated since the engine started."""
    num_preemptions: int
    prefix_cache_hit_rate: float
    """Prompt tokens served from the prefix cache over prompt tokens scheduled."""
    expert_counts: dict[int, list[int]] = field(default_factory=dict)
    """MoE layer index -> tokens routed to each expert since start."""
    lora_adapters: list[str] = field(default_factory=list)
    """Adapters registered (loadable without a path)."""
    num_pending_prefill_tokens: int = 0
    """Prompt and recompute tokens queued or mid-prefill: the prefill work ahead of a new request."""
    resident_adapters: list[str] = field(default_factory=list)
    """Registered adapters sitting in a slot now."""
    num_adapter_slots: int = 0
    """Adapter slots (`max_loras`); 0 without LoRA support."""
    num_prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start (recomputes included)."""
    num_prefix_cache_hits: int = 0
    """Of those, tokens served from the cache."""


@dataclass
class _RequestExtras:
    """Per-request state the scheduler does not need: the detokenizer (sampling state is `(seed, output index)`)."""

    detokenizer: IncrementalDetokenizer | None


class Engine:
    """A continuous-batching, paged-KV engine that runs in the caller's thread.

    `step()` schedules one batch, runs the model once and returns what each request
    gained. The engine is not thread-safe; `AsyncEngine` wraps it for concurrent use.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._init_threads()
        self._init_model()
        self._init_scheduler()
        self._init_lora()
        self._extras: dict[str, _RequestExtras] = {}
        self._staged: dict[str, int] = {}
        """Incoming migrations: request id -> blocks written into its reservation so far."""
        self._token_times: deque[tuple[float, int]] = deque()
        self._num_generated_tokens = 0

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> Engine:
        return cls(EngineConfig(model=str(model), **kwargs))

    def _init_threads(self) -> None:
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)

    def _init_model(self) -> None:
        dtype = None if self.config.dtype == "auto" else parse_dtype(self.config.dtype)
        self.model_config, self.model = load_model(
            self.config.model,
            dtype=dtype,
            quantization=self.config.quantization,
            quantization_group_size=self.config.quantization_group_size,
        )
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = Tokenizer.from_pretrained(self.config.model)
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's context "
                f"({self.model_config.max_position_embeddings})"
            )

    def _init_scheduler(self) -> None:
        num_blocks = num_blocks_for_budget(
            self.model_config,
            kv_cache_bytes=self.config.kv_cache_bytes,
            block_size=self.config.block_size,
            dtype=self.dtype,
        )
        kv_cache = allocate_kv_cache(
            self.model_config, num_blocks=num_blocks, block_size=self.config.block_size, dtype=self.dtype
        )
        self.runner = ModelRunner(self.model, self.model_config, kv_cache, self.config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                block_size=self.config.block_size,
                num_blocks=num_blocks,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_num_seqs=self.config.max_num_seqs,
                enable_prefix_caching=self.config.enable_prefix_caching,
                max_model_len=self.max_model_len,
                max_loras=self.config.max_loras or None,
                short_prompt_tokens=self.config.short_prompt_tokens,
            )
        )
        logger.info(
            "engine ready model=%s arch=%s dtype=%s kv_blocks=%d block_size=%d kv_bytes=%d",
            self.config.model,
            self.model_config.architecture,
            self.dtype,
            num_blocks,
            self.config.block_size,
            kv_cache.numel() * kv_cache.element_size(),
        )

    def _init_lora(self) -> None:
        self.lora: LoRAManager | None = None
        if self.config.max_loras > 0:
            self.lora = LoRAManager(
                self.model.lora_targets(),
                max_loras=self.config.max_loras,
                max_lora_rank=self.config.max_lora_rank,
                dtype=self.dtype,
            )

    # ---- adapters -------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> int:
        """Register a PEFT adapter under `name`; it is loaded into a slot when a request needs it."""
        if self.lora is None:
            raise ValueError("this engine was started with max_loras=0; restart it with max_loras > 0 to serve LoRA")
        return self.lora.add_adapter(name, path)

    def remove_lora(self, name: str) -> None:
        if self.lora is None or not self.lora.has_adapter(name):
            raise UnknownAdapterError(f"no LoRA adapter named {name!r} is loaded")
        lora_id = self.lora.lora_id(name)
        users = [r.request_id for r in self.scheduler.requests.values() if r.lora_id == lora_id]
        if users:
            raise InvalidRequestError(f"adapter {name!r} is in use by {len(users)} request(s), e.g. {users[0]!r}")
        self.lora.remove_adapter(name)

    def list_loras(self) -> list[str]:
        return [] if self.lora is None else self.lora.list_adapters()

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, call: GenerateCall, *, arrival_time: float | None = None) -> None:
        """Queue `call` as it came from the router. Raises an `InvalidRequestError` subclass for bad input.

        Resuming (failover): `call.resume_output_token_ids` are output tokens a caller already received from
        another engine. They are recomputed with the prompt (like a preempted request), count toward
        `max_tokens` and stop checks, and are never reported again: outputs start at output index
        `len(resume_output_token_ids)`, and text at character `resume_num_text_chars` of the output text.
        """
        request_id, params = call.request_id, call.sampling
        if request_id in self._extras:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        prompt_ids = self._tokenize(call.prompt if call.prompt is not None else call.prompt_token_ids or ())
        self._check_prompt_length(len(prompt_ids))
        resume_ids = self._check_resume(params, call.resume_output_token_ids, call.resume_num_text_chars)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=params,
            eos_token_ids=self._eos_token_ids(),
            lora_id=self._resolve_lora(call.adapter),
            lora_name=call.adapter,
            priority=call.priority,
            output_token_ids=resume_ids,
            **({} if arrival_time is None else {"arrival_time": arrival_time}),
        )
        extras = self._make_extras(request, num_emitted_output_tokens=0)
        if resume_ids and extras.detokenizer is not None:
            try:
                extras.detokenizer.skip(resume_ids, call.resume_num_text_chars)
            except ValueError as exc:
                raise InvalidRequestError(f"cannot resume request {request_id!r}: {exc}") from None
        self.scheduler.add_request(request)
        self._extras[request_id] = extras
        if resume_ids:
            logger.info(
                "request resumed request_id=%s prompt_tokens=%d resume_tokens=%d resume_text_chars=%d",
                request_id,
                len(prompt_ids),
                len(resume_ids),
                call.resume_num_text_chars,
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks. Returns False when the id is unknown or already done."""
        if not self.release(request_id):
            return False
        logger.info("request aborted request_id=%s", request_id)
        return True

    def release(self, request_id: str) -> bool:
        """Drop a request whose state moved to another engine (after `export_kv`) and free its blocks.

        Like `abort` without the abort log line; full blocks stay in the prefix cache. Returns False
        when the id is unknown or already done.
        """
        if request_id not in self._extras:
            return False
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        del self._extras[request_id]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Schedule one batch, run the model once, sample, and report each scheduled request's progress."""
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return []
        inputs = build_step_inputs(scheduled.scheduled, block_size=self.config.block_size)
        logits = self.runner.execute(inputs, self._lora_slots(scheduled.scheduled))
        sampled, failed = self._sample(logits, inputs.sampling_request_ids)
        failed_outputs = [self._fail(request_id, error) for request_id, error in failed.items()]
        updates = self.scheduler.update_from_output(scheduled, {rid: tok for rid, (tok, _) in sampled.items()})
        now = time.monotonic()
        outputs = [self._make_output(request, new_ids, sampled) for request, new_ids in updates] + failed_outputs
        num_new = sum(len(o.new_token_ids) for o in outputs)
        if num_new:
            self._token_times.append((now, num_new))
            self._num_generated_tokens += num_new
        return outputs

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        lora_names: Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion and return one `Completion` per prompt, in order."""
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        lora_list = list(lora_names) if lora_names is not None else [None] * len(prompts)
        if not len(params_list) == len(lora_list) == len(prompts):
            raise ValueError("prompts, params and lora_names must have the same length")
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p, lora in zip(ids, prompts, params_list, lora_list, strict=True):
            text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, tuple(prompt))
            self.add_request(
                GenerateCall(request_id=rid, prompt=text, prompt_token_ids=token_ids, sampling=p, adapter=lora)
            )
        finals: dict[str, Completion] = {}
        running = {rid: Completion(request_id=rid, output_token_ids=[], text="", finish_reason=None) for rid in ids}
        while len(finals) < len(ids):
            for out in self.step():
                done = running.get(out.request_id)
                if done is None:
                    continue
                done.output_token_ids.extend(out.new_token_ids)
                done.text += out.text_delta
                if out.logprobs:
                    done.logprobs = done.logprobs or []
                    done.logprobs.extend(out.logprobs)
                if out.finished:
                    done.finish_reason = out.finish_reason
                    done.num_prompt_tokens, done.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
                    finals[out.request_id] = running.pop(out.request_id)
        return [finals[rid] for rid in ids]

    # ---- KV handoff -----------------------------------------------------------------------

    def export_kv(self, request_id: str, from_block: int = 0, *, full_blocks_only: bool = False) -> KVExport:
        """Copy a request's computed KV blocks from `from_block` on, plus the state to resume it elsewhere.

        `full_blocks_only` leaves out a partly filled last block (a pre-copy stage: that block still changes).
        """
        request = self._running_request(request_id)
        block_ids = self.scheduler.get_block_ids(request_id)
        num_blocks = request.num_computed_tokens // self.config.block_size
        if not full_blocks_only:
            num_blocks = -(-request.num_computed_tokens // self.config.block_size)
        if not 0 <= from_block <= num_blocks:
            raise ValueError(f"from_block={from_block} is outside [0, {num_blocks}] for request {request_id!r}")
        extras = self._extras[request_id]
        logger.info(
            "kv export request_id=%s from_block=%d blocks=%d tokens=%d",
            request_id,
            from_block,
            num_blocks - from_block,
            request.num_computed_tokens,
        )
        return KVExport(
            request_id=request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            lora_name=request.lora_name,
            priority=request.priority,
            num_computed_tokens=request.num_computed_tokens,
            block_size=self.config.block_size,
            from_block=from_block,
            kv=gather_blocks(self.runner.kv_cache, block_ids[from_block:num_blocks]),
            detokenizer_state=None if extras.detokenizer is None else extras.detokenizer.snapshot(),
        )

    def import_kv(self, export: KVExport, *, reserved: bool = False) -> None:
        """Install a request exported by another engine (from block 0) and continue decoding it here.

        With `reserved` this is a migration's commit: the blocks before `export.from_block` were
        already written by `stage_kv` into the request's reservation, whose blocks the request takes.
        """
        self._check_export(export)
        if reserved and self._staged.get(export.request_id) != export.from_block:
            raise ValueError(
                f"commit of {export.request_id!r} from block {export.from_block}, but "
                f"{self._staged.get(export.request_id, 'no reservation: 0')} blocks were staged"
            )
        if not reserved and export.from_block != 0:
            raise ValueError("import_kv needs a full export (from_block=0); incremental imports are for migration")
        request = Request(
            request_id=export.request_id,
            prompt_token_ids=export.prompt_token_ids,
            sampling_params=export.sampling_params,
            eos_token_ids=self._eos_token_ids(),
            lora_id=self._resolve_lora(export.lora_name),
            lora_name=export.lora_name,
            priority=export.priority,
            output_token_ids=list(export.output_token_ids),
            num_computed_tokens=export.num_computed_tokens,
        )
        block_ids = self.scheduler.add_imported_request(request, export.request_id if reserved else None)
        self._staged.pop(export.request_id, None)
        new_blocks = block_ids[export.from_block : export.from_block + export.num_blocks]
        scatter_blocks(self.runner.kv_cache, new_blocks, export.kv.to(self.dtype))
        extras = self._make_extras(request, num_emitted_output_tokens=len(export.output_token_ids))
        if export.detokenizer_state is not None and extras.detokenizer is not None:
            extras.detokenizer = IncrementalDetokenizer.restore(
                self.tokenizer, export.detokenizer_state, export.sampling_params.stop
            )
        self._extras[export.request_id] = extras
        logger.info(
            "kv imported request_id=%s blocks=%d tokens=%d bytes=%d",
            export.request_id,
            export.num_blocks,
            export.num_computed_tokens,
            export.nbytes,
        )

    def reserve_kv(self, request_id: str, num_blocks: int) -> None:
        """Destination of a migration: hold `num_blocks` blocks for `request_id` (grows an existing reservation)."""
        if request_id in self._extras:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        self.scheduler.reserve_blocks(request_id, num_blocks)
        self._staged.setdefault(request_id, 0)

    def stage_kv(self, export: KVExport) -> None:
        """Write a pre-copy stage (blocks from `export.from_block`, right after the last stage) into the reservation."""
        self._check_export(export)
        staged = self._staged.get(export.request_id)
        if staged != export.from_block:
            raise ValueError(f"stage of {export.request_id!r} from block {export.from_block}, expected {staged}")
        end = export.from_block + export.num_blocks
        block_ids = self.scheduler.reserve_blocks(export.request_id, end)
        scatter_blocks(self.runner.kv_cache, block_ids[export.from_block : end], export.kv.to(self.dtype))
        self._staged[export.request_id] = end

    def release_reservation(self, request_id: str) -> int:
        """Drop an incoming migration that will not commit; returns the blocks freed."""
        self._staged.pop(request_id, None)
        return self.scheduler.release_reservation(request_id)

    def pause(self, request_id: str) -> None:
        """Source of a migration: stop stepping a running request, keeping its KV, for the final copy."""
        self._running_request(request_id)
        self.scheduler.pause(request_id)

    def unpause(self, request_id: str) -> bool:
        """Resume a paused request (its migration aborted); False when it is not paused."""
        return self.scheduler.unpause(request_id)

    # ---- stats ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        now = time.monotonic()
        while self._token_times and now - self._token_times[0][0] > _THROUGHPUT_WINDOW_S:
            self._token_times.popleft()
        window_tokens = sum(n for _, n in self._token_times)
        total = self.scheduler.num_free_blocks + self.scheduler.num_used_blocks
        expert_counts = self.model.expert_counts() if self.model_config.is_moe else {}
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks_total=total,
            num_kv_blocks_used=self.scheduler.num_used_blocks,
            num_kv_blocks_free=self.scheduler.num_free_blocks,
            kv_usage=self.scheduler.num_used_blocks / total,
            output_tokens_per_s=window_tokens / _THROUGHPUT_WINDOW_S,
            num_generated_tokens=self._num_generated_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_pending_prefill_tokens=self.scheduler.num_pending_prefill_tokens,
            prefix_cache_hit_rate=self.scheduler.prefix_cache_hit_rate,
            num_prefix_cache_queries=self.scheduler.num_prefix_cache_queries,
            num_prefix_cache_hits=self.scheduler.num_prefix_cache_hits,
            expert_counts=expert_counts,
            lora_adapters=self.list_loras(),
            resident_adapters=[] if self.lora is None else self.lora.resident_adapters(),
            num_adapter_slots=0 if self.lora is None else self.lora.max_loras,
        )

    def prefix_block_hashes(self, limit: int) -> list[int]:
        """The prefix-cache summary a worker publishes: `stable_block_hash` of up to `limit` reachable blocks."""
        names = {} if self.lora is None else {self.lora.lora_id(name): name for name in self.lora.list_adapters()}
        return self.scheduler.kv.cached_block_hashes(limit, names)

    # ---- internals ------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)  # `GenerateCall` made them ints
            vocab = self.model_config.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise EmptyPromptError("the prompt is empty; send at least one token")
        return ids

    def _check_prompt_length(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but the model's context is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )

    def _eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids or self.tokenizer.eos_token_ids

    def _resolve_lora(self, lora_name: str | None) -> int:
        if lora_name is None:
            return 0
        if self.lora is None or not self.lora.has_adapter(lora_name):
            raise UnknownAdapterError(f"unknown LoRA adapter {lora_name!r}; loaded: {self.list_loras()}")
        return self.lora.lora_id(lora_name)

    def _check_export(self, export: KVExport) -> None:
        if export.block_size != self.config.block_size:
            raise ValueError(
                f"block size mismatch: export has {export.block_size}, engine uses {self.config.block_size}"
            )
        if export.request_id in self._extras:
            raise DuplicateRequestError(f"request id {export.request_id!r} is already in the engine")
        cache_shape = list(self.runner.kv_cache.shape)
        cache_shape[BLOCK_DIM] = export.num_blocks
        if list(export.kv.shape) != cache_shape:
            raise ValueError(f"KV shape {tuple(export.kv.shape)} does not fit this model's cache layout")

    def _running_request(self, request_id: str) -> Request:
        request = self.scheduler.get_request(request_id)
        if request is None or request_id not in self._extras:
            raise UnknownRequestError(f"no request {request_id!r} in this engine")
        if request.status != RequestStatus.RUNNING or request.num_computed_tokens == 0:
            raise InvalidRequestError(f"request {request_id!r} has no KV to export (status {request.status.value})")
        return request

    def _check_resume(
        self,
        params: SamplingParams,
        resume_output_token_ids: Sequence[int],
        resume_num_text_chars: int,
    ) -> list[int]:
        resume_ids = [int(t) for t in resume_output_token_ids]
        vocab = self.model_config.vocab_size
        bad = next((t for t in resume_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"resume token id {bad} is outside the vocabulary [0, {vocab})")
        if len(resume_ids) >= params.max_tokens:
            raise InvalidRequestError(
                f"cannot resume with {len(resume_ids)} output tokens: max_tokens={params.max_tokens} was reached"
            )
        if resume_num_text_chars < 0 or (resume_num_text_chars and not resume_ids):
            raise InvalidRequestError(
                f"resume_num_text_chars={resume_num_text_chars} needs resume tokens and must be >= 0"
            )
        return resume_ids  # the scheduler refuses prompt + resume past the context

    def _make_extras(self, request: Request, *, num_emitted_output_tokens: int) -> _RequestExtras:
        params = request.sampling_params
        detok = None
        if params.detokenize:
            emitted = request.output_token_ids[:num_emitted_output_tokens]
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids + emitted, params.stop)
        return _RequestExtras(detokenizer=detok)

    def _lora_slots(self, scheduled: Sequence[ScheduledRequest]) -> torch.Tensor | None:
        if self.lora is None:
            return None
        lora_ids = {s.request.lora_id for s in scheduled if s.request.lora_id}
        if not lora_ids:
            return None
        slot_of = self.lora.activate(lora_ids)
        per_request = [slot_of.get(s.request.lora_id, -1) if s.request.lora_id else -1 for s in scheduled]
        return token_slots(per_request, [s.num_new_tokens for s in scheduled])

    def _sample(
        self, logits: torch.Tensor, request_ids: list[str]
    ) -> tuple[dict[str, tuple[int, dict[int, float] | None]], dict[str, str]]:
        """The sampled token (and logprobs) per request, and the error of each request whose sampling failed."""
        if not request_ids:
            return {}, {}
        requests = [self.scheduler.get_request(rid) for rid in request_ids]
        params = [r.sampling_params for r in requests]
        # Index of the token each request samples now: a seeded draw depends on (seed, index) only.
        generators = [
            None if p.is_greedy or p.seed is None else token_generator(p.seed, r.num_output_tokens)
            for r, p in zip(requests, params, strict=True)
        ]
        try:
            out, failures = sample(logits, params, generators), {}
        except Exception:
            # Sampled again row by row: a request whose values break the sampler must not fail the whole batch.
            out, failures = sample_each(logits, params, generators)
        failed = {request_ids[i]: f"sampling failed: {type(exc).__name__}: {exc}" for i, exc in failures.items()}
        sampled = {
            rid: (tok, lp)
            for rid, tok, lp in zip(request_ids, out.token_ids, out.logprobs, strict=True)
            if rid not in failed
        }
        return sampled, failed

    def _fail(self, request_id: str, error: str) -> RequestOutput:
        """Abort one request the step could not serve; its output carries `error` to its caller."""
        request = self.scheduler.get_request(request_id)
        num_output_tokens = 0 if request is None else request.num_output_tokens
        self.release(request_id)
        logger.warning("request failed alone request_id=%s error=%s", request_id, error)
        return RequestOutput(
            request_id=request_id,
            new_token_ids=[],
            num_output_tokens=num_output_tokens,
            finished=True,
            finish_reason="abort",
            error=error,
        )

    def _make_output(
        self, request: Request, new_ids: list[int], sampled: dict[str, tuple[int, dict[int, float] | None]]
    ) -> RequestOutput:
        extras = self._extras.get(request.request_id)
        text_delta = ""
        if extras is not None and extras.detokenizer is not None and new_ids:
            text_delta, matched = extras.detokenizer.update(new_ids)
            if matched is not None and not request.is_finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            elif request.is_finished:
                text_delta += extras.detokenizer.flush()
        logprobs = None
        if new_ids and request.sampling_params.logprobs is not None:
            logprobs = [sampled[request.request_id][1]]
        if request.is_finished:
            self._extras.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            num_output_tokens=request.num_output_tokens,
            text_delta=text_delta,
            finished=request.is_finished,
            finish_reason=request.status.value if request.is_finished else None,
            logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )
