"""Runs an `Engine` step loop on a background thread and streams each request's tokens to asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from workers.engine.engine import Engine
from workers.engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from workers.engine.kv_transfer import KVExport
from workers.engine.request import GenerateCall, RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_WAIT_S = 0.05


class AsyncEngine:
    """Thread-safe front for one `Engine`.

    Every engine call happens on the loop thread, so the engine itself stays
    single-threaded. `generate` yields a `RequestOutput` per step the request advances;
    leaving the iterator early (client cancel, deadline) aborts the request and frees
    its blocks. `prefill` and `resume` are the two halves of a prefill/decode handoff.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], concurrent.futures.Future]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._handoffs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._progress_at = time.monotonic()
        """When the loop last finished a step or an idle wait: how liveness tells a stuck loop from a busy one."""
        self._thread = threading.Thread(target=self._loop, name="raylane-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[Engine], T]) -> concurrent.futures.Future[T]:
        """Run `fn(engine)` on the loop thread between steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)

        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}")
        self._commands.put((run, future))
        self._wakeup.set()
        if self._error is not None:  # the loop died while this was queued: nobody else will answer it
            self._fail_commands()
        return future

    def check_alive(self, stall_timeout_s: float) -> None:
        """Raise `EngineDeadError` unless the step loop runs and finished a step or an idle wait within
        `stall_timeout_s` (a slow step is still progress; a loop that crashed or hangs is not)."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}")
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        stalled_s = time.monotonic() - self._progress_at
        if stalled_s > stall_timeout_s:
            raise EngineDeadError(f"the engine loop made no progress for {stalled_s:.0f}s")

    async def acall(self, fn: Callable[[Engine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    def generate(self, call: GenerateCall) -> AsyncIterator[RequestOutput]:
        """Stream `call`'s outputs; with resume tokens it continues a request begun elsewhere (see `Engine`).

        The request enters the engine on the first `anext`; closing the stream before it finished aborts it.
        """
        return self._stream(call.request_id, lambda engine: engine.add_request(call))

    def resume(self, export: KVExport) -> AsyncIterator[RequestOutput]:
        """Import a request exported by another engine and stream the tokens it generates from here on.

        The first output carries the first token this engine samples, not the ones in `export`.
        """
        return self._stream(export.request_id, lambda engine: engine.import_kv(export))

    async def prefill(self, call: GenerateCall) -> tuple[RequestOutput, KVExport | None]:
        """Run `call` up to its first token, export its KV and drop it from this engine.

        Returns the output that carries the first token and the export to `resume` elsewhere, or
        None for the export when the first token already finished the request (max_tokens=1, EOS,
        or an abort). The export is taken on the loop thread right after the step that sampled the
        token, so no later step can advance or free the request first.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[RequestOutput, KVExport | None]] = loop.create_future()

        def add(engine: Engine) -> None:
            engine.add_request(call)
            self._handoffs[call.request_id] = (loop, future)

        await self.acall(add)
        try:
            return await future
        finally:
            if not future.done():
                self.call(lambda engine: self._abort(engine, call.request_id))

    async def commit_migration(self, export: KVExport) -> AsyncIterator[RequestOutput]:
        """Commit an incoming migration (`Engine.import_kv(export, reserved=True)`) and return its output stream.

        The commit has happened when this returns; outputs buffer (unbounded) until the stream is read.
        Closing the stream after reading from it aborts the request, like `generate`.
        """
        stream = await self._register(export.request_id, lambda engine: engine.import_kv(export, reserved=True))
        return self._stream(export.request_id, registered=stream)

    async def hand_over(self, request_id: str, destination_id: str) -> bool:
        """Free a paused request that now runs on `destination_id`; its open stream ends with `migrated_to`.

        False (and nothing changes) when the request is no longer paused here, e.g. it was aborted meanwhile.
        """

        def run(engine: Engine) -> bool:
            request = engine.scheduler.get_request(request_id)
            if request is None or request_id not in engine.scheduler.paused:
                return False
            engine.release(request_id)
            final = RequestOutput(
                request_id=request_id,
                new_token_ids=[],
                num_output_tokens=request.num_output_tokens,
                finished=True,
                migrated_to=destination_id,
                num_prompt_tokens=request.num_prompt_tokens,
            )
            target = self._streams.pop(request_id, None)
            if target is not None:
                _notify(target[0], target[1].put_nowait, final)
            return True

        return await self.acall(run)

    async def _stream(
        self,
        request_id: str,
        register: Callable[[Engine], None] | None = None,
        *,
        registered: asyncio.Queue | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The one generator between the step loop and a caller: put `request_id` into the engine with
        `register` (unless its queue is `registered` already), then yield its outputs as the loop publishes them."""
        stream = registered if registered is not None else await self._register(request_id, register)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, InvalidRequestError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop died: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.call(lambda engine: self._abort(engine, request_id))

    async def _register(self, request_id: str, register: Callable[[Engine], None]) -> asyncio.Queue:
        stream: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add(engine: Engine) -> None:
            register(engine)
            self._streams[request_id] = (loop, stream)

        try:
            await self.acall(add)
        except asyncio.CancelledError:
            # The add may have run before the cancel reached it: nobody would read that request, so end it.
            self.call(lambda engine: self._abort_stream(engine, request_id, stream))
            raise
        return stream

    def _abort_stream(self, engine: Engine, request_id: str, stream: asyncio.Queue) -> None:
        target = self._streams.get(request_id)
        if target is not None and target[1] is stream:
            self._abort(engine, request_id)

    async def abort(self, request_id: str) -> bool:
        return await self.acall(lambda engine: self._abort(engine, request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def _abort(self, engine: Engine, request_id: str) -> bool:
        request = engine.scheduler.get_request(request_id)
        aborted = engine.abort(request_id)
        # Someone may still be waiting on this request (an abort from another caller): end their wait.
        final = RequestOutput(
            request_id=request_id,
            new_token_ids=[],
            num_output_tokens=0 if request is None else request.num_output_tokens,
            finished=True,
            finish_reason="abort",
        )
        target = self._streams.pop(request_id, None)
        if target is not None:
            loop, stream = target
            _notify(loop, stream.put_nowait, final)
        handoff = self._handoffs.pop(request_id, None)
        if handoff is not None:
            loop, future = handoff
            _notify(loop, _settle, future, (final, None))
        return aborted

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    self._progress_at = time.monotonic()
                    continue
                for output in self.engine.step():
                    self._publish(output)
                self._progress_at = time.monotonic()
        except BaseException as exc:
            # Loud, and for good: callers and health checks see EngineDeadError, and the worker is replaced.
            logger.exception("engine loop died error=%s", type(exc).__name__)
            self._error = exc
            self._fail_commands()
            for loop, stream in self._streams.values():
                _notify(loop, stream.put_nowait, exc)
            self._streams.clear()
            dead = EngineDeadError(f"the engine loop died: {exc!r}")
            for loop, future in self._handoffs.values():
                _notify(loop, _settle, future, dead)
            self._handoffs.clear()

    def _drain_commands(self) -> None:
        while True:
            try:
                command, _ = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _fail_commands(self) -> None:
        dead = EngineDeadError(f"the engine loop died: {self._error!r}")
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(dead)

    def _publish(self, output: RequestOutput) -> None:
        if output.error:
            self._fail_request(output)
            return
        if output.request_id in self._handoffs:
            self._hand_off(output)
            return
        target = self._streams.get(output.request_id)
        # A prefill chunk that produced no token has nothing to tell the caller.
        if target is None or not (output.new_token_ids or output.finished):
            return
        if output.finished:
            del self._streams[output.request_id]
        loop, stream = target
        if not _notify(loop, stream.put_nowait, output):
            self._drop(output.request_id)

    def _fail_request(self, output: RequestOutput) -> None:
        error = RequestFailedError(f"request {output.request_id!r} failed: {output.error}")
        target = self._streams.pop(output.request_id, None)
        if target is not None:
            _notify(target[0], target[1].put_nowait, error)
        handoff = self._handoffs.pop(output.request_id, None)
        if handoff is not None:
            _notify(handoff[0], _settle, handoff[1], error)

    def _hand_off(self, output: RequestOutput) -> None:
        # Runs on the loop thread between steps: the KV is copied before the next step could touch it.
        if not (output.new_token_ids or output.finished):
            return
        loop, future = self._handoffs.pop(output.request_id)
        result: tuple[RequestOutput, KVExport | None] | BaseException
        try:
            result = (output, None if output.finished else self.engine.export_kv(output.request_id))
        except Exception as exc:  # a failed export fails this request, never the loop
            result = exc
        self.engine.release(output.request_id)
        _notify(loop, _settle, future, result)

    def _drop(self, request_id: str) -> None:
        # Its consumer's event loop is gone, so nobody will read the tokens: free the blocks.
        self._streams.pop(request_id, None)
        if self.engine.abort(request_id):
            logger.warning("request dropped: its consumer's event loop closed request_id=%s", request_id)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _notify(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Schedule `fn(*args)` on a consumer's loop; False when that loop has closed (the consumer is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _settle(future: asyncio.Future, result: Any) -> None:
    """Resolve `future` with a value or an exception, unless its waiter already gave up."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
