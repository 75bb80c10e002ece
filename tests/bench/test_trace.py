from __future__ import annotations

import itertools
import random

import pytest

from bench._trace import TraceRequest, fit_to_context, load_trace, random_prompt, sample_requests, scale_requests


def test_load_trace_is_relative_and_complete():
    trace = load_trace()
    assert len(trace) == 19366
    assert trace[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(trace))
    assert trace[0].prompt_len == 374 and trace[0].output_len == 44


def test_scaling_fits_the_context():
    reqs = [TraceRequest(0, 4000, 300), TraceRequest(1, 100, 900), TraceRequest(2, 10, 5)]
    scaling = fit_to_context(reqs, max_model_len=2048, max_output_len=512)
    scaled = scale_requests(reqs, scaling)
    assert scaling.max_output_len == 512
    assert max(r.prompt_len for r in scaled) + max(r.output_len for r in scaled) <= 2048
    assert [r.output_len for r in scaled] == [300, 512, 5]
    assert all(r.prompt_len >= 1 for r in scaled)


def test_scaling_rejects_impossible_context():
    with pytest.raises(ValueError, match="no room"):
        fit_to_context([TraceRequest(0, 10, 100)], max_model_len=50)


def test_sampling_is_seeded_and_prompts_avoid_special_ids():
    trace = [TraceRequest(i, i + 1, 1) for i in range(100)]
    assert sample_requests(trace, 10, seed=1) == sample_requests(trace, 10, seed=1)
    assert sample_requests(trace, 10, seed=1) != sample_requests(trace, 10, seed=2)
    prompt = random_prompt(1000, 50, random.Random(0))
    assert len(prompt) == 1000 and min(prompt) >= 3 and max(prompt) < 50
