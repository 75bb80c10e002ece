"""A thin tokenizer over the `tokenizers` library, read from a model folder's `tokenizer.json`.

Special-token ids come, in order of preference, from `tokenizer_config.json` (or
`special_tokens_map.json`) token strings, then `generation_config.json`, then `config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """encode/decode plus the special-token facts the engine needs. No `transformers` at runtime."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        eos_token_ids: tuple[int, ...],
        bos_token_id: int | None,
        chat_template: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        """Tokens that end generation; empty when the folder names none."""
        self.bos_token_id = bos_token_id
        """Beginning-of-sequence token, if the folder names one."""
        self.chat_template = chat_template
        """The jinja2 chat template of `tokenizer_config.json`, if the folder has one."""

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.json` and resolve its EOS/BOS ids from the folder's JSON configs."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (only fast, `tokenizers`-format tokenizers are supported)")
        tokenizer = HFTokenizer.from_file(str(file))
        token_strings = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
        id_sources = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]

        def resolve(key: str) -> tuple[int, ...]:
            token = token_strings.get(key)
            if isinstance(token, dict):  # an AddedToken written out as {"content": ...}
                token = token.get("content")
            token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
            if token_id is not None:
                return (token_id,)
            for source in id_sources:
                ids = source.get(f"{key}_id")
                if ids is not None:
                    return (ids,) if isinstance(ids, int) else tuple(ids)
            return ()

        bos = resolve("bos_token")
        template = token_strings.get("chat_template")
        return cls(
            tokenizer,
            eos_token_ids=resolve("eos_token"),
            bos_token_id=bos[0] if bos else None,
            chat_template=template if isinstance(template, str) else None,
        )

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce, added tokens included."""
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token id (e.g. `<s>`), or None if out of range."""
        return self._tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data
