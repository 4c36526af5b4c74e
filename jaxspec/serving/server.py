"""OpenAI-compatible HTTP server over the engine (starlette + uvicorn: the `serve` extra).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` → server-sent events,
`data: {chunk}` ... `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus
text). Status codes: 400 bad JSON or field (OpenAI error body naming it), 404 unknown model,
413/400 prompt longer than the context (`code: context_length_exceeded`), 429 full queue (with
`Retry-After`), 503 shutting down or engine failed, 500 an engine error mid-request.

Text: completions encode the prompt as is (no chat template, as `jaxspec generate --no-chat`);
chat completions render the messages with the model's chat template (one user message gives
exactly `jaxspec generate`'s prompt). Output text is the decode of the generated ids without
special tokens; streamed deltas are decoded incrementally (an incomplete UTF-8 character or a
possible stop-string prefix is held back), so the deltas concatenate to the final text. A stop
string ends the request (finish_reason "stop") and is not included.

Concurrency: the engine runs in its own thread; each request waits on an asyncio queue that the
engine's callbacks feed through `loop.call_soon_threadsafe`. A streaming client that disconnects
cancels its request (the slot is freed between two steps). SIGTERM/SIGINT (uvicorn): stop
accepting connections, finish in-flight requests, then stop the engine and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from jaxspec.errors import InputError
from jaxspec.serving import protocol
from jaxspec.serving.engine import Engine, QueueFull, Request
from jaxspec.serving.protocol import ApiError


class TextStream:
    """Incremental detokenization with stop strings: `push(ids)` → safe new text; `stopped`."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        text = self.tok.decode(self.ids)
        for s in self.stops:  # each cut can only shorten: the earliest stop string wins
            i = text.find(s)
            if i >= 0:
                text, self.stopped = text[:i], True
        if not (final or self.stopped):
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its bytes
            text = text[: max(len(self.sent), len(text) - self.hold)]  # a stop may be starting
        if not text.startswith(self.sent):  # a tokenizer that re-segments: hold until the end
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Server:
    """The ASGI app (`.app`) of one engine and its tokenizer."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, retry_after_s: int = 1):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.retry_after_s = retry_after_s
        self.aliases = {model_name, "default"}
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if self.engine._thread is None:
            self.engine.start()
        yield
        # uvicorn has finished the in-flight requests; let the engine drain and stop
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    # ---- routes ------------------------------------------------------------------------------

    async def health(self, request: HttpRequest):
        e = self.engine
        ok = e.error is None and e._accepting
        body = {"status": "ok" if ok else "unavailable", "model": self.model_name,
                "active_slots": e.active, "queue_length": e.queue_length}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: HttpRequest):
        return PlainTextResponse(self.engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    async def models(self, request: HttpRequest):
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jaxspec"}
                ],
            }
        )

    async def completions(self, request: HttpRequest):
        return await self._handle(request, chat=False)

    async def chat(self, request: HttpRequest):
        return await self._handle(request, chat=True)

    # ---- one request -------------------------------------------------------------------------

    async def _handle(self, request: HttpRequest, chat: bool):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            p = protocol.parse_chat(body) if chat else protocol.parse_completion(body)
            if p.model is not None and p.model not in self.aliases:
                msg = f"the model {p.model!r} does not exist (this server has {self.model_name!r})"
                raise ApiError(404, msg, param="model", code="model_not_found")
            ids = self._encode(p, chat)
            req = self._request(p, ids)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            req.on_tokens = lambda t: loop.call_soon_threadsafe(events.put_nowait, ("tok", t))
            req.on_finish = lambda r, n: loop.call_soon_threadsafe(events.put_nowait, ("end", r))
            try:
                self.engine.submit(req)
            except QueueFull as e:
                self.engine.metrics.rejected["429"] += 1
                err = ApiError(429, f"the server is busy ({e}); retry later",
                               type_="rate_limit_error", code="queue_full")  # fmt: skip
                return _error(err, {"Retry-After": str(self.retry_after_s)})
            except RuntimeError as e:  # shutting down
                return _error(ApiError(503, str(e), type_="server_error"))
        except ApiError as e:
            self.engine.metrics.rejected[str(e.status)] += 1
            return _error(e)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if p.stream:
            gen = self._stream(req, p, events, rid, chat, len(ids))
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await self._complete(req, p, events, rid, chat, len(ids))

    def _encode(self, p: protocol.Params, chat: bool) -> list[int]:
        if self.tok is None:
            if chat or isinstance(p.prompt, str):
                raise ApiError(400, "this model has no tokenizer: send 'prompt' as token ids")
            ids = list(p.prompt)
        elif chat:
            ids = self.tok.encode_messages(p.messages)
        elif isinstance(p.prompt, str):
            ids = self.tok.encode(p.prompt, chat=False)
        else:
            ids = list(p.prompt)
        C = self.engine.config.max_context
        if p.max_tokens is None:  # chat without max_tokens: up to the context
            p.max_tokens = max(C - len(ids), 1)
        if len(ids) + p.max_tokens > C:
            raise ApiError(
                400,
                f"this model's maximum context length is {C} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens is {p.max_tokens} (prompt + max_tokens must fit)",
                param="max_tokens" if len(ids) < C else "messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        return ids

    def _request(self, p: protocol.Params, ids: list[int]) -> Request:
        seed = p.seed if p.seed is not None else time.time_ns() % (1 << 31)
        req = Request(ids, p.max_tokens, p.temperature, p.top_k, p.top_p, seed=seed)
        try:
            self.engine.check(req)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        return req

    async def _events(self, req: Request, p: protocol.Params, events: asyncio.Queue):
        """(delta text, new ids, finish reason or None) as the engine produces them."""
        text = TextStream(self.tok, p.stop) if self.tok is not None else None
        while True:
            kind, val = await events.get()
            if kind == "tok":
                delta = text.push(val) if text is not None else ""
                if text is not None and text.stopped:
                    self.engine.cancel(req, "stop")
                    yield delta, val, "stop"
                    return
                yield delta, val, None
            else:
                if val.startswith("error"):
                    raise RuntimeError(val)
                delta = text.push([], final=True) if text is not None else ""
                yield delta, [], "stop" if val in ("stop", "cancelled") else val
                return

    async def _complete(self, req, p, events, rid, chat, n_prompt):
        parts, ids, finish = [], [], None
        try:
            async for delta, new, fin in self._events(req, p, events):
                parts.append(delta)
                ids += new
                finish = fin or finish
        except RuntimeError as e:
            return _error(ApiError(500, f"generation failed: {e}", type_="server_error"))
        finally:
            self.engine.cancel(req)  # no-op once finished (e.g. the client went away)
        make = protocol.chat_body if chat else protocol.completion_body
        tids = ids if p.return_token_ids else None
        return JSONResponse(make(rid, self.model_name, "".join(parts), finish, n_prompt,
                                 len(ids), tids))  # fmt: skip

    async def _stream(self, req, p, events, rid, chat, n_prompt):
        created = int(time.time())
        model = self.model_name
        n_out = 0

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield sse(protocol.chat_chunk(rid, model, created, {"role": "assistant",
                                                                    "content": ""}))  # fmt: skip
            async for delta, new, fin in self._events(req, p, events):
                n_out += len(new)
                tids = new if p.return_token_ids else None
                if not delta and fin is None and not tids:
                    continue
                if chat:
                    d = {"content": delta} if delta or fin is None else {}
                    yield sse(protocol.chat_chunk(rid, model, created, d, fin, tids))
                else:
                    yield sse(protocol.completion_chunk(rid, model, created, delta, fin, tids))
            if p.include_usage:
                yield sse(protocol.usage_chunk(rid, model, created, chat, n_prompt, n_out))
            yield "data: [DONE]\n\n"
        except RuntimeError as e:
            err = ApiError(500, f"generation failed: {e}", type_="server_error")
            yield sse(err.body())
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: free its slot
            self.engine.cancel(req)


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:  # fmt: skip
    """Run the server until SIGTERM/SIGINT, which drain in-flight requests first; then return
    (exit status 0: a drained shutdown is a clean one)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after the drain (status -15); we return instead
            getattr(self, "_captured_signals", []).clear()

    app = Server(engine, tokenizer, model_name).app
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None)  # fmt: skip
    _Server(config).run()
