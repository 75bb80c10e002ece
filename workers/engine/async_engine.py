"""Runs an `Engine` step loop on a background thread and streams each request's tokens to asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from workers.engine.engine import Engine
from workers.engine.request import RequestOutput
from workers.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine's step loop crashed; the request cannot finish."""


class AsyncEngine:
    """Thread-safe front for one `Engine`.

    Every engine call happens on the loop thread, so the engine itself stays
    single-threaded. `generate` yields a `RequestOutput` per step the request advances;
    leaving the iterator early (client cancel, deadline) aborts the request and frees
    its blocks.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._error: BaseException | None = None
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
        self._commands.put(run)
        self._wakeup.set()
        return future

    async def acall(self, fn: Callable[[Engine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        lora_name: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        stream: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add(engine: Engine) -> None:
            engine.add_request(request_id, prompt, params, lora_name=lora_name, priority=priority)
            self._streams[request_id] = (loop, stream)

        await self.acall(add)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop died: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.call(lambda engine: self._abort(engine, request_id))

    async def abort(self, request_id: str) -> bool:
        return await self.acall(lambda engine: self._abort(engine, request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def _abort(self, engine: Engine, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return engine.abort(request_id)

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    self._publish(output)
        except BaseException as exc:
            logger.exception("engine loop died")
            self._error = exc
            for loop, stream in self._streams.values():
                loop.call_soon_threadsafe(stream.put_nowait, exc)
            self._streams.clear()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _publish(self, output: RequestOutput) -> None:
        target = self._streams.get(output.request_id)
        # A prefill chunk that produced no token has nothing to tell the caller.
        if target is None or not (output.new_token_ids or output.finished):
            return
        if output.finished:
            del self._streams[output.request_id]
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, output)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
