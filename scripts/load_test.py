"""Load test for an OpenAI-compatible completion server (e.g. `jaxspec serve`) on loopback.

    python scripts/load_test.py --prompts-file /work/shared/data/spec_bench/question.jsonl \
        [--url http://127.0.0.1:8000] [--endpoint chat|completions] [--concurrency 8] \
        [--requests 32] [--duration 120] [--max-tokens 64] [--mixed-lengths] [--no-stream] \
        [--expect expected.json] [--save-outputs outputs.json] [--json results.json]

How it drives the server: `--concurrency` closed-loop clients share one queue of `--requests`
requests; each client sends its next request when its previous one has finished. No request
starts after `--duration` seconds (in-flight ones finish). Before the timed phase, `--warmup`
requests go one at a time; they are checked like every other response but excluded from the
statistics. Prompts come from a JSONL file (`prompt`, or the first of `turns`); request i uses
prompt i (cycling), or with `--mixed-lengths` prompt i joined with the next 0-3 prompts (a choice
seeded by `--seed` and i, so the same run sends the same prompts), truncated to
`--max-prompt-chars`. Requests use `/v1/chat/completions` (one user message) or
`/v1/completions`, `stream: true` with `stream_options.include_usage` unless `--no-stream`.

What it measures, per request (seconds, from `time.perf_counter` on the client, so every time
includes the HTTP round trip over loopback):
  TTFT        from sending the request to the first chunk with non-empty content; without
              streaming TTFT = end-to-end latency.
  ITL         inter-token latency: the gap between successive content chunks; when a chunk says
              how many tokens it carries (a `token_ids` list in its choice, or a cumulative
              `usage.completion_tokens` on every chunk), its gap is divided by that number (and
              counted once per token), else the chunk counts as one token.
  TPOT        per-token latency: (last content chunk - first content chunk) / (completion tokens
              - 1), for a streamed request with at least two content chunks and two tokens.
  E2E         from sending the request to the end of the response (after `[DONE]`).
  completion tokens   `usage.completion_tokens` when the server reports it, else the number of
              content chunks (streaming) or of whitespace-separated words (no streaming).
Aggregates are over the successful timed requests: p50/p90/p99 by `numpy.percentile` (linear
interpolation) and the arithmetic mean; ITL pools the gaps of all requests.
Throughput: requests/s = successful timed requests / wall time of the timed phase; completion
tokens/s = total completion tokens of those requests / the same wall time (aggregate over all
clients, not per client). The wall time runs from the start of the timed phase until its last
request finishes.

Checks on every response (warmup included): HTTP 200; without streaming, `object` is
`text_completion` / `chat.completion`, `choices[0].text` / `choices[0].message.content` is a
string and `finish_reason` is `stop` or `length`; with streaming, every `data:` line is JSON with
`object` `text_completion` / `chat.completion.chunk`, the stream ends with `data: [DONE]` and
exactly one chunk has a non-null `finish_reason` (`stop` or `length`). When `finish_reason` is
`length` and the server reports usage, completion tokens must equal `--max-tokens`. A 429 is
counted separately and retried once after its `Retry-After` (seconds; 1 s when absent); other
HTTP errors are counted by status, transport errors by kind (`timeout`, `ConnectError`, ...).
With `--expect FILE` (JSON: prompt string -> expected completion text), every response whose exact
prompt is a key must equal the expected text (the greedy determinism check); `--save-outputs`
writes such a file from a run (e.g. of the autoregressive baseline).

Output: a human-readable report on stdout and, with `--json`, the results as JSON (keys listed in
`summarize`). Exit code: 0 when every response passed its checks and matched its expected text,
1 otherwise, 2 on a usage error (bad prompts/expect file, server unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ENDPOINTS = {
    "completions": ("/v1/completions", "text_completion", "text_completion"),
    "chat": ("/v1/chat/completions", "chat.completion", "chat.completion.chunk"),
}
FINISH_REASONS = ("stop", "length")
MAX_DETAIL_CHARS = 2000


class LoadTestError(Exception):
    """A usage error: bad input file, unreachable server."""


@dataclass
class LoadConfig:
    prompts_file: str
    url: str = "http://127.0.0.1:8000"
    endpoint: str = "chat"
    model: str = "default"
    mixed_lengths: bool = False
    max_prompt_chars: int = 4000
    seed: int = 0
    concurrency: int = 4
    requests: int = 32
    duration: float = 120.0
    timeout: float = 300.0
    max_tokens: int = 64
    temperature: float = 0.0
    stream: bool = True
    expect: str | None = None
    save_outputs: str | None = None
    warmup: int = 1
    label: str = ""
    json_out: str | None = None
    command: str = ""


@dataclass
class RequestResult:
    index: int
    prompt: str
    warmup: bool
    status: int | None = None
    error: str | None = None  # HTTP or transport error (then no checks ran)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    text: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    usage_reported: bool = False
    n_chunks: int = 0
    finish_reason: str | None = None
    retry_after: float | None = None
    rate_limited: int = 0  # 429 responses seen for this request

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.failures

    def fail(self, kind: str, message: str) -> None:
        if all(k != kind for k, _ in self.failures):  # each kind once per request
            self.failures.append((kind, message))


# ---------------------------------------------------------------------------------------------
# inputs


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSONL file: each line's `prompt`, or the first of its `turns`."""
    prompts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LoadTestError(f"cannot read prompts file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoadTestError(f"{path}:{n}: not JSON: {e}") from e
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if prompt is None and isinstance(obj, dict) and isinstance(obj.get("turns"), list):
            prompt = obj["turns"][0] if obj["turns"] else None
        if not isinstance(prompt, str) or not prompt:
            raise LoadTestError(f"{path}:{n}: needs a non-empty `prompt` or `turns`")
        prompts.append(prompt)
    if not prompts:
        raise LoadTestError(f"{path}: no prompts")
    return prompts


def build_prompts(
    base: list[str], start: int, count: int, *, mixed: bool, seed: int, max_chars: int
) -> list[str]:
    """Prompts for requests start..start+count-1. Request i's prompt depends only on (i, seed):
    base[i % n], or with `mixed` that prompt joined with the next k ∈ {0..3} prompts."""
    out = []
    for i in range(start, start + count):
        extra = random.Random(f"{seed}:{i}").randint(0, 3) if mixed else 0
        parts = [base[(i + j) % len(base)] for j in range(extra + 1)]
        out.append("\n\n".join(parts)[:max_chars])
    return out


def load_expect(path: str | Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoadTestError(f"cannot read expect file {path}: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise LoadTestError(f"{path}: must be a JSON object mapping prompt -> expected text")
    return data


def request_body(cfg: LoadConfig, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": cfg.stream,
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    return body


# ---------------------------------------------------------------------------------------------
# one request


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0  # an HTTP date or garbage: a short default


def _usage_tokens(obj: dict) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return None


def _check_finish(res: RequestResult, cfg: LoadConfig) -> None:
    if res.finish_reason is not None and res.finish_reason not in FINISH_REASONS:
        res.fail("bad_finish_reason", f"finish_reason {res.finish_reason!r}")
    if (
        res.finish_reason == "length"
        and res.usage_reported
        and res.completion_tokens != cfg.max_tokens
    ):
        res.fail(
            "length_token_count",
            f"finish_reason 'length' with {res.completion_tokens} completion tokens, "
            f"max_tokens {cfg.max_tokens}",
        )


async def _streamed(client: httpx.AsyncClient, cfg: LoadConfig, res: RequestResult) -> None:
    path, _, chunk_object = ENDPOINTS[cfg.endpoint]
    t0 = time.perf_counter()
    async with client.stream("POST", path, json=request_body(cfg, res.prompt)) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            body = (await resp.aread())[:300]
            res.error = f"HTTP {resp.status_code}: {body!r}"
            res.retry_after = _retry_after(resp.headers.get("retry-after"))
            return
        times: list[float] = []  # arrival of each content chunk
        parts: list[str] = []
        done = False
        n_finish = 0
        usage_total: int | None = None  # last cumulative usage seen
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, `: comments`, `event:` fields
            data = line[5:].strip()
            if done:
                res.fail("stream_data_after_done", f"data after [DONE]: {data[:200]!r}")
                continue
            if data == "[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                res.fail("stream_bad_json", f"data line is not JSON: {data[:200]!r}")
                continue
            if not isinstance(chunk, dict) or chunk.get("object") != chunk_object:
                got = chunk.get("object") if isinstance(chunk, dict) else type(chunk).__name__
                res.fail("stream_bad_object", f"chunk object {got!r}, want {chunk_object!r}")
                continue
            cum = _usage_tokens(chunk)
            choices = chunk.get("choices") or []
            if choices and isinstance(choices[0], dict):
                choice = choices[0]
                if cfg.endpoint == "chat":
                    delta = choice.get("delta")
                    content = delta.get("content") if isinstance(delta, dict) else None
                else:
                    content = choice.get("text")
                if content is not None and not isinstance(content, str):
                    res.fail("stream_bad_content", f"content is {type(content).__name__}")
                elif content:
                    parts.append(content)
                    # tokens this chunk added: its `token_ids` (jaxspec serve with
                    # return_token_ids), or the step of a cumulative usage count on every chunk
                    added = None if cum is None or usage_total is None else cum - usage_total
                    if isinstance(choice.get("token_ids"), list):
                        added = len(choice["token_ids"])
                    if times:
                        n = added if added and added > 0 else 1
                        res.itls.extend([(now - times[-1]) / n] * n)
                    else:
                        res.ttft = now - t0
                    times.append(now)
                if choice.get("finish_reason") is not None:
                    n_finish += 1
                    res.finish_reason = choice["finish_reason"]
            if cum is not None:
                usage_total = cum
    res.e2e = time.perf_counter() - t0
    res.text = "".join(parts)
    res.n_chunks = len(times)
    res.usage_reported = usage_total is not None
    res.completion_tokens = usage_total if usage_total is not None else len(times)
    if res.ttft is None:
        res.ttft = res.e2e  # nothing streamed: the whole latency
    if len(times) >= 2 and res.completion_tokens >= 2:
        res.tpot = (times[-1] - times[0]) / (res.completion_tokens - 1)
    if not done:
        res.fail("stream_no_done", "the stream did not end with data: [DONE]")
    if n_finish != 1:
        res.fail("stream_finish_reason_count", f"{n_finish} chunks with a finish_reason")
    _check_finish(res, cfg)


async def _plain(client: httpx.AsyncClient, cfg: LoadConfig, res: RequestResult) -> None:
    path, obj_name, _ = ENDPOINTS[cfg.endpoint]
    t0 = time.perf_counter()
    resp = await client.post(path, json=request_body(cfg, res.prompt))
    res.e2e = res.ttft = time.perf_counter() - t0
    res.status = resp.status_code
    if resp.status_code != 200:
        res.error = f"HTTP {resp.status_code}: {resp.content[:300]!r}"
        res.retry_after = _retry_after(resp.headers.get("retry-after"))
        return
    try:
        obj = resp.json()
    except ValueError:
        res.fail("bad_json", f"response is not JSON: {resp.text[:200]!r}")
        return
    if not isinstance(obj, dict) or obj.get("object") != obj_name:
        got = obj.get("object") if isinstance(obj, dict) else type(obj).__name__
        res.fail("bad_object", f"object {got!r}, want {obj_name!r}")
        return
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        res.fail("bad_choices", f"choices: {str(choices)[:200]}")
        return
    if cfg.endpoint == "chat":
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        res.fail("bad_content", f"completion text is {type(text).__name__}")
        text = ""
    res.text = text
    res.finish_reason = choice.get("finish_reason")
    if res.finish_reason is None:
        res.fail("bad_finish_reason", "finish_reason is null")
    tokens = _usage_tokens(obj)
    res.usage_reported = tokens is not None
    res.completion_tokens = tokens if tokens is not None else len(text.split())
    res.n_chunks = 1
    _check_finish(res, cfg)


async def _attempt(client, cfg, index, prompt, warmup) -> RequestResult:
    res = RequestResult(index=index, prompt=prompt, warmup=warmup)
    try:
        async with asyncio.timeout(cfg.timeout):
            await (_streamed if cfg.stream else _plain)(client, cfg, res)
    except (TimeoutError, httpx.TimeoutException):
        res.error = "timeout"
    except Exception as e:  # transport errors, and anything a malformed response provokes
        res.error = f"{type(e).__name__}: {e}"
    return res


async def send_request(
    client: httpx.AsyncClient, cfg: LoadConfig, index: int, prompt: str, warmup: bool = False
) -> RequestResult:
    """One request, checked; a 429 is retried once after its Retry-After."""
    res = await _attempt(client, cfg, index, prompt, warmup)
    if res.status == 429:
        await asyncio.sleep(min(res.retry_after or 0.0, cfg.timeout))
        retry = await _attempt(client, cfg, index, prompt, warmup)
        retry.rate_limited = 1 + (retry.status == 429)
        res = retry
    return res


def error_kind(res: RequestResult) -> str | None:
    """The key under which a failed request is counted in errors_by_status (None if it got a
    200: then its failures are check failures)."""
    if res.status is not None and res.status != 200:
        return str(res.status)
    if res.error is not None:
        return "timeout" if res.error == "timeout" else res.error.split(":")[0]
    return None


# ---------------------------------------------------------------------------------------------
# the run


async def _get(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    try:
        resp = await client.get(path, timeout=10.0)
    except httpx.HTTPError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:20000]
    return {"status": resp.status_code, "body": body}


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": p50.item(),
        "p90": p90.item(),
        "p99": p99.item(),
        "mean": a.mean().item(),
        "n": len(values),
    }


def _first_diff(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def summarize(
    cfg: LoadConfig,
    timed: list[RequestResult],
    warm: list[RequestResult],
    wall: float,
    expect: dict[str, str] | None,
    server: dict[str, Any],
) -> dict[str, Any]:
    """The results. Keys: label, date, command, machine, config, server, requests_sent,
    requests_ok, requests_failed, warmup_requests, warmup_failed, wall_s, requests_per_s,
    completion_tokens, completion_tokens_per_s, usage_reported, prompt_chars_mean/min/max,
    ttft_s, tpot_s, itl_s, e2e_s ({p50, p90, p99, mean, n}), rate_limited, errors_by_status,
    check_failures ({kind: {count, example}}), expect_checked, expect_matched, mismatches,
    mismatch_details, passed, exit_code, per_request."""
    ok = [r for r in timed if r.ok]
    everything = warm + timed
    errors: dict[str, int] = {}
    checks: dict[str, dict[str, Any]] = {}
    for r in everything:
        kind = error_kind(r)
        if kind is not None:
            errors[kind] = errors.get(kind, 0) + 1
        for k, msg in r.failures:
            entry = checks.setdefault(k, {"count": 0, "example": f"request {r.index}: {msg}"})
            entry["count"] += 1
    checked = matched = 0
    mismatch_details = []
    if expect is not None:
        for r in everything:
            if r.status != 200 or r.error is not None or r.prompt not in expect:
                continue
            checked += 1
            want = expect[r.prompt]
            if r.text == want:
                matched += 1
                continue
            mismatch_details.append(
                {
                    "index": r.index,
                    "warmup": r.warmup,
                    "first_diff": _first_diff(want, r.text),
                    "prompt": r.prompt[:MAX_DETAIL_CHARS],
                    "expected": want[:MAX_DETAIL_CHARS],
                    "got": r.text[:MAX_DETAIL_CHARS],
                }
            )
    tokens = sum(r.completion_tokens for r in ok)
    chars = [len(r.prompt) for r in timed]
    warmup_failed = sum(not r.ok for r in warm)
    passed = bool(ok) and len(ok) == len(timed) and not warmup_failed and not mismatch_details
    return {
        "label": cfg.label,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "httpx": httpx.__version__,
        },
        "config": dataclasses.asdict(cfg),
        "server": server,
        "requests_sent": len(timed),
        "requests_ok": len(ok),
        "requests_failed": len(timed) - len(ok),
        "warmup_requests": len(warm),
        "warmup_failed": warmup_failed,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / wall if wall > 0 else None,
        "usage_reported": sum(r.usage_reported for r in ok),
        "prompt_chars_mean": float(np.mean(chars)) if chars else None,
        "prompt_chars_min": min(chars, default=None),
        "prompt_chars_max": max(chars, default=None),
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _stats([x for r in ok for x in r.itls]),
        "e2e_s": _stats([r.e2e for r in ok if r.e2e is not None]),
        "rate_limited": sum(r.rate_limited for r in everything),
        "errors_by_status": errors,
        "check_failures": checks,
        "expect_checked": checked,
        "expect_matched": matched,
        "mismatches": len(mismatch_details),
        "mismatch_details": mismatch_details,
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "per_request": [
            {
                "index": r.index,
                "warmup": r.warmup,
                "prompt_chars": len(r.prompt),
                "status": r.status,
                "ok": r.ok,
                "error": r.error,
                "failures": [k for k, _ in r.failures],
                "ttft_s": r.ttft,
                "tpot_s": r.tpot,
                "e2e_s": r.e2e,
                "completion_tokens": r.completion_tokens,
                "n_chunks": r.n_chunks,
                "finish_reason": r.finish_reason,
                "rate_limited": r.rate_limited,
            }
            for r in everything
        ],
    }


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Warm up, run the timed phase, check every response; returns `summarize`'s dict. Raises
    LoadTestError on bad input files or an unreachable server."""
    if cfg.endpoint not in ENDPOINTS:
        raise LoadTestError(f"endpoint must be one of {sorted(ENDPOINTS)}")
    if cfg.concurrency < 1 or cfg.requests < 1 or cfg.warmup < 0 or cfg.max_tokens < 1:
        raise LoadTestError("concurrency, requests and max_tokens must be >= 1, warmup >= 0")
    base = load_prompts(cfg.prompts_file)
    expect = load_expect(cfg.expect) if cfg.expect else None
    opts = dict(mixed=cfg.mixed_lengths, seed=cfg.seed, max_chars=cfg.max_prompt_chars)
    prompts = build_prompts(base, 0, cfg.requests, **opts)
    # warmup prompts come after the timed ones, so --warmup does not change what is timed
    warm_prompts = build_prompts(base, cfg.requests, cfg.warmup, **opts)
    limits = httpx.Limits(max_connections=cfg.concurrency + 2, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=cfg.url, timeout=cfg.timeout, limits=limits, trust_env=False
    ) as client:
        health = await _get(client, "/health")
        if health["status"] is None:
            raise LoadTestError(f"cannot reach the server at {cfg.url}: {health['error']}")
        if health["status"] != 200:
            print(f"warning: GET /health returned {health['status']}", file=sys.stderr)
        metrics_before = await _get(client, "/metrics")

        warm = []
        for j, p in enumerate(warm_prompts):
            warm.append(await send_request(client, cfg, cfg.requests + j, p, warmup=True))

        timed: list[RequestResult] = []
        next_index = 0
        t_start = time.perf_counter()
        deadline = t_start + cfg.duration

        async def client_loop() -> None:
            nonlocal next_index
            while next_index < len(prompts) and time.perf_counter() < deadline:
                i = next_index  # no await between the test and the increment: no race
                next_index += 1
                timed.append(await send_request(client, cfg, i, prompts[i]))

        await asyncio.gather(*(client_loop() for _ in range(min(cfg.concurrency, len(prompts)))))
        wall = time.perf_counter() - t_start
        metrics_after = await _get(client, "/metrics")

    timed.sort(key=lambda r: r.index)
    server = {"health": health, "metrics_before": metrics_before, "metrics_after": metrics_after}
    results = summarize(cfg, timed, warm, wall, expect, server)
    if cfg.save_outputs:
        outputs: dict[str, str] = {}
        for r in warm + timed:
            if r.ok:
                outputs.setdefault(r.prompt, r.text)
        Path(cfg.save_outputs).write_text(json.dumps(outputs, indent=1, ensure_ascii=False))
    return results


# ---------------------------------------------------------------------------------------------
# report and CLI


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def format_report(res: dict[str, Any]) -> str:
    c = res["config"]
    rps, tps = res["requests_per_s"], res["completion_tokens_per_s"]
    lines = [
        f"load test {res['label'] or ''}".rstrip() + f"  ({res['date']})",
        f"  {c['endpoint']} {c['url']}  model={c['model']}  concurrency={c['concurrency']}  "
        f"stream={'on' if c['stream'] else 'off'}  max_tokens={c['max_tokens']}  "
        f"temperature={c['temperature']}  mixed_lengths={c['mixed_lengths']}",
        f"  machine: {res['machine']['platform']}, python {res['machine']['python']}, "
        f"{res['machine']['cpu_count']} cpus",
        f"requests: {res['requests_ok']} ok, {res['requests_failed']} failed "
        f"({res['requests_sent']} sent; {res['warmup_requests']} warmup, "
        f"{res['warmup_failed']} failed)",
        f"wall {res['wall_s']:.2f} s   {rps or 0:.2f} req/s   "
        f"{res['completion_tokens']} completion tokens, {tps or 0:.1f} tok/s "
        f"(usage reported by {res['usage_reported']}/{res['requests_ok']})",
        f"prompt chars: mean {res['prompt_chars_mean'] or 0:.0f} "
        f"(min {res['prompt_chars_min']}, max {res['prompt_chars_max']})",
        f"{'latency (ms)':<22}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'n':>8}",
    ]
    for name, key in [
        ("TTFT", "ttft_s"),
        ("TPOT (per token)", "tpot_s"),
        ("ITL (per chunk/token)", "itl_s"),
        ("end-to-end", "e2e_s"),
    ]:
        s = res[key]
        lines.append(
            f"{name:<22}{_ms(s['p50']):>10}{_ms(s['p90']):>10}{_ms(s['p99']):>10}"
            f"{_ms(s['mean']):>10}{s['n']:>8}"
        )
    lines.append(f"rate limited (429): {res['rate_limited']}")
    errs = ", ".join(f"{k}: {v}" for k, v in res["errors_by_status"].items())
    lines.append(f"errors by status: {errs or 'none'}")
    if res["check_failures"]:
        lines.append("check failures:")
        for k, v in res["check_failures"].items():
            lines.append(f"  {k}: {v['count']}  e.g. {v['example']}")
    else:
        lines.append("check failures: none")
    if c["expect"]:
        lines.append(
            f"expect: {res['expect_checked']} checked, {res['expect_matched']} matched, "
            f"{res['mismatches']} mismatches"
        )
        for m in res["mismatch_details"][:10]:
            lines.append(
                f"  request {m['index']} (first diff at char {m['first_diff']}): prompt "
                f"{m['prompt'][:60]!r}\n    expected {m['expected'][:80]!r}\n"
                f"    got      {m['got'][:80]!r}"
            )
    lines.append("PASS" if res["passed"] else "FAIL")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Times in seconds; see the module docstring for the definitions.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (%(default)s)")
    p.add_argument(
        "--endpoint",
        choices=sorted(ENDPOINTS),
        default="chat",
        help="/v1/chat/completions or /v1/completions (%(default)s)",
    )
    p.add_argument("--model", default="default", help="`model` sent in the body (%(default)s)")
    p.add_argument(
        "--prompts-file",
        required=True,
        metavar="JSONL",
        help="one object a line with `prompt` (str) or `turns` (list; first used)",
    )
    p.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="join request i's prompt with the next 0-3 prompts (seeded)",
    )
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=4000,
        metavar="N",
        help="truncate prompts to N characters (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --mixed-lengths (%(default)s)")
    p.add_argument(
        "--concurrency", type=int, default=4, metavar="N", help="closed-loop clients (%(default)s)"
    )
    p.add_argument(
        "--requests",
        type=int,
        default=32,
        metavar="R",
        help="timed requests in total (%(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=120.0,
        metavar="S",
        help="no request starts after S seconds (%(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="per-request time limit in seconds (%(default)s)",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature (%(default)s)")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream (SSE); TTFT and inter-token latency need it (default: on)",
    )
    p.add_argument(
        "--expect",
        metavar="FILE",
        help="JSON {prompt: expected completion}; matching prompts must match exactly",
    )
    p.add_argument(
        "--save-outputs",
        metavar="FILE",
        help="write {prompt: completion} of the ok responses (an --expect file)",
    )
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results here")
    p.add_argument("--label", default="", help="free text stored in the results")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="K",
        help="sequential requests before timing, not in the stats (%(default)s)",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, command: str = "") -> LoadConfig:
    names = {f.name for f in dataclasses.fields(LoadConfig)}
    return LoadConfig(**{k: v for k, v in vars(args).items() if k in names}, command=command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_from_args(parse_args(argv), shlex.join(["scripts/load_test.py", *argv]))
    try:
        results = asyncio.run(run_load(cfg))
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(results))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
