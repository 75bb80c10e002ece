"""The admin gRPC API under random and mutated requests, with the admin token, a wrong one, or none.

Without the right token every call is UNAUTHENTICATED whatever its bytes; with it, each gets a typed status or a
valid answer, and the server still answers afterwards.
"""

from __future__ import annotations

import grpc
import pytest
from fuzz_budget import InputCounter, fuzz_settings
from fuzz_protobuf import messages, mutated
from fuzz_servers import ADMIN_SERVICE, ADMIN_TOKEN, CALL_TIMEOUT_S, AdminStack
from grpc_calls import assert_typed, call_raw
from hypothesis import event, given
from hypothesis import strategies as st

from protos.raylane.v1 import control_pb2

pytestmark = pytest.mark.fuzz

NAMES = st.one_of(st.sampled_from(["chat", "acme", "", "mixed"]), st.text(max_size=80))
ADMIN_HINTS = {
    name: NAMES for name in ("name", "tenant", "deployment", "worker_id", "key_id", "request_id", "group")
} | {
    "role": st.one_of(st.sampled_from(["mixed", "prefill", "decode", ""]), st.text()),
    "tier": st.one_of(st.sampled_from(["", "small", "large"]), st.text()),
    "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", ""]), st.text()),
}
METHODS = {m.name: m for m in ADMIN_SERVICE.methods}
FUZZ = fuzz_settings(num_tests=2 * len(METHODS))
WITH_TOKEN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
WRONG_TOKENS = st.sampled_from(
    [
        (),
        (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
        (("authorization", ADMIN_TOKEN),),
        (("authorization", "Bearer "),),
    ]
)


def _check(stack: AdminStack, channel: grpc.Channel, method: str, payload: bytes, metadata) -> None:
    answer = call_raw(
        channel,
        f"/{ADMIN_SERVICE.full_name}/{method}",
        payload,
        is_stream=False,
        metadata=metadata,
        timeout_s=CALL_TIMEOUT_S,
    )
    event(answer.code.name)
    assert_typed(answer, f"{method}({payload!r})")
    assert not stack.errors.take(), f"{method}({payload!r}) hit an unexpected error"
    if metadata != WITH_TOKEN:
        assert answer.code == grpc.StatusCode.UNAUTHENTICATED, f"{method} answered {answer.code.name} without the token"
    elif answer.code == grpc.StatusCode.OK:
        getattr(control_pb2, METHODS[method].output_type.name).FromString(answer.responses[0])


def assert_still_serving(stack: AdminStack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        answer = call_raw(
            channel,
            f"/{ADMIN_SERVICE.full_name}/ListTenants",
            b"",
            is_stream=False,
            metadata=WITH_TOKEN,
            timeout_s=CALL_TIMEOUT_S,
        )
    assert answer.code == grpc.StatusCode.OK, answer


@pytest.mark.parametrize("method", sorted(METHODS))
def test_random_admin_messages_get_a_typed_answer(admin_stack, method):
    @FUZZ
    @given(
        request=messages(METHODS[method].input_type, ADMIN_HINTS),
        metadata=st.one_of(st.just(WITH_TOKEN), WRONG_TOKENS),
    )
    def check(request, metadata):
        count()
        _check(admin_stack, channel, method, request.SerializeToString(), metadata)

    count = InputCounter("admin-grpc")
    with grpc.insecure_channel(admin_stack.address) as channel:
        check()
    count.report(f"test_random_admin_messages_get_a_typed_answer[{method}]")
    assert_still_serving(admin_stack)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mutated_admin_bytes_get_a_typed_answer(admin_stack, method):
    @FUZZ
    @given(
        payload=mutated(METHODS[method].input_type, ADMIN_HINTS),
        metadata=st.one_of(st.just(WITH_TOKEN), WRONG_TOKENS),
    )
    def check(payload, metadata):
        count()
        _check(admin_stack, channel, method, payload, metadata)

    count = InputCounter("admin-grpc")
    with grpc.insecure_channel(admin_stack.address) as channel:
        check()
    count.report(f"test_mutated_admin_bytes_get_a_typed_answer[{method}]")
    assert_still_serving(admin_stack)
