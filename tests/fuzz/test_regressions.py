"""The smallest inputs the fuzz tests found that once got an untyped answer; plain tests, run with the others."""

from __future__ import annotations

import grpc
import pytest
from fuzz_servers import ADMIN_SERVICE, ADMIN_TOKEN, CALL_TIMEOUT_S
from grpc_calls import call_raw


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        ("ApplyDeployment", b"\xff\xff\xff\xff\xff"),  # a tag varint that never ends
        ("ListTenants", b"\xff\xff\xff\xff\xff"),
        ("DeleteTenant", b"\x0a\x01\xff"),  # `name` is not UTF-8
    ],
)
def test_unparsable_admin_request_bytes_are_an_invalid_argument(admin_stack, method, payload):
    # grpc answered UNKNOWN with the parser's exception name (DecodeError) before the admin servicer parsed tolerantly.
    with grpc.insecure_channel(admin_stack.address) as channel:
        answer = call_raw(
            channel,
            f"/{ADMIN_SERVICE.full_name}/{method}",
            payload,
            is_stream=False,
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            timeout_s=CALL_TIMEOUT_S,
        )
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert answer.details == f"{method}: the request body does not parse"


def test_unparsable_admin_bytes_without_the_token_are_unauthenticated(admin_stack):
    with grpc.insecure_channel(admin_stack.address) as channel:
        answer = call_raw(
            channel,
            f"/{ADMIN_SERVICE.full_name}/ApplyDeployment",
            b"\xff\xff\xff",
            is_stream=False,
            metadata=(),
            timeout_s=CALL_TIMEOUT_S,
        )
    assert answer.code == grpc.StatusCode.UNAUTHENTICATED
