"""Serving benchmark: `jaxspec serve` under load, autoregressive vs speculative, one run.

    python scripts/bench_serve.py [--methods ar,sssd] [--concurrency 1,8,32]
        [--prompts-file F ...] [--requests-per-client 2] [--max-tokens 64] [--max-batch 32]
        [--max-context 1024] [--out-md BENCHMARKS.md] [--json OUT]

For each method a server is started as a subprocess (`jaxspec serve --method M`, warm-up on:
every prefill and step shape is compiled and timed before the port opens, so no request pays a
compile) and `scripts/load_test.py` drives it at each concurrency c with c closed-loop clients
and c × requests-per-client requests (at least --min-requests), greedy, streamed, mixed prompt
lengths. The first method's completions are saved and every later method's must equal them
(speculation is lossless: a mismatch fails the run). Numbers per (prompts, method, c):
completion tokens/s (aggregate), TTFT and per-token latency percentiles, acceptance from the
server's /metrics (its counters before and after the run), and the throughput ratio over the
first method at the same c. Compile/warm-up time is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("JAXSPEC_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_PROMPTS = [DATA / "spec_bench" / "question.jsonl", DATA / "humaneval" / "HumanEval.jsonl"]


def _load_test():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_server(method: str, args, log: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxspec.cli", "serve", "--method", method, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
           "--log-level", "warning", *args.serve_arg]  # fmt: skip
    out = open(log, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.time()
    import httpx

    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server ({method}) exited: see {log}\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.time() - t0 > 1800:
            proc.kill()
            raise SystemExit(f"server ({method}) did not start in 30 min: see {log}")
        time.sleep(0.5)
    return proc, port, time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="ar,sssd", help="first = baseline (default ar,sssd)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompts-file", action="append", type=Path,
                   help="JSONL prompts (repeat; default Spec-Bench and HumanEval)")  # fmt: skip
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `jaxspec serve` argument (repeat), e.g. --serve-arg=--no-gate",
    )
    p.add_argument("--out-md", type=Path, help="replace the serving section of this file")
    p.add_argument("--json", type=Path, help="write every result as JSON")
    args = p.parse_args(argv)
    lt = _load_test()
    methods = args.methods.split(",")
    concs = [int(c) for c in args.concurrency.split(",")]
    files = args.prompts_file or DEFAULT_PROMPTS
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    rows, starts = [], {}
    for method in methods:
        proc, port, start_s = start_server(method, args, work / f"{method}.log")
        starts[method] = start_s
        url = f"http://127.0.0.1:{port}"
        try:
            for f in files:
                for c in concs:
                    expect = work / f"{f.stem}_c{c}.json"
                    n_requests = max(args.min_requests, c * args.requests_per_client)
                    cfg = lt.LoadConfig(
                        prompts_file=str(f), url=url, endpoint="chat", mixed_lengths=True,
                        concurrency=c, requests=n_requests,
                        max_prompt_chars=args.max_prompt_chars,
                        duration=1200, max_tokens=args.max_tokens, warmup=1,
                        save_outputs=str(expect) if method == methods[0] else None,
                        expect=str(expect) if method != methods[0] else None,
                        label=f"{method} {f.stem} c={c}",
                    )  # fmt: skip
                    import httpx

                    before = httpx.get(url + "/metrics").text
                    res = asyncio.run(lt.run_load(cfg))
                    after = httpx.get(url + "/metrics").text

                    def delta(name, before=before, after=after):
                        return _metric(after, name) - _metric(before, name)

                    steps_tok = delta("jaxspec_completion_tokens_total")
                    drafted = delta("jaxspec_drafted_tokens_total")
                    accepted = delta("jaxspec_accepted_tokens_total")
                    row = {"method": method, "prompts": f.stem, "concurrency": c,
                           "requests_ok": res["requests_ok"], "failed": res["requests_failed"],
                           "passed": res["passed"], "mismatches": res["mismatches"],
                           "expect_checked": res["expect_checked"],
                           "tok_s": res["completion_tokens_per_s"], "ttft": res["ttft_s"],
                           "tpot": res["tpot_s"], "e2e": res["e2e_s"],
                           "completion_tokens": res["completion_tokens"],
                           "drafted": drafted, "accepted": accepted,
                           "acceptance": accepted / drafted if drafted else None,
                           "served_tokens": steps_tok}  # fmt: skip
                    rows.append(row)
                    print(lt.format_report(res), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    base = {(r["prompts"], r["concurrency"]): r["tok_s"] for r in rows if r["method"] == methods[0]}
    for r in rows:
        r["speedup"] = r["tok_s"] / base[(r["prompts"], r["concurrency"])]
    md = render(rows, starts, args, argv)
    print(md)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "start_s": starts}, indent=1))
    if args.out_md:
        replace_section(args.out_md, md)
    ok = all(r["passed"] and not r["mismatches"] and not r["failed"] for r in rows)
    return 0 if ok else 1


def _ms(stats, key="p50") -> str:
    v = stats.get(key) if stats else None
    return "-" if v is None else f"{1000 * v:.0f}"


def render(rows, starts, args, argv) -> str:
    import jax

    cmd = "python scripts/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = [
        "<!-- bench_serve:start -->",
        "## Serving under load (`jaxspec serve`, `scripts/bench_serve.py`)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; JAX {jax.__version__} "
        f"({jax.default_backend()}); {datetime.date.today()}. Command: `{cmd.strip()}`.",
        f"Server: SmolLM2-135M-Instruct float32, --max-batch {args.max_batch}, --max-context "
        f"{args.max_context}, chat endpoint, greedy, streamed, {args.max_tokens} max tokens, "
        f"mixed prompt lengths (each prompt joined with 0-3 more, cut at {args.max_prompt_chars} "
        "characters). Closed-loop clients; "
        "throughput = completion tokens / wall time, aggregate. Every response checked; "
        "speculative completions compared with the AR server's (identical = greedy lossless).",
        "Warm-up before the port opens (compile + step timing, not in any number below): "
        + ", ".join(f"{m} {s:.0f} s" for m, s in starts.items())
        + ".",
        "",
        "| prompts | method | clients | ok | tok/s | × AR | TTFT p50 / p90 ms | TPOT p50 / p90 ms "
        "| e2e p50 ms | acceptance (drafted) | identical to AR |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f} ({r['drafted']:.0f})"
        same = "baseline" if r["expect_checked"] == 0 and r["method"] == rows[0]["method"] else (
            f"{r['expect_checked'] - r['mismatches']}/{r['expect_checked']}")  # fmt: skip
        out.append(
            f"| {r['prompts']} | {r['method']} | {r['concurrency']} | {r['requests_ok']}"
            f"{'' if not r['failed'] else ' (' + str(r['failed']) + ' failed)'} "
            f"| {r['tok_s']:.1f} | {r['speedup']:.2f}× "
            f"| {_ms(r['ttft'])} / {_ms(r['ttft'], 'p90')} | {_ms(r['tpot'])} / "
            f"{_ms(r['tpot'], 'p90')} | {_ms(r['e2e'])} | {acc} | {same} |"
        )
    out.append("<!-- bench_serve:end -->")
    return "\n".join(out)


def replace_section(path: Path, md: str) -> None:
    text = path.read_text() if path.exists() else ""
    start, end = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + md + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + md + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
