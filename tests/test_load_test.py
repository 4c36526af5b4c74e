"""`scripts/load_test.py` against a fake OpenAI-compatible server (starlette under uvicorn in a
thread, on a free loopback port): streamed and plain responses on both endpoints are checked and
timed, concurrent clients overlap, `--expect` catches a wrong text, a stream without `[DONE]` is a
check failure, and a 429 is retried after its Retry-After."""

import asyncio
import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
from serving_helpers import Running
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load_test.py"
PROMPTS = [
    {"prompt": "Name three primary colors please."},
    {"turns": ["What is two plus two exactly?", "And times three?"]},
    {"prompt": "Say hello in French and German."},
    {"prompt": "def add(a, b):\n    return a + b\n"},
    {"turns": ["Write a haiku about the sea today."]},
    {"prompt": "List the planets of the solar system."},
]
TOKEN_DELAY_S = 0.002


def _load_script():
    spec = importlib.util.spec_from_file_location("jaxspec_load_test_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


lt = _load_script()


# ---------------------------------------------------------------------------------------------
# the fake server


def fake_tokens(prompt: str, max_tokens: int) -> tuple[list[str], str]:
    """ "echo" and the prompt's first four words, one token a word; cut at max_tokens."""
    words = ["echo", *prompt.split()[:4]]
    tokens = [words[0]] + [" " + w for w in words[1:]]
    return tokens[:max_tokens], "length" if len(tokens) > max_tokens else "stop"


def make_app() -> Starlette:
    state = {"in_flight": 0, "max_in_flight": 0, "seen_429": set()}

    async def complete(request, chat: bool):
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        model = body.get("model", "default")
        if model == "flaky" and prompt not in state["seen_429"]:
            state["seen_429"].add(prompt)  # once per prompt: the retry gets through
            return JSONResponse({"error": "busy"}, status_code=429, headers={"Retry-After": "0"})
        tokens, finish = fake_tokens(prompt, body.get("max_tokens", 16))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base = {"id": "cmpl-1", "created": 0, "model": model}
        if not body.get("stream"):
            if chat:
                msg = {"role": "assistant", "content": "".join(tokens)}
                choice = {"index": 0, "message": msg, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": "".join(tokens), "finish_reason": finish}
            obj = "chat.completion" if chat else "text_completion"
            return JSONResponse({**base, "object": obj, "choices": [choice], "usage": usage})

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(content=None, finish_reason=None, role=None, n_tokens=None):
            if chat:
                delta = {"role": role} if role else {}
                if content is not None:
                    delta["content"] = content
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish_reason}
            if n_tokens is not None:
                choice["token_ids"] = list(range(n_tokens))
            return {**base, "object": obj, "choices": [choice]}

        # model "pairs": two tokens a chunk, each chunk lists its token_ids (like speculative
        # decoding emitting several accepted tokens at once)
        step = 2 if model == "pairs" else 1
        groups = [tokens[i : i + step] for i in range(0, len(tokens), step)]

        async def events():
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:
                if chat:
                    yield f"data: {json.dumps(chunk('', role='assistant'))}\n\n"
                for group in groups:
                    await asyncio.sleep(TOKEN_DELAY_S)
                    n = len(group) if model == "pairs" else None
                    yield f"data: {json.dumps(chunk(''.join(group), n_tokens=n))}\n\n"
                yield f"data: {json.dumps(chunk(finish_reason=finish))}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    last = {**base, "object": obj, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(last)}\n\n"
                if model != "no-done":
                    yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request):
        return await complete(request, chat=False)

    async def chat_completions(request):
        return await complete(request, chat=True)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        return PlainTextResponse("requests_total 0\n")

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", metrics),
        ]
    )
    app.state.fake = state
    return app


@pytest.fixture(scope="module")
def server():
    app = make_app()
    run = Running(app, lifespan="off", timeout=10)
    yield run.url, app.state.fake
    run.close(timeout=5)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def run_cli(tmp_path, url, prompts_file, *extra):
    out = tmp_path / "results.json"
    code = lt.main(["--url", url, "--prompts-file", str(prompts_file), "--json", str(out), *extra])
    return code, json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# tests


def test_streaming_concurrent_mixed_lengths(server, prompts_file, tmp_path, capsys):
    url, state = server
    state["max_in_flight"] = 0
    code, res = run_cli(
        tmp_path, url, prompts_file, "--concurrency", "4", "--requests", "8", "--mixed-lengths",
        "--seed", "3", "--label", "fake", "--warmup", "1",
    )  # fmt: skip
    assert code == 0, res
    assert res["passed"] and res["exit_code"] == 0
    assert (res["requests_sent"], res["requests_ok"], res["requests_failed"]) == (8, 8, 0)
    assert res["warmup_requests"] == 1 and res["warmup_failed"] == 0
    assert res["check_failures"] == {} and res["errors_by_status"] == {}
    # every prompt has >= 4 words: "echo" + 4 words, counted from usage
    assert res["completion_tokens"] == 8 * 5 and res["usage_reported"] == 8
    assert res["completion_tokens_per_s"] == pytest.approx(40 / res["wall_s"])
    assert res["requests_per_s"] == pytest.approx(8 / res["wall_s"])
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = res[key]
        assert s["p50"] is not None and s["p50"] <= s["p90"] <= s["p99"], (key, s)
        assert s["mean"] > 0
    assert res["itl_s"]["n"] == 8 * 4  # 5 content chunks a request: 4 gaps
    assert res["ttft_s"]["p50"] < res["e2e_s"]["p50"]
    assert res["tpot_s"]["p50"] >= TOKEN_DELAY_S * 0.5
    assert res["prompt_chars_min"] < res["prompt_chars_max"]  # the lengths vary
    assert state["max_in_flight"] >= 2  # the clients overlapped
    assert res["label"] == "fake" and res["machine"]["cpu_count"] >= 1
    assert "--mixed-lengths" in res["command"] and res["date"]
    assert res["server"]["health"]["status"] == 200
    assert len(res["per_request"]) == 9 and all(r["ok"] for r in res["per_request"])
    assert "PASS" in capsys.readouterr().out
    # request i's prompt depends only on (i, seed)
    base = lt.load_prompts(prompts_file)
    kw = dict(mixed=True, seed=3, max_chars=4000)
    assert lt.build_prompts(base, 0, 8, **kw)[5:] == lt.build_prompts(base, 5, 3, **kw)
    assert lt.build_prompts(base, 0, 8, **kw) != lt.build_prompts(base, 0, 8, **{**kw, "seed": 4})


