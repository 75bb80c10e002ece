"""A thin tokenizer over the `tokenizers` library, read from a model folder's `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """encode/decode plus the special-token facts the engine needs. No `transformers` at runtime."""

    def __init__(self, tokenizer: HFTokenizer, *, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{path} has no tokenizer.json")
        tokenizer = HFTokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return None if token is None else tokenizer.token_to_id(token)

        eos = token_id("eos_token")
        return cls(tokenizer, eos_token_ids=() if eos is None else (eos,), bos_token_id=token_id("bos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
