"""OpenAI request validation and response shapes (no web framework here).

`parse_completion(body)` / `parse_chat(body)` check a decoded JSON body field by field and return
a `Params`; every problem raises `ApiError` with the HTTP status and an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` naming the field and the value. Fields of the
OpenAI schema jaxspec does not implement are accepted only at their neutral value (n = 1,
penalties 0, no logprobs, no echo); fields outside the schema are ignored, as OpenAI does.
Extensions: `top_k` (int >= 0; -1 also means off) and `return_token_ids` (bool: the completion's
token ids in `choices[0].token_ids`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                       code, type_)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclasses.dataclass
class Params:
    prompt: str | list[int] | None = None  # completions
    messages: list[dict] | None = None  # chat
    max_tokens: int | None = None  # None: up to the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)
    return_token_ids: bool = False
    model: str | None = None


def _bad(field: str, expected: str, value) -> ApiError:
    return ApiError(400, f"'{field}' must be {expected}, got {value!r}", param=field)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _common(body) -> Params:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    p = Params()
    g = body.get
    if g("model") is not None and not isinstance(g("model"), str):
        raise _bad("model", "a string", g("model"))
    p.model = g("model")
    for field in ("max_tokens", "max_completion_tokens"):
        v = g(field)
        if v is None:
            continue
        if not _is_int(v):
            raise _bad(field, "an integer", v)
        if v <= 0:
            raise _bad(field, "an integer >= 1", v)
        p.max_tokens = v
    v = g("temperature")
    if v is not None:
        if not _is_num(v) or not 0 <= v <= 2:
            raise _bad("temperature", "a number in [0, 2]", v)
        p.temperature = float(v)
    v = g("top_p")
    if v is not None:
        if not _is_num(v) or not 0 < v <= 1:
            raise _bad("top_p", "a number in (0, 1]", v)
        p.top_p = float(v)
    v = g("top_k")
    if v is not None:
        if not _is_int(v) or v < -1:
            raise _bad("top_k", "an integer >= 0 (0 or -1: off)", v)
        p.top_k = max(v, 0)
    v = g("seed")
    if v is not None:
        if not _is_int(v):
            raise _bad("seed", "an integer", v)
        p.seed = v % (1 << 32)
    v = g("stream")
    if v is not None:
        if not isinstance(v, bool):
            raise _bad("stream", "a boolean", v)
        p.stream = v
    v = g("stream_options")
    if v is not None:
        if not isinstance(v, dict) or not isinstance(v.get("include_usage", False), bool):
            raise _bad("stream_options", 'an object {"include_usage": bool}', v)
        p.include_usage = v.get("include_usage", False)
    v = g("stop")
    if v is not None:
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", "a non-empty string or a list of them", v)
        if len(stops) > 4:
            raise _bad("stop", "at most 4 sequences", v)
        p.stop = stops
    v = g("return_token_ids")
    if v is not None:
        if not isinstance(v, bool):
            raise _bad("return_token_ids", "a boolean", v)
        p.return_token_ids = v
    # OpenAI fields jaxspec accepts only at their neutral value
    neutral = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
               "logit_bias": ({},), "suffix": ("",)}  # fmt: skip
    for field, ok in neutral.items():
        v = g(field)
        if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool)
                                     for o in ok):  # fmt: skip
            raise ApiError(400, f"'{field}' = {v!r} is not supported (only {ok[0]!r})",
                           param=field)  # fmt: skip
    if g("user") is not None and not isinstance(g("user"), str):
        raise _bad("user", "a string", g("user"))
    return p


def parse_completion(body) -> Params:
    p = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one text prompt
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "a non-empty string", prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        pass
    elif prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    else:
        raise _bad("prompt", "a string, a list of token ids, or a list of one string", prompt)
    p.prompt = prompt
    if p.max_tokens is None:
        p.max_tokens = 16  # OpenAI's default for completions
    return p


ROLES = ("system", "user", "assistant", "developer")


def parse_chat(body) -> Params:
    p = _common(body)
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list", msgs)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"one of {ROLES}", role)
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text"
                       and isinstance(c.get("text"), str) for c in content):  # fmt: skip
                raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "a string", content)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    p.messages = out
    return p


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_body(rid, model, text, finish, n_prompt, n_out, token_ids=None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(n_prompt, n_out)}  # fmt: skip


def chat_body(rid, model, text, finish, n_prompt, n_out, token_ids=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": finish}  # fmt: skip
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(n_prompt, n_out)}  # fmt: skip


def completion_chunk(rid, model, created, text, finish=None, token_ids=None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def chat_chunk(rid, model, created, delta: dict, finish=None, token_ids=None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def usage_chunk(rid, model, created, chat: bool, n_prompt: int, n_out: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_out)}  # fmt: skip