@pytest.mark.parametrize(
    "endpoint,stream", [("completions", False), ("chat", False), ("completions", True)]
)
def test_endpoints_and_plain_responses(server, prompts_file, tmp_path, endpoint, stream):
    url, _ = server
    mode = "--stream" if stream else "--no-stream"
    code, res = run_cli(
        tmp_path, url, prompts_file, "--endpoint", endpoint, mode, "--concurrency", "2",
        "--requests", "4", "--max-tokens", "3", "--warmup", "0",
    )  # fmt: skip
    assert code == 0, res
    assert res["requests_ok"] == 4 and res["check_failures"] == {}
    # cut at max_tokens: finish_reason "length" with usage == max_tokens passes the check
    assert {r["finish_reason"] for r in res["per_request"]} == {"length"}
    assert res["completion_tokens"] == 4 * 3
    if not stream:
        assert res["ttft_s"] == res["e2e_s"]  # no streaming: TTFT is the whole latency
        assert res["itl_s"]["n"] == 0 and res["tpot_s"]["n"] == 0


def test_expect_mismatch(server, prompts_file, tmp_path):
    url, _ = server
    saved = tmp_path / "outputs.json"
    args = ["--requests", "4", "--warmup", "0", "--concurrency", "2"]
    code, _ = run_cli(tmp_path, url, prompts_file, *args, "--save-outputs", str(saved))
    assert code == 0
    expect = json.loads(saved.read_text())
    assert len(expect) == 4
    assert expect["Name three primary colors please."] == "echo Name three primary colors"
    code, res = run_cli(tmp_path, url, prompts_file, *args, "--expect", str(saved))
    assert code == 0 and res["expect_checked"] == 4 and res["mismatches"] == 0

    expect["Say hello in French and German."] = "echo something else"
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(expect))
    code, res = run_cli(tmp_path, url, prompts_file, *args, "--expect", str(wrong))
    assert code == 1 and not res["passed"]
    assert (res["expect_checked"], res["expect_matched"], res["mismatches"]) == (4, 3, 1)
    (m,) = res["mismatch_details"]
    assert m["got"] == "echo Say hello in French" and m["expected"] == "echo something else"
    assert m["first_diff"] == 5
    assert res["requests_ok"] == 4  # the responses themselves were well-formed


def test_stream_without_done_is_a_check_failure(server, prompts_file):
    url, _ = server
    cfg = lt.LoadConfig(
        prompts_file=str(prompts_file), url=url, model="no-done", requests=3, concurrency=3,
        warmup=0,
    )  # fmt: skip
    res = asyncio.run(lt.run_load(cfg))
    assert res["exit_code"] == 1 and not res["passed"]
    assert res["requests_ok"] == 0 and res["requests_failed"] == 3
    assert res["check_failures"]["stream_no_done"]["count"] == 3
    assert "[DONE]" in res["check_failures"]["stream_no_done"]["example"]
    assert "FAIL" in lt.format_report(res)


def test_429_is_retried_after_retry_after(server, prompts_file, tmp_path):
    url, _ = server
    code, res = run_cli(
        tmp_path, url, prompts_file, "--model", "flaky", "--requests", "3", "--warmup", "1"
    )
    assert code == 0, res
    assert res["rate_limited"] == 4 and res["requests_ok"] == 3
    assert res["errors_by_status"] == {}


def test_chunks_with_several_tokens(server, prompts_file, tmp_path):
    url, _ = server
    code, res = run_cli(
        tmp_path, url, prompts_file, "--model", "pairs", "--requests", "2", "--warmup", "0"
    )
    assert code == 0, res
    assert res["completion_tokens"] == 2 * 5
    assert [r["n_chunks"] for r in res["per_request"]] == [3, 3]  # 2 + 2 + 1 tokens
    assert res["itl_s"]["n"] == 2 * 3  # the gaps before the 2nd and 3rd chunks: 2 + 1 tokens
    assert res["tpot_s"]["n"] == 2


def test_unreachable_server_and_bad_prompts(tmp_path, prompts_file, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    assert lt.main(["--url", f"http://127.0.0.1:{port}", "--prompts-file", str(prompts_file)]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    assert lt.main(["--prompts-file", str(bad)]) == 2
    assert "needs a non-empty `prompt` or `turns`" in capsys.readouterr().err
