"""The OpenAI-compatible HTTP front under random bodies and headers: a 4xx with OpenAI's error body, or a valid answer.

Bodies are valid-shaped with extreme or wrongly typed values, arbitrary JSON, deeply nested JSON, and raw bytes that
are not UTF-8. Never a 5xx; afterwards no KV block is held and a plain request still completes.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fuzz_budget import InputCounter, fuzz_settings
from fuzz_servers import ADAPTER, CALL_TIMEOUT_S, CONTEXT, DEPLOYMENT, KEYS, RouterStack
from hypothesis import event, given
from hypothesis import strategies as st
from test_router_grpc import assert_still_serving

pytestmark = pytest.mark.fuzz

FUZZ = fuzz_settings(num_tests=2)

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
"""Any JSON value (NaN and infinities included: Python's encoder writes them, as some clients do)."""
BIG_INTS = st.integers(-(2**70), 2**70)
MODELS = st.one_of(
    st.sampled_from([DEPLOYMENT, f"{DEPLOYMENT}:{ADAPTER}", f"{DEPLOYMENT}:nope", "nope", ""]), st.text()
)
# Short generations keep thousands of inputs cheap; the context's edge and absurd values test the limits.
MAX_TOKENS = st.one_of(st.integers(-2, 8), st.integers(CONTEXT - 4, CONTEXT + 4), BIG_INTS, ANY_JSON)


def _or_any(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly well-typed values, sometimes any JSON at all."""
    return st.one_of(strategy, strategy, strategy, ANY_JSON)


SAMPLING = {
    "temperature": _or_any(st.floats()),
    "top_p": _or_any(st.floats()),
    "top_k": _or_any(st.one_of(st.integers(-1, 600), BIG_INTS)),
    "n": _or_any(st.integers(-1, 20)),
    "stream": _or_any(st.booleans()),
    "stream_options": _or_any(st.fixed_dictionaries({"include_usage": _or_any(st.booleans())})),
    "stop": _or_any(st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=6))),
    "seed": _or_any(BIG_INTS),
    "ignore_eos": _or_any(st.booleans()),
    "tier": _or_any(st.sampled_from(["", "small", "large", "medium"])),
    "user": _or_any(st.text(max_size=16)),
}
COMPLETION = st.fixed_dictionaries(
    {
        "model": _or_any(MODELS),
        "prompt": _or_any(
            st.one_of(
                st.text(max_size=200),
                st.lists(st.integers(-5, 600), max_size=24),
                st.lists(st.text(max_size=24), max_size=3),
                st.lists(st.lists(st.integers(0, 511), max_size=12), max_size=3),
            )
        ),
        "max_tokens": MAX_TOKENS,
    },
    optional={
        **SAMPLING,
        "logprobs": _or_any(st.integers(-1, 25)),
        "echo": _or_any(st.booleans()),
    },
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": _or_any(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])),
        "content": _or_any(
            st.one_of(
                st.none(),
                st.text(max_size=200),
                st.lists(st.fixed_dictionaries({"type": _or_any(st.just("text")), "text": st.text()}), max_size=3),
            )
        ),
    },
    optional={"name": _or_any(st.text(max_size=8))},
)
CHAT = st.fixed_dictionaries(
    {"model": _or_any(MODELS), "messages": _or_any(st.lists(MESSAGE, max_size=4)), "max_tokens": MAX_TOKENS},
    optional={
        **SAMPLING,
        "max_completion_tokens": _or_any(st.integers(-1, 8)),
        "logprobs": _or_any(st.booleans()),
        "top_logprobs": _or_any(st.integers(-1, 25)),
    },
)


@st.composite
def _bodies(draw: st.DrawFn, shaped: st.SearchStrategy) -> bytes:
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "any", "nested", "bytes", "broken"]))
    if kind == "shaped":
        return json.dumps(draw(shaped)).encode()
    if kind == "any":
        return json.dumps(draw(ANY_JSON)).encode()
    if kind == "nested":
        depth = draw(st.integers(1, 100_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    text = json.dumps(draw(shaped)).encode()  # a valid body with bytes that are not UTF-8 spliced in
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\x80\x80"])) + text[at:]


# Any byte HTTP allows in a header value (obs-text included; no whitespace at the ends, which the client refuses).
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
).map(lambda text: text.strip(" \t").encode("latin-1"))
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.one_of(
            st.sampled_from([f"Bearer {KEYS['acme']}", f"Bearer {KEYS['globex']}", "Bearer", "Basic abc"]),
            _HEADER_TEXT,
        ),
        "content-type": st.one_of(st.sampled_from(["application/json", "text/plain", ""]), _HEADER_TEXT),
        "accept": _HEADER_TEXT,
    },
)


def check_http_answer(stack: RouterStack, response: httpx.Response, what: str) -> None:
    """A valid answer, or a 4xx with OpenAI's error body; never a 5xx, an error log line, or a failed stream."""
    event(str(response.status_code))
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    assert not stack.errors.take(), f"{what} hit an unexpected error"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), what
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"{what}: the stream did not end with [DONE]"
        assert all("error" not in json.loads(e) for e in events[:-1]), f"{what}: the stream failed: {events}"
    else:
        assert response.json()["choices"], what


def _fuzz_endpoint(stack: RouterStack, path: str, shaped: st.SearchStrategy) -> None:
    @FUZZ
    @given(body=_bodies(shaped), headers=HEADERS)
    def check(body, headers):
        count()
        response = client.post(path, content=body, headers={"authorization": f"Bearer {KEYS['acme']}", **headers})
        check_http_answer(stack, response, f"POST {path} {body[:300]!r} headers={headers}")

    count = InputCounter("http")
    with httpx.Client(base_url=stack.http_url, timeout=CALL_TIMEOUT_S) as client:
        check()
    count.report(path)
    assert_still_serving(stack)


def test_random_completion_bodies_get_a_4xx_or_an_answer(router_stack):
    _fuzz_endpoint(router_stack, "/v1/completions", COMPLETION)


def test_random_chat_bodies_get_a_4xx_or_an_answer(router_stack):
    _fuzz_endpoint(router_stack, "/v1/chat/completions", CHAT)
