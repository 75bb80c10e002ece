"""Failover resume: a request restarted elsewhere with the tokens already sent continues exactly as before.

Also the sampling contract behind it: a seeded draw at output index i depends on (seed, i, logits) only.
"""

from __future__ import annotations

import pytest
import torch

from tests.workers.engine.calls import make_call
from workers.engine.engine import Engine
from workers.engine.errors import InvalidRequestError
from workers.engine.request import RequestOutput
from workers.engine.sampler import sample, token_generator
from workers.engine.sampling_params import SamplingParams

PROMPT = list(range(20, 38))
SEEDED = SamplingParams(max_tokens=14, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine.from_pretrained(str(tiny_llama), dtype="float32")


def _run(engine: Engine, request_id: str, params: SamplingParams, **resume) -> list[RequestOutput]:
    engine.add_request(make_call(request_id, PROMPT, params, **resume))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(o for o in engine.step() if o.request_id == request_id and (o.new_token_ids or o.finished))
    return outputs


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_token_generator_depends_on_seed_and_index_only():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=5)]
    draws = [sample(logits, params, [token_generator(5, i)]).token_ids[0] for i in range(40)]
    again = [sample(logits, params, [token_generator(5, i)]).token_ids[0] for i in range(40)]
    assert draws == again
    assert len(set(draws)) > 1  # different indices give different draws
    other = [sample(logits, params, [token_generator(6, i)]).token_ids[0] for i in range(40)]
    assert other != draws
    with pytest.raises(ValueError, match="output_index"):
        token_generator(5, -1)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("num_sent", [1, 5, 13])
def test_resume_continues_the_same_output(engine, params, num_sent):
    full = _run(engine, f"full-{num_sent}", params)
    tokens = _tokens(full)
    text = "".join(o.text_delta for o in full)
    assert len(tokens) == params.max_tokens
    sent = tokens[:num_sent]
    # The text the client holds after `num_sent` tokens (the stream's text may lag its tokens).
    sent_text = "".join(o.text_delta for o in full[:num_sent])
    resumed = _run(
        engine,
        f"resumed-{num_sent}",
        params,
        resume_output_token_ids=sent,
        resume_num_text_chars=len(sent_text),
    )
    assert _tokens(resumed) == tokens[num_sent:]  # no token repeated, none missing
    assert sent_text + "".join(o.text_delta for o in resumed) == text
    assert resumed[-1].finished and resumed[-1].finish_reason == "length"
    assert resumed[-1].num_output_tokens == len(tokens)


def test_resume_counts_sent_tokens_toward_stop_checks(engine):
    tokens = _tokens(_run(engine, "stop-full", GREEDY))
    stop_at = tokens[6]
    params = SamplingParams(max_tokens=14, ignore_eos=True, stop_token_ids=(stop_at,))
    expected = tokens[: tokens.index(stop_at) + 1]
    resumed = _run(engine, "stop-resumed", params, resume_output_token_ids=expected[:2])
    assert expected[:2] + _tokens(resumed) == expected
    assert resumed[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("resume", "match"),
    [
        ({"resume_output_token_ids": [1] * 14}, "max_tokens"),
        ({"resume_output_token_ids": [10**9]}, "vocabulary"),
        ({"resume_output_token_ids": [5], "resume_num_text_chars": 500}, "characters"),
        ({"resume_num_text_chars": 3}, "resume tokens"),
    ],
)
def test_bad_resume_is_refused_and_leaves_nothing_behind(engine, resume, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(make_call("bad-resume", PROMPT, GREEDY, **resume))
    assert not engine.has_unfinished()
    assert engine.stats().num_kv_blocks_used == 0


@pytest.mark.parametrize("num_sent", [2, 7])
def test_resume_keeps_stop_string_progress_and_held_back_text(engine, num_sent):
    text = "".join(o.text_delta for o in _run(engine, f"stopstr-probe-{num_sent}", GREEDY))
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-3:]
    params = SamplingParams(max_tokens=14, ignore_eos=True, stop=(stop,))
    full = _run(engine, f"stopstr-full-{num_sent}", params)
    tokens = _tokens(full)
    if len(tokens) <= num_sent:
        pytest.skip("the stop string matched before the resume point")
    sent_text = "".join(o.text_delta for o in full[:num_sent])
    resumed = _run(
        engine,
        f"stopstr-resumed-{num_sent}",
        params,
        resume_output_token_ids=tokens[:num_sent],
        resume_num_text_chars=len(sent_text),
    )
    assert _tokens(resumed) == tokens[num_sent:]
    assert sent_text + "".join(o.text_delta for o in resumed) == "".join(o.text_delta for o in full)
    assert resumed[-1].finish_reason == full[-1].finish_reason
