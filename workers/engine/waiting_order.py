"""The order in which a scheduler tries its waiting requests: FCFS, or LAPS in time (short prompts first).

LAPS in time: on one worker, a long prefill admitted ahead of short ones makes every short request wait for
its chunks. Within a priority level, prompts of at most `short_prompt_tokens` go first; a long prompt that
has waited `max_long_wait_s` goes first too, so longs are delayed, never starved. The router's
`router/laps.py` learns the threshold from traffic; the engine takes it as configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

from workers.engine.request import Request


def waiting_order(
    waiting: Sequence[Request], *, short_prompt_tokens: int, max_long_wait_s: float, now: float
) -> Sequence[Request]:
    """`waiting` (sorted by priority, then arrival) in the order to try it; unchanged when LAPS is off (0)."""
    if short_prompt_tokens <= 0 or len(waiting) < 2:
        return waiting

    def key(request: Request) -> tuple[int, int, float]:
        is_long = request.num_prompt_tokens > short_prompt_tokens
        is_overdue = now - request.arrival_time >= max_long_wait_s
        return request.priority, int(is_long and not is_overdue), request.arrival_time

    return sorted(waiting, key=key)
