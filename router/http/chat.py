"""Chat prompts: the model's own jinja2 chat template (from `tokenizer_config.json`), rendered in a sandbox."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.errors import InvalidArgument


class _TemplateError(Exception):
    """A template's own `raise_exception(...)`, e.g. for roles out of order."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # Sandboxed: a template comes with a model folder, which we do not fully trust.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The prompt text of `messages` with the assistant's turn opened; `InvalidArgument` when it cannot be made."""
    if not template:
        raise InvalidArgument("this model has no chat template (tokenizer_config.json); use /v1/completions")
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        )
    except _TemplateError as exc:
        raise InvalidArgument(f"the chat template refused these messages: {exc}") from None
    except jinja2.TemplateError as exc:
        raise InvalidArgument(f"the model's chat template failed: {exc}") from None
