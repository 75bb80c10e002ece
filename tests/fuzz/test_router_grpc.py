"""The router's gRPC API under random and mutated requests: each gets a typed status or a valid answer.

Random messages are built from the request types' descriptors; mutated ones are serialized messages with wire-level
damage, sent as raw bytes. After each run the engine holds no KV block and a normal request still completes.
"""

from __future__ import annotations

import time

import grpc
import pytest
from fuzz_budget import InputCounter, fuzz_settings
from fuzz_protobuf import messages, mutated
from fuzz_servers import ADAPTER, CALL_TIMEOUT_S, CONTEXT, DEPLOYMENT, KEYS, ROUTER_SERVICE, RouterStack
from grpc_calls import Answer, assert_typed, call_raw
from hypothesis import event, given
from hypothesis import strategies as st

from protos.raylane.v1 import router_pb2

pytestmark = pytest.mark.fuzz

VOCAB = 512
"""The tiny Llama's vocabulary: ids below it are real tokens, ids above must be refused."""
ROUTER_HINTS = {
    "deployment": st.one_of(st.sampled_from([DEPLOYMENT, "", "nope", f"{DEPLOYMENT}:{ADAPTER}"]), st.text()),
    "adapter": st.one_of(st.sampled_from(["", ADAPTER, "nope"]), st.text()),
    "tier": st.one_of(st.sampled_from(["", "small", "large"]), st.text()),
    "request_id": st.one_of(st.sampled_from(["", "same"]), st.text()),
    "prompt": st.one_of(st.text(max_size=64), st.text(max_size=4096)),
    "prompt_token_ids": st.one_of(
        st.lists(st.integers(0, VOCAB - 1), max_size=64),
        st.lists(st.integers(0, 2**32 - 1), max_size=8),
        st.lists(st.integers(0, VOCAB - 1), min_size=CONTEXT - 8, max_size=CONTEXT + 8),
    ),
    # Short generations (a 500-token one takes 2 s on the CPU), the context's edge, and absurd values.
    "max_tokens": st.one_of(st.integers(0, 8), st.integers(CONTEXT - 4, CONTEXT + 4), st.integers(2**31, 2**32 - 1)),
}
METHODS = {m.name: m for m in ROUTER_SERVICE.methods}
FUZZ = fuzz_settings(num_tests=2 * len(METHODS))
AUTH = st.sampled_from(
    [(("authorization", f"Bearer {KEYS['acme']}"),), (("authorization", f"Bearer {KEYS['globex']}"),)]
)


def _path(method: str) -> str:
    return f"/{ROUTER_SERVICE.full_name}/{method}"


def _send(channel: grpc.Channel, method: str, payload: bytes, metadata) -> Answer:
    is_stream = METHODS[method].server_streaming
    return call_raw(channel, _path(method), payload, is_stream=is_stream, metadata=metadata, timeout_s=CALL_TIMEOUT_S)


def _check(stack: RouterStack, channel: grpc.Channel, method: str, payload: bytes, metadata) -> None:
    answer = _send(channel, method, payload, metadata)
    event(answer.code.name)
    assert_typed(answer, f"{method}({payload!r})")
    assert not stack.errors.take(), f"{method}({payload!r}) hit an unexpected error"
    if answer.code != grpc.StatusCode.OK:
        return
    output_type = METHODS[method].output_type
    parsed = [getattr(router_pb2, output_type.name).FromString(r) for r in answer.responses]
    if method == "Generate":
        assert parsed and parsed[-1].finished, "a stream that ended OK must end with a finished chunk"
        seqs = [c.seq for c in parsed]
        assert seqs == sorted(seqs), f"chunks out of order: {seqs}"


def assert_still_serving(stack: RouterStack) -> None:
    """No KV block leaked, and a plain request still gets its tokens."""
    deadline = time.monotonic() + 30
    while stack.kv_blocks_used() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.kv_blocks_used() == 0, "KV blocks leaked"
    request = router_pb2.GenerateRequest(deployment=DEPLOYMENT, prompt_token_ids=[5, 17, 42])
    request.sampling.max_tokens = 3
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(stack.grpc_address) as channel:
        answer = _send(channel, "Complete", request.SerializeToString(), (("authorization", f"Bearer {KEYS['acme']}"),))
    assert answer.code == grpc.StatusCode.OK, answer
    assert len(router_pb2.CompleteResponse.FromString(answer.responses[0]).token_ids) == 3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_random_messages_get_a_typed_answer(router_stack, method):
    @FUZZ
    @given(request=messages(METHODS[method].input_type, ROUTER_HINTS), metadata=AUTH)
    def check(request, metadata):
        count()
        _check(router_stack, channel, method, request.SerializeToString(), metadata)

    count = InputCounter("router-grpc")
    with grpc.insecure_channel(router_stack.grpc_address) as channel:
        check()
    count.report(f"test_random_messages_get_a_typed_answer[{method}]")
    assert_still_serving(router_stack)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mutated_bytes_get_a_typed_answer(router_stack, method):
    @FUZZ
    @given(payload=mutated(METHODS[method].input_type, ROUTER_HINTS), metadata=AUTH)
    def check(payload, metadata):
        count()
        _check(router_stack, channel, method, payload, metadata)

    count = InputCounter("router-grpc")
    with grpc.insecure_channel(router_stack.grpc_address) as channel:
        check()
    count.report(f"test_mutated_bytes_get_a_typed_answer[{method}]")
    assert_still_serving(router_stack)
