"""KV handoff: export a running request, import it into a second engine, continue decoding."""

from __future__ import annotations

import pytest

from tests.workers.engine.calls import make_call
from workers.engine.engine import Engine
from workers.engine.errors import InvalidRequestError, UnknownRequestError
from workers.engine.sampling_params import SamplingParams


def _engine(model_dir, **kwargs) -> Engine:
    return Engine.from_pretrained(str(model_dir), dtype="float32", enable_prefix_caching=False, **kwargs)


def _step_until(engine: Engine, request_id: str, num_output_tokens: int) -> None:
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.num_output_tokens >= num_output_tokens:
                return


def _run_to_end(engine: Engine, request_id: str) -> list[int]:
    """The tokens `request_id` generates on `engine` from now until it finishes."""
    tokens = []
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                tokens += out.new_token_ids
                if out.finished:
                    return tokens


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("decode_steps", [0, 5, 20])
def test_moved_request_continues_identically(tiny_models, arch, decode_steps):
    prompt = list(range(10, 47))  # 37 tokens: two full blocks and a partial one
    params = SamplingParams(max_tokens=30, ignore_eos=True, detokenize=False)
    unmoved = _engine(tiny_models[arch]).generate([prompt], params)[0].output_token_ids

    source, dest = _engine(tiny_models[arch]), _engine(tiny_models[arch], block_size=16)
    source.add_request(make_call("x", prompt, params))
    source.add_request(make_call("other", list(range(5, 20)), params))  # a neighbour keeps the batch mixed
    _step_until(source, "x", 1 + decode_steps)
    export = source.export_kv("x")
    assert export.num_computed_tokens == len(prompt) + decode_steps
    assert export.num_blocks == -(-export.num_computed_tokens // 16)
    source.abort("x")

    dest.import_kv(export)
    assert export.output_token_ids + _run_to_end(dest, "x") == unmoved


def test_sampled_request_keeps_its_rng_stream(tiny_llama):
    prompt = list(range(30, 50))
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    unmoved = _engine(tiny_llama).generate([prompt], params)[0].output_token_ids
    source, dest = _engine(tiny_llama), _engine(tiny_llama)
    source.add_request(make_call("s", prompt, params))
    _step_until(source, "s", 6)
    export = source.export_kv("s")
    dest.import_kv(export)
    assert export.output_token_ids + _run_to_end(dest, "s") == unmoved


def test_incremental_export_returns_only_new_blocks(tiny_llama):
    engine = _engine(tiny_llama)
    engine.add_request(make_call("x", list(range(3, 40)), SamplingParams(max_tokens=40, ignore_eos=True)))
    _step_until(engine, "x", 1)
    full = engine.export_kv("x")
    tail = engine.export_kv("x", from_block=2)
    assert tail.num_blocks == full.num_blocks - 2
    assert (tail.kv == full.kv[:, :, :, 2:]).all()
    with pytest.raises(ValueError, match="from_block"):
        engine.export_kv("x", from_block=full.num_blocks + 1)


def test_export_errors(tiny_llama):
    engine = _engine(tiny_llama)
    with pytest.raises(UnknownRequestError):
        engine.export_kv("missing")
    engine.add_request(make_call("w", [1, 2, 3], SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequestError, match="no KV"):
        engine.export_kv("w")  # still waiting: nothing computed yet


def test_import_frees_blocks_when_done(tiny_llama):
    source, dest = _engine(tiny_llama), _engine(tiny_llama)
    source.add_request(make_call("x", list(range(3, 30)), SamplingParams(max_tokens=8, ignore_eos=True)))
    _step_until(source, "x", 2)
    free_before = dest.stats().num_kv_blocks_free
    dest.import_kv(source.export_kv("x"))
    assert dest.stats().num_kv_blocks_free < free_before
    _run_to_end(dest, "x")
    assert dest.stats().num_kv_blocks_free == free_before


def _text_of(engine: Engine, request_id: str) -> str:
    texts = []
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                texts.append(out.text_delta)
                if out.finished:
                    return "".join(texts)


@pytest.mark.parametrize("decode_steps", [0, 3, 8])
def test_text_held_back_for_a_stop_string_survives_the_move(tiny_llama, decode_steps):
    prompt = list(range(60, 90))
    plain = SamplingParams(max_tokens=16, ignore_eos=True)
    full_text = _engine(tiny_llama).generate([prompt], plain)[0].text
    # A stop string that starts with every character and never matches: each step holds its tail back.
    stop = tuple(sorted({ch + "\x00never" for ch in full_text}))
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=stop)

    source, dest = _engine(tiny_llama), _engine(tiny_llama)
    source.add_request(make_call("t", prompt, params))
    emitted = []
    while True:
        outs = [o for o in source.step() if o.request_id == "t"]
        emitted += [o.text_delta for o in outs]
        if outs and outs[-1].num_output_tokens >= 1 + decode_steps:
            break
    dest.import_kv(source.export_kv("t"))
    source.abort("t")
    assert "".join(emitted) + _text_of(dest, "t") == full_text
