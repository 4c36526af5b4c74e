"""The OpenAI-compatible server on loopback.

Invariants: completions and chat completions, streamed or not, return exactly the tokens (and
the text) `jaxspec generate` returns greedily for the same prompt; concurrent requests all
complete with their own tokens; every bad request gets its 4xx status and an OpenAI error body
naming the field; a full queue answers 429 with Retry-After; a client that disconnects
mid-stream frees its slot; SIGTERM finishes in-flight requests, then the process exits 0;
/metrics parses as Prometheus text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serving_helpers import Running, free_port  # noqa: E402

from jaxspec.drafting import NgramConfig  # noqa: E402
from jaxspec.runner import GenerateOptions, Runner  # noqa: E402
from jaxspec.serving import Engine, EngineConfig  # noqa: E402
from jaxspec.serving.server import Server, TextStream  # noqa: E402
from jaxspec.speculative import SpecConfig  # noqa: E402
from jaxspec.testing import tiny_model  # noqa: E402
from jaxspec.trees import chain  # noqa: E402

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "List three colors of the rainbow.",
    "def fibonacci(n):",
]
MAX = 40


@pytest.fixture(scope="module")
def real(smollm2):
    """SmolLM2 behind the server: SSSD (6 draft tokens) at batch buckets 1-2, AR at 4."""
    cfg = smollm2.cfg

    def spec_for(b):
        ngram = NgramConfig(num_nodes=6, branch_length=4)
        return SpecConfig(cfg, cfg, chain(0), "point_mass", ngram=ngram) if b <= 2 else None

    engine = Engine(smollm2.params, cfg, EngineConfig(max_batch=4, max_context=512),
                    spec_for=spec_for)  # fmt: skip
    run = Running(Server(engine, smollm2.tokenizer, smollm2.name).app)
    yield smollm2, engine, run
    run.close()


def generate_ref(model, prompts: list[str], chat: bool):
    """What `jaxspec generate` returns (greedy): token ids and text per prompt."""
    ids = [model.tokenizer.encode(p, chat=chat) for p in prompts]
    outs, _ = Runner(model.params, model.cfg).run(ids, GenerateOptions(max_new_tokens=MAX))
    return ids, outs, [model.tokenizer.decode(o) for o in outs]


def _post(url, path, body, stream=False):
    if not stream:
        return httpx.post(url + path, json=body, timeout=300)
    chunks = []
    with httpx.stream("POST", url + path, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def _finish(ref_tokens, eos) -> str:
    return "stop" if ref_tokens[-1] in eos else "length"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_outputs_equal_generate(real, chat):
    model, engine, run = real
    ids, outs, texts = generate_ref(model, PROMPTS[:2], chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    for p, pid, ref, text in zip(PROMPTS[:2], ids, outs, texts, strict=True):
        base = {"model": model.name, "max_tokens": MAX, "temperature": 0,
                "return_token_ids": True}  # fmt: skip
        base |= {"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p}
        r = _post(run.url, path, base)
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert choice["token_ids"] == ref
        assert (choice["message"]["content"] if chat else choice["text"]) == text
        assert choice["finish_reason"] == _finish(ref, model.cfg.eos_token_ids)
        assert body["usage"] == {"prompt_tokens": len(pid), "completion_tokens": len(ref),
                                 "total_tokens": len(pid) + len(ref)}  # fmt: skip
        chunks = _post(run.url, path, base | {"stream": True,
                                              "stream_options": {"include_usage": True}},
                       stream=True)  # fmt: skip
        obj = "chat.completion.chunk" if chat else "text_completion"
        assert all(c["object"] == obj for c in chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref)
        choices = [c["choices"][0] for c in chunks[:-1]]
        if chat:
            assert choices[0]["delta"] == {"role": "assistant", "content": ""}
            got = "".join(c["delta"].get("content", "") for c in choices)
        else:
            got = "".join(c["text"] for c in choices)
        assert got == text
        assert sum((c.get("token_ids") or [] for c in choices), []) == ref
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [
            _finish(ref, model.cfg.eos_token_ids)
        ]


def test_concurrent_requests_and_metrics(real):
    model, engine, run = real
    prompts = PROMPTS * 2
    _, outs, texts = generate_ref(model, prompts, chat=False)
    bodies = [{"prompt": p, "max_tokens": MAX, "temperature": 0, "return_token_ids": True,
               "stream": i % 2 == 1} for i, p in enumerate(prompts)]  # fmt: skip

    def one(body):
        if body["stream"]:
            chunks = _post(run.url, "/v1/completions", body, stream=True)
            return sum((c["choices"][0]["token_ids"] for c in chunks), [])
        return _post(run.url, "/v1/completions", body).json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(one, bodies))
    assert got == outs
    parser = pytest.importorskip("prometheus_client.parser")
    text = httpx.get(run.url + "/metrics").text
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert fams["jaxspec_time_to_first_token_seconds"].type == "histogram"
    assert fams["jaxspec_time_per_output_token_seconds"].type == "histogram"
    for name in ("jaxspec_tau", "jaxspec_acceptance_rate", "jaxspec_tokens_per_second",
                 "jaxspec_queue_length", "jaxspec_active_slots"):  # fmt: skip
        assert fams[name].type == "gauge"
    value = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels}
    assert value["jaxspec_completion_tokens_total"] >= sum(map(len, outs))
    assert value["jaxspec_tau"] >= 1.0 and value["jaxspec_active_slots"] == 0
    ttft_count = value["jaxspec_time_to_first_token_seconds_count"]
    assert ttft_count >= len(prompts)
    health = httpx.get(run.url + "/health").json()
    assert health["status"] == "ok" and health["active_slots"] == 0


def test_stop_string(real):
    model, engine, run = real
    _, outs, texts = generate_ref(model, PROMPTS[:1], chat=True)
    text = texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": MAX,
            "temperature": 0, "stop": [stop, "never-generated-zzz"]}  # fmt: skip
    r = _post(run.url, "/v1/chat/completions", body).json()
    assert r["choices"][0]["message"]["content"] == cut
    assert r["choices"][0]["finish_reason"] == "stop"
    chunks = _post(run.url, "/v1/chat/completions", body | {"stream": True}, stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cut
    deadline = time.time() + 30
    while engine.active:  # the stop string cancelled the request: its slot is freed
        assert time.time() < deadline
        time.sleep(0.02)
    assert engine.metrics.requests["cancelled"] == 0  # counted as finished by "stop"


BAD = [  # (path, raw body, status, param or code in the error)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (
        "/v1/completions",
        {"prompt": "word " * 600, "max_tokens": 4},
        400,
        "context_length_exceeded",
    ),  # fmt: skip
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
    ),  # fmt: skip
]


@pytest.mark.parametrize("path,body,status,where", BAD)
def test_bad_requests(real, path, body, status, where):
    _, engine, run = real
    before = engine.metrics.prompt_tokens
    if isinstance(body, bytes):
        r = httpx.post(run.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(run.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if where is not None:
        assert where in (err["param"], err["code"]), err
    assert engine.metrics.prompt_tokens == before and engine.queue_length == 0  # not admitted


# ---- a tiny model without a tokenizer (token-id prompts) ------------------------------------


def _tiny_server(config: EngineConfig, delay: float = 0.0, gate: threading.Event | None = None):
    cfg, params = tiny_model()
    engine = Engine(params, cfg, config)
    step = engine._iteration

    def slow_iteration():  # a slower or paused device, so timing-dependent states are reachable
        if gate is not None:
            gate.wait(60)
        time.sleep(delay)
        step()

    engine._iteration = slow_iteration
    return engine, Running(Server(engine, None, "tiny").app)


def test_queue_full_gives_429():
    gate = threading.Event()
    engine, run = _tiny_server(EngineConfig(max_batch=1, max_context=64, max_queue=1), gate=gate)
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "return_token_ids": True}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, run.url, "/v1/completions", body)
            deadline = time.time() + 30
            while engine.queue_length == 0:  # the engine is paused: the request stays queued
                assert time.time() < deadline
                time.sleep(0.01)
            r = httpx.post(run.url + "/v1/completions", json=body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            gate.set()
            assert first.result(60).status_code == 200
        assert engine.metrics.rejected["429"] == 1
    finally:
        gate.set()
        run.close()


def test_client_disconnect_frees_slot():
    engine, run = _tiny_server(EngineConfig(max_batch=2, max_context=512), delay=0.01)
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", run.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["token_ids"]:
                    break  # the first token arrived: go away mid-stream
        deadline = time.time() + 20
        while engine.active or engine.metrics.requests["cancelled"] == 0:
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.02)
        assert engine.metrics.completion_tokens < 400
    finally:
        run.close()


def test_sigterm_finishes_in_flight_then_exits(tmp_path):
    from jaxspec.convert.checkpoint import save_params

    cfg, params = tiny_model()
    cfg = dataclasses.replace(cfg, eos_token_ids=())  # no EOS: the request runs to max_tokens
    save_params(tmp_path / "tiny", cfg, params)
    port = free_port()
    cmd = [sys.executable, "-m", "jaxspec.cli", "serve", "--model", str(tmp_path / "tiny"),
           "--method", "ar", "--no-warmup", "--max-batch", "2", "--max-context", "512",
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "stream": True, "return_token_ids": True,
                "temperature": 0}  # fmt: skip
        ids, finish, done, sent = [], None, False, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                choice = json.loads(line[6:])["choices"][0]
                ids += choice.get("token_ids") or []
                finish = choice["finish_reason"] or finish
                if ids and not sent:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    sent = True
        assert sent and done and finish == "length" and len(ids) == 400
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_text_stream_holds_back_partial_stops():
    class Chars:  # one character per token id
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    ts = TextStream(Chars(), ["END"])
    out = [ts.push([ord(c)]) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" may start "END": held back
    assert ts.push([ord("D")]) == "" and ts.stopped
    ts = TextStream(Chars(), ["END"])
    got = "".join(ts.push([ord(c)]) for c in "abENx") + ts.push([], final=True)
    assert got == "abENx" and not ts.stopped


def test_serve_cli_errors(tmp_path, capsys):
    from jaxspec.cli import main
    from jaxspec.convert.checkpoint import save_params

    cfg, params = tiny_model()
    save_params(tmp_path / "tiny", cfg, params)
    base = ["serve", "--model", str(tmp_path / "tiny"), "--no-warmup", "--method", "ar"]
    assert main(base + ["--max-context", "100000"]) == 2
    assert "max_context 100000 exceeds the model's context of 512" in capsys.readouterr().err
    assert main(base + ["--expected-tau", "0"]) == 2
    assert "--expected-tau must be > 0" in capsys.readouterr().err
    assert main(base + ["--max-batch", "0"]) == 2
    assert "max_batch must be >= 1" in capsys.readouterr().err
