"""Random API keys, on gRPC metadata and as HTTP Bearer tokens: a stranger gets UNAUTHENTICATED / 401, never more.

Keys are random strings and bytes, and near misses of the real ones (one character changed, cut, extended, cased).
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from fuzz_budget import InputCounter, fuzz_settings
from fuzz_servers import CALL_TIMEOUT_S, DEPLOYMENT, KEYS, ROUTER_SERVICE
from grpc_calls import assert_typed, call_raw
from hypothesis import event, given
from hypothesis import strategies as st
from test_http_front import check_http_answer

from protos.raylane.v1 import router_pb2

pytestmark = pytest.mark.fuzz

FUZZ = fuzz_settings(num_tests=2)


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(sorted(KEYS.values())))
    at = draw(st.integers(0, len(key) - 1))
    edit = draw(st.sampled_from(["change", "cut", "extend", "upper"]))
    if edit == "change":
        return (
            key[:at]
            + draw(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=key[at]))
            + key[at + 1 :]
        )
    if edit == "cut":
        return key[:at]
    if edit == "extend":
        return key + draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=4))
    return key.upper()


PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
TOKENS = st.one_of(near_misses(), PRINTABLE)
GRPC_SCHEMES = st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "", "Basic ", "Token "])
"""gRPC metadata values are printable ASCII: the client library itself refuses a tab."""
SCHEMES = st.one_of(GRPC_SCHEMES, st.just("Bearer\t"))


def _is_real_key(value: str) -> bool:
    """Whether a lenient reading of `value` (`Bearer <key>`, whitespace stripped) names a real key."""
    scheme, _, token = value.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip() in KEYS.values()


@st.composite
def grpc_metadata(draw: st.DrawFn) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata a gRPC client can send: printable-ASCII `authorization` values, binary `-bin` ones, other keys."""
    entries: list[tuple[str, str | bytes]] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["authorization", "authorization", "bin", "other"]))
        if kind == "authorization":
            entries.append(("authorization", draw(GRPC_SCHEMES) + draw(TOKENS)))
        elif kind == "bin":
            entries.append(("authorization-bin", draw(st.binary(max_size=64))))
        else:
            name = draw(st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True).filter(lambda n: not n.startswith("grpc")))
            entries.append((name, draw(PRINTABLE)))
    return tuple(entries)


def test_random_grpc_keys_are_unauthenticated(router_stack):
    request = router_pb2.CountTokensRequest(deployment=DEPLOYMENT, text="hello").SerializeToString()
    path = f"/{ROUTER_SERVICE.full_name}/CountTokens"

    @FUZZ
    @given(metadata=grpc_metadata())
    def check(metadata):
        count()
        answer = call_raw(channel, path, request, is_stream=False, metadata=metadata, timeout_s=CALL_TIMEOUT_S)
        event(answer.code.name)
        assert_typed(answer, f"CountTokens with {metadata!r}")
        assert not router_stack.errors.take(), f"{metadata!r} hit an unexpected error"
        first = next((value for key, value in metadata if key == "authorization"), None)
        if first is not None and _is_real_key(first):
            assert answer.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED), answer
        else:
            assert answer.code == grpc.StatusCode.UNAUTHENTICATED, f"{metadata!r} got {answer.code.name}"

    count = InputCounter("api-keys")
    with grpc.insecure_channel(router_stack.grpc_address) as channel:
        check()
    count.report("grpc")


_LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)


def test_random_http_bearer_tokens_are_401(router_stack):
    body = {"model": DEPLOYMENT, "prompt": "hi", "max_tokens": 1}

    @FUZZ
    @given(value=st.one_of(st.tuples(SCHEMES, TOKENS).map("".join), SCHEMES.flatmap(lambda s: _LATIN1.map(s.__add__))))
    def check(value):
        count()
        # HTTP clients send no whitespace at a header value's ends (h11 refuses to).
        value = value.strip(" \t")
        response = client.post("/v1/completions", json=body, headers={"authorization": value.encode("latin-1")})
        check_http_answer(router_stack, response, f"Authorization: {value!r}")
        if not _is_real_key(value):
            assert response.status_code == 401, f"{value!r} got {response.status_code}"
            assert response.json()["error"]["code"] == "invalid_api_key"

    count = InputCounter("api-keys")
    with httpx.Client(base_url=router_stack.http_url, timeout=CALL_TIMEOUT_S) as client:
        check()
    count.report("http")
