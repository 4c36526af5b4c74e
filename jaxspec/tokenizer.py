"""Tokenizer and chat template of a converted checkpoint (`tokenizers` + the model's own Jinja
chat template, rendered the way transformers renders it).

`Tokenizer.from_dir(path)` reads `tokenizer.json` and `tokenizer_config.json`. `encode(text,
chat=True)` applies the chat template (one user turn, generation prompt added) when the model has
one; the rendered text already holds the special tokens, so it is encoded without adding more,
exactly as transformers' `apply_chat_template` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from jaxspec.errors import CheckpointError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict, source: str = "<memory>"):
        self._tok = tok
        self.source = source
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self._template = None
        if self.chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise CheckpointError(f"{source}: chat template does not parse ({e})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg_file = path / "tokenizer_config.json"
        config = {}
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        return cls(tok, config, str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise CheckpointError(f"{self.source}: the model has no chat template")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt; `chat` wraps it as one user turn when a template exists."""
        if chat and self._template is not None:
            rendered = self.apply_chat_template([{"role": "user", "content": text}])
            return self._tok.encode(rendered, add_special_tokens=False).ids
        return self._tok.encode(text).ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat (e.g. a system and a user turn) through the chat template."""
        rendered = self.apply_chat_template(messages)
        return self._tok.encode(rendered, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of raw texts (no chat template, no special tokens), encoded in parallel."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # {"content": "<|im_end|>", ...} in older tokenizer configs
        return tok.get("content")
    return tok
