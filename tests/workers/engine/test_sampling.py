"""Sampler and incremental detokenizer."""

from __future__ import annotations

import pytest
import torch

from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.sampler import make_generator, sample
from workers.engine.sampling_params import SamplingParams
from workers.engine.tiny import train_tokenizer
from workers.engine.tokenizer import Tokenizer


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    logits = _logits()
    out = sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_seed_is_reproducible_regardless_of_batch():
    logits = _logits()
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[1:2], [params], [make_generator(42)]).token_ids[0] for _ in range(3)]
    gens = [make_generator(7), make_generator(42), None, make_generator(9)]
    batched = sample(logits, [SamplingParams(temperature=0.7, seed=7), params, SamplingParams(), params], gens)
    assert alone == [alone[0]] * 3
    assert batched.token_ids[1] == alone[0]
    # The generator advances, so a second draw continues the same stream.
    stream = make_generator(42)
    draws = [sample(logits[1:2], [params], [stream]).token_ids[0] for _ in range(5)]
    stream2 = make_generator(42)
    assert draws == [sample(logits[1:2], [params], [stream2]).token_ids[0] for _ in range(5)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits()
    for params in (SamplingParams(temperature=1.5, top_k=1, seed=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        out = sample(logits, [params] * 4, [make_generator(i) for i in range(4)])
        assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_support():
    logits = _logits(rows=1, vocab=30)
    allowed = set(logits[0].topk(3).indices.tolist())
    gen = make_generator(0)
    params = SamplingParams(temperature=5.0, top_k=3)
    seen = {sample(logits, [params], [gen]).token_ids[0] for _ in range(300)}
    assert seen == allowed


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = make_generator(0)
    seen = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [gen]).token_ids[0] for _ in range(300)}
    assert seen == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].repeat(2000, 1)
    gen = make_generator(3)
    tokens = torch.tensor(sample(logits, [SamplingParams(temperature=1.0)] * 2000, [gen] * 2000).token_ids)
    freq = torch.bincount(tokens, minlength=3).float() / 2000
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = _logits(rows=2)
    out = sample(
        logits, [SamplingParams(logprobs=3, temperature=0.5, seed=1), SamplingParams()], [make_generator(1), None]
    )
    expected = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert out.token_ids[0] in lp
    assert set(expected.topk(3).indices.tolist()) <= set(lp)
    for token, value in lp.items():
        assert value == pytest.approx(float(expected[token]), abs=1e-6)
    assert out.logprobs[1] is None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = train_tokenizer(400)
    return Tokenizer(tok, eos_token_ids=(2,), bos_token_id=1)


TEXTS = ["Hello world, the cluster is fast.", "naïve café — 東京 😀 🚀 done", "a b c d e f"]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_deltas_concatenate_to_full_text(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [5, 6, 7])
    deltas = [detok.update([t])[0] for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == detok.output_text
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps")
    detok = IncrementalDetokenizer(tokenizer, [], stop=("brown f",))
    matched = None
    for t in ids:
        _, matched = detok.update([t])
        if matched:
            break
    assert matched == "brown f"
    assert detok.output_text == "the quick "
    assert detok.update([5]) == ("", None)


def test_detokenizer_releases_held_back_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=("lazy cat",))
    text = ""
    for t in tokenizer.encode("the lazy dog"):
        delta, matched = detok.update([t])
        assert matched is None
        text += delta
    assert text == "the lazy dog"


def test_detokenizer_flush_releases_a_held_back_tail(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=("dog house",))
    text = "".join(detok.update([t])[0] for t in tokenizer.encode("the lazy dog"))
    assert text == "the lazy "  # "dog" could still become "dog house"
    assert detok.flush() == "dog"
    assert detok.output_text == "the lazy dog"
