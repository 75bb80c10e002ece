"""The HTTP front's pure parts: chat templates, model names, port settings. No server, no Ray."""

from __future__ import annotations

import pytest

from control_plane.config import ControlPlaneConfig
from router.errors import InvalidArgument
from router.http.app import parse_model
from router.http.chat import render_chat
from router.http.ports import HTTP_FREE_PORT, HTTP_OFF, check_http_port, replica_http_port
from router.server import RouterConfig
from workers.engine.tiny import TINY_CHAT_TEMPLATE
from workers.engine.tokenizer import Tokenizer


def test_make_tiny_writes_a_chat_template_the_tokenizer_loads(tiny_llama):
    tokenizer = Tokenizer.from_pretrained(tiny_llama)
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.id_to_token(tokenizer.bos_token_id) == "<s>"


def test_the_template_renders_every_turn_and_opens_the_assistants():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat(TINY_CHAT_TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_missing_or_refusing_templates_are_bad_requests():
    with pytest.raises(InvalidArgument, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
    with pytest.raises(InvalidArgument, match="first message must be the user"):
        render_chat(strict, [{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidArgument, match="chat template failed"):
        render_chat("{{ messages.__class__.__mro__ }}{% for %}", [{"role": "user", "content": "x"}])


def test_a_sandboxed_template_cannot_reach_python_internals():
    with pytest.raises(InvalidArgument):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_model_names_select_a_deployment_and_an_adapter():
    assert parse_model("chat") == ("chat", "")
    assert parse_model("chat:support") == ("chat", "support")


def test_http_port_settings_zero_is_off_and_minus_one_a_free_port():
    assert RouterConfig().http_port == ControlPlaneConfig().router.http_port == 8000
    for good in (HTTP_OFF, HTTP_FREE_PORT, 1, 65535):
        check_http_port("http_port", good)
    for bad in (-2, 65536, True, "8000"):
        with pytest.raises(ValueError, match="0 \\(off\\) or -1 \\(a free port\\)"):
            check_http_port("http_port", bad)
    with pytest.raises(ValueError, match=r"router\.http_port"):
        ControlPlaneConfig.from_dict({"router": {"http_port": -5}})
    with pytest.raises(ValueError, match="http_port"):
        RouterConfig(http_port=70000)
    # Replica i of a cluster gets port + i, like the gRPC ports; off and free stay so.
    assert [replica_http_port(8000, i) for i in range(3)] == [8000, 8001, 8002]
    assert replica_http_port(HTTP_OFF, 2) == HTTP_OFF and replica_http_port(HTTP_FREE_PORT, 2) == HTTP_FREE_PORT
