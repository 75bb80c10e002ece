"""Running one OpenAI request's choices through `RouterCore`: open them all, then merge their token streams.

A choice is opened by reading its first chunk, so auth, quota, admission and placement errors surface before
any byte of the response is sent (and become a proper status code). Closing the merged stream closes every
choice's stream, which aborts the request on its worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from router.core import GenerateInput, RouterCore
from router.errors import RouterError
from workers.messages import TokenChunk


@dataclass(kw_only=True)
class OpenedChoice:
    """A choice whose stream has produced its first chunk (None: it ended without one)."""

    stream: AsyncIterator[TokenChunk]
    first: TokenChunk | None


async def _open_one(core: RouterCore, api_key: str | None, inp: GenerateInput) -> OpenedChoice:
    stream = core.generate(api_key, inp)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return OpenedChoice(stream=stream, first=None)
    except BaseException:
        await stream.aclose()
        raise
    return OpenedChoice(stream=stream, first=first)


async def open_choices(core: RouterCore, api_key: str | None, inputs: Sequence[GenerateInput]) -> list[OpenedChoice]:
    """Start every choice; when one is refused, close the others and raise its `RouterError`."""
    if len(inputs) == 1:
        return [await _open_one(core, api_key, inputs[0])]
    tasks: list[asyncio.Task[OpenedChoice]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_open_one(core, api_key, inp)) for inp in inputs]
    except BaseExceptionGroup as failed:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().stream.aclose()
        router_errors = [exc for exc in failed.exceptions if isinstance(exc, RouterError)]
        raise (router_errors or list(failed.exceptions))[0] from None
    return [task.result() for task in tasks]


async def merge_choices(choices: Sequence[OpenedChoice]) -> AsyncIterator[tuple[int, TokenChunk]]:
    """`(choice index, chunk)` in arrival order; closing this closes every choice's stream."""
    if len(choices) == 1:
        # The common case stays a plain loop: no task and no queue on the latency path.
        async with aclosing(choices[0].stream) as stream:
            if choices[0].first is not None:
                yield 0, choices[0].first
            async for chunk in stream:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, TokenChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, choice: OpenedChoice) -> None:
        try:
            async with aclosing(choice.stream) as stream:
                if choice.first is not None:
                    queue.put_nowait((index, choice.first, None))
                async for chunk in stream:
                    queue.put_nowait((index, chunk, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, choice)) for i, choice in enumerate(choices)]
    try:
        num_running = len(tasks)
        while num_running:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                num_running -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
