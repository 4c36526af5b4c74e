"""Serving metrics, rendered in the Prometheus text exposition format (version 0.0.4).

All times are seconds. Counters only grow; gauges are the value now; histograms are cumulative
buckets (`le`) with `_sum` and `_count`. Speculation metrics follow jaxspec's definitions:
tau = tokens emitted by decode steps per live row-step (bonus included; the first token of each
request comes from its prefill and is not counted), acceptance rate = accepted drafted tokens /
drafted tokens. Tokens/s is over a sliding window of the last `window_s` seconds of delivered
completion tokens.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def lines(self) -> list[str]:
        """Sample lines after the metric's name: `_bucket{le=...}`, `_sum`, `_count`."""
        out, acc = [], 0
        for le, c in zip([*map(_num, self.buckets), "+Inf"], self.counts, strict=True):
            acc += c
            out.append(f'_bucket{{le="{le}"}} {acc}')
        return out + [f"_sum {_num(self.sum)}", f"_count {self.count}"]


def _num(x: float) -> str:
    return repr(float(x))


class EngineMetrics:
    """Counters, gauges and histograms of one engine (written by its thread, read by the
    server's; `render` takes the lock)."""

    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.window_s = window_s
        self.max_slots = 0
        self.queue_length = 0
        self.active_slots = 0
        self.last_bucket = 0
        self.last_speculated = 0
        self.tau_estimate = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.row_steps = 0
        self.step_tokens = 0
        self.drafted = 0
        self.accepted = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.compile_s = 0.0
        self.resize_s = 0.0  # copying the state to a new batch bucket's size
        self.resizes = 0
        self.requests: collections.Counter[str] = collections.Counter()  # by finish reason
        self.rejected: collections.Counter[str] = collections.Counter()  # by HTTP status
        self.ttft = Histogram()
        self.token_latency = Histogram()
        self.e2e = Histogram()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def record_row_step(self, speculated: int, emitted: int) -> None:
        self.row_steps += 1
        self.step_tokens += emitted
        self.drafted += speculated
        self.accepted += min(emitted - 1, speculated)

    def delivered(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.completion_tokens += n
            self._recent.append((now, n))

    def observe(self, hist: Histogram, value: float, n: int = 1) -> None:
        with self.lock:
            hist.observe(value, n)

    def finished(self, reason: str, latency: float) -> None:
        with self.lock:
            self.requests[reason.split(":")[0]] += 1
            self.e2e.observe(latency)

    @property
    def tau(self) -> float:
        return self.step_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            n = sum(k for _, k in self._recent)
        return n / self.window_s

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        tps = self.tokens_per_s()
        with self.lock:
            out: list[str] = []

            def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
                """`samples`: sample lines without the `jaxspec_<name>` prefix."""
                out.append(f"# HELP jaxspec_{name} {help_}")
                out.append(f"# TYPE jaxspec_{name} {kind}")
                out.extend(f"jaxspec_{name}{line}" for line in samples)

            for name, help_, v in [
                ("queue_length", "requests waiting for a slot", self.queue_length),
                ("active_slots", "slots decoding a request", self.active_slots),
                ("max_slots", "slots of the decode state", self.max_slots),
                ("batch_bucket", "batch bucket of the last step", self.last_bucket),
                (
                    "speculated_tokens",
                    "drafted tokens per row in the last step",
                    self.last_speculated,
                ),  # fmt: skip
                ("tau", "decode tokens per live row-step (bonus included)", self.tau),
                (
                    "tau_estimate",
                    "the cost model's tau estimate of the last speculating bucket",
                    self.tau_estimate,
                ),  # fmt: skip
                ("acceptance_rate", "accepted / drafted tokens", self.acceptance_rate),
                (
                    "tokens_per_second",
                    f"completion tokens/s over the last {self.window_s:g} s",
                    tps,
                ),  # fmt: skip
            ]:
                family(name, "gauge", help_, [f" {_num(v)}"])
            for name, help_, v in [
                ("prompt_tokens_total", "prompt tokens prefilled", self.prompt_tokens),
                (
                    "completion_tokens_total",
                    "completion tokens delivered",
                    self.completion_tokens,
                ),  # fmt: skip
                ("steps_total", "decode steps", self.steps),
                ("drafted_tokens_total", "drafted tokens (live rows)", self.drafted),
                ("accepted_tokens_total", "accepted drafted tokens", self.accepted),
                ("prefill_seconds_total", "time in prefills (compiles excluded)", self.prefill_s),
                (
                    "decode_seconds_total",
                    "time in decode steps (compiles excluded)",
                    self.decode_s,
                ),  # fmt: skip
                (
                    "compile_seconds_total",
                    "time compiling (first call of each shape)",
                    self.compile_s,
                ),  # fmt: skip
            ]:
                family(name, "counter", help_, [f" {_num(v)}"])
            reasons = sorted({"stop", "length", "cancelled", *self.requests})
            family("requests_total", "counter", "finished requests by finish reason",
                   [f'{{reason="{r}"}} {self.requests[r]}' for r in reasons])  # fmt: skip
            statuses = sorted({"400", "429", *self.rejected})
            family("rejected_requests_total", "counter", "rejected requests by HTTP status",
                   [f'{{status="{s}"}} {self.rejected[s]}' for s in statuses])  # fmt: skip
            for name, help_, h in [
                ("time_to_first_token_seconds", "submit → first token", self.ttft),
                (
                    "time_per_output_token_seconds",
                    "seconds per token after the first",
                    self.token_latency,
                ),  # fmt: skip
                ("request_latency_seconds", "submit → finished", self.e2e),
            ]:
                family(name, "histogram", help_, h.lines())
            return "\n".join(out) + "\n"
