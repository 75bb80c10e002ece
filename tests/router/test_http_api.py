"""The OpenAI-compatible HTTP front, served by uvicorn over an in-process `RouterCore` with real engines (no Ray).

The official `openai` client and raw `httpx` talk to it over loopback, as a user would.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from inprocess_workers import EngineWorkerClient

from router.core import RouterCore
from router.http.app import build_app
from router.http.server import HttpServer
from router.policy import ClusterView, WorkerView
from router.quota import QuotaLimits, QuotaTracker
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.tokenizer import Tokenizer

KEYS = {"acme": "key-acme", "globex": "key-globex", "solo": "key-solo"}
LIMITS = {
    "acme": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000),
    "globex": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000),
    "solo": QuotaLimits(max_concurrent=1, tokens_per_minute=1_000_000),
}
NO_EOS = {"ignore_eos": True}


@dataclass
class TokenizingDirectory:
    """A fixed cluster, `chat` on one in-process engine, that also serves the model's tokenizer."""

    routing_table: RoutingTable
    cluster: ClusterView
    worker_clients: Mapping[str, Any]
    model: Path
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return self.cluster

    def clients(self) -> Mapping[str, Any]:
        return self.worker_clients

    async def tokenizer(self, deployment: str) -> Tokenizer:
        if deployment not in self.tokenizers:
            self.tokenizers[deployment] = Tokenizer.from_pretrained(self.model)
        return self.tokenizers[deployment]


@dataclass
class Served:
    base_url: str
    engine: AsyncEngine
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def served(tiny_llama, tiny_loras) -> Iterator[Served]:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB, max_loras=2)
    engine = AsyncEngine(Engine(config))
    engine.call(lambda e: e.add_lora("globex-legal", str(tiny_loras["a"]))).result()
    table = RoutingTable(
        version=1,
        deployments={"chat": DeploymentRoute(name="chat", max_model_len=2048)},
        tenants=LIMITS,
        key_hashes={hash_api_key(key): tenant for tenant, key in KEYS.items()},
        adapter_owners={("chat", "globex-legal"): "globex"},
    )
    directory = TokenizingDirectory(
        routing_table=table,
        cluster=ClusterView(workers={"chat": [WorkerView(worker_id="chat-0", deployment="chat", role="mixed")]}),
        worker_clients={"chat-0": EngineWorkerClient("chat-0", engine)},
        model=tiny_llama,
    )
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        core = RouterCore(directory, quotas=QuotaTracker())
        server = HttpServer(build_app(core, directory), host="127.0.0.1", port=0)
        started["port"] = loop.run_until_complete(server.start())
        started["server"] = server
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "port" not in started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield Served(base_url=f"http://127.0.0.1:{started['port']}", engine=engine, loop=loop)
    asyncio.run_coroutine_threadsafe(started["server"].stop(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    engine.shutdown()


def client(served: Served, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def kv_blocks_used(served: Served) -> int:
    return served.engine.call(lambda e: e.stats().num_kv_blocks_used).result()


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---- completions --------------------------------------------------------------------------------


def test_a_completion_returns_text_finish_reason_and_usage(served):
    completion = client(served).completions.create(
        model="chat", prompt="The cluster", max_tokens=5, temperature=0, extra_body=NO_EOS
    )
    assert completion.object == "text_completion" and completion.model == "chat"
    [choice] = completion.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str) and choice.logprobs is None
    assert completion.usage.completion_tokens == 5 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


def test_token_id_prompts_and_batches_get_one_choice_per_prompt(served):
    completion = client(served).completions.create(
        model="chat", prompt=[[5, 17, 42], [7, 23, 61, 88]], max_tokens=3, temperature=0, extra_body=NO_EOS
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 6


def test_n_with_a_seed_gives_distinct_reproducible_choices(served):
    def run() -> list[str]:
        completion = client(served).completions.create(
            model="chat", prompt="Once upon a time", n=2, seed=7, temperature=1.0, max_tokens=8, extra_body=NO_EOS
        )
        assert [c.index for c in completion.choices] == [0, 1]
        assert completion.usage.completion_tokens == 16
        return [c.text for c in completion.choices]

    first = run()
    assert first == run()  # seed + i per choice: the same request gives the same choices
    assert first[0] != first[1]


def test_completion_logprobs_list_the_sampled_token_and_the_top_n(served):
    completion = client(served).completions.create(
        model="chat", prompt="The cluster", max_tokens=4, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for token_logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and token_logprob <= 0.0
        # Greedy: the sampled token is the most likely one.
        assert token_logprob == pytest.approx(max(top.values()), abs=1e-5)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_a_stop_string_ends_the_completion_and_is_cut(served):
    base = client(served).completions.create(
        model="chat", prompt="The cluster", max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    text = base.choices[0].text
    stop = text.strip()[:2] if len(text.strip()) >= 2 else None
    if stop is None:
        pytest.skip("the tiny model produced too little text to pick a stop string from")
    stopped = client(served).completions.create(
        model="chat", prompt="The cluster", max_tokens=12, temperature=0, stop=[stop, "zzzz"], extra_body=NO_EOS
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and text.startswith(stopped.choices[0].text)


def test_streaming_sends_text_chunks_then_done_and_usage_only_when_asked(served):
    api = client(served)
    chunks = list(
        api.completions.create(model="chat", prompt="The cluster", max_tokens=4, stream=True, extra_body=NO_EOS)
    )
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    with_usage = list(
        api.completions.create(
            model="chat",
            prompt="The cluster",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 4
    assert all(c.usage is None and len(c.choices) == 1 for c in with_usage[:-1])


def test_a_raw_stream_is_sse_with_usage_null_and_one_done(served):
    body = {
        "model": "chat",
        "prompt": "The cluster",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    response = httpx.post(
        f"{served.base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"}
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [p["usage"] is None for p in payloads] == [True] * (len(payloads) - 1) + [False]
    assert payloads[-1]["usage"]["completion_tokens"] == 3


# ---- chat ---------------------------------------------------------------------------------------


def test_a_chat_completion_uses_the_models_chat_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client(served).chat.completions.create(
        model="chat", messages=messages, max_tokens=4, temperature=0, extra_body=NO_EOS
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    # The prompt is the rendered template: BOS, role markers and EOS per turn, then the assistant's turn.
    tokenizer = Tokenizer.from_pretrained(served_model(served))
    rendered = "<s><|system|>\nBe brief.</s>\n<|user|>\nHello there</s>\n<|assistant|>\n"
    assert chat.usage.prompt_tokens == len(tokenizer.encode(rendered))


def served_model(served: Served) -> str:
    return served.engine.call(lambda e: e.config.model).result()


def test_chat_streaming_opens_with_the_role_and_max_completion_tokens_wins(served):
    stream = client(served).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=10,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_logprobs_carry_top_alternatives(served):
    chat = client(served).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert all(item.bytes == list(item.token.encode()) for item in content)


def test_an_adapter_is_a_model_named_deployment_colon_adapter(served):
    completion = client(served, "globex").completions.create(
        model="chat:globex-legal", prompt="The cluster", max_tokens=3, extra_body=NO_EOS
    )
    assert completion.usage.completion_tokens == 3
    models = {m.id for m in client(served, "globex").models.list()}
    assert {"chat", "chat:globex-legal"} <= models
    assert "chat:globex-legal" not in {m.id for m in client(served, "acme").models.list()}


# ---- errors -------------------------------------------------------------------------------------


def test_errors_use_openai_status_codes_and_bodies(served):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="chat", prompt="x"
        )
    with pytest.raises(openai.PermissionDeniedError):
        client(served).completions.create(model="chat:globex-legal", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client(served).completions.create(model="chat", prompt="x", temperature=-1)
    assert bad.value.status_code == 400 and "temperature" in bad.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"model": "chat"},  # no prompt
        {"model": "chat", "prompt": "x", "max_tokens": 0},
        {"model": "chat", "prompt": "x", "top_p": 0},
        {"model": "chat", "prompt": "x", "n": 1000},
        {"model": "chat", "prompt": "x", "logprobs": 21},
        {"model": "chat", "prompt": ""},
    ],
)
def test_bad_input_is_a_400_with_an_openai_error_body_never_a_422(served, body):
    response = httpx.post(
        f"{served.base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['acme']}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


def test_non_finite_floats_and_broken_json_are_refused(served):
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"}
    for raw in ('{"model": "chat", "prompt": "x", "temperature": NaN}', '{"model": "chat", "prompt": '):
        response = httpx.post(f"{served.base_url}/v1/completions", content=raw, headers=headers)
        assert response.status_code == 400 and "error" in response.json()


def test_a_quota_overrun_is_a_429_with_retry_after(served):
    api = client(served, "solo")
    stream = api.completions.create(model="chat", prompt="The cluster", max_tokens=200, stream=True, extra_body=NO_EOS)
    try:
        next(iter(stream))  # one request in flight: the tenant's whole concurrency
        with pytest.raises(openai.RateLimitError) as refused:
            api.completions.create(model="chat", prompt="x", max_tokens=2)
        assert int(refused.value.response.headers["retry-after"]) >= 1
    finally:
        stream.close()


def test_a_client_that_leaves_mid_stream_aborts_and_frees_its_kv_blocks(served):
    assert wait_for(lambda: kv_blocks_used(served) == 0)
    stream = client(served).completions.create(
        model="chat", prompt="The cluster " * 20, max_tokens=2000, stream=True, extra_body=NO_EOS
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert kv_blocks_used(served) > 0
    stream.close()  # drops the connection
    assert wait_for(lambda: kv_blocks_used(served) == 0), "the request kept its KV blocks after the client left"


def test_models_health_and_metrics(served):
    assert {m.id for m in client(served).models.list()} == {"chat"}
    assert httpx.get(f"{served.base_url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{served.base_url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{served.base_url}/v1/models").status_code == 401
