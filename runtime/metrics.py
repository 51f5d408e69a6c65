"""Serving counters and latency histograms, written out in Prometheus' text format."""
from __future__ import annotations

import bisect
import copy
import threading

# Seconds: from a millisecond (tiny models on CPU) to a minute (a long prompt queued behind others).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class ServingMetrics:
    """Updated by the scheduler thread, read by the server: a lock keeps a scrape consistent."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queue_depth = 0
        self.running_rows = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.prompt_tokens_reused = 0
        self.requests_finished = 0
        self.requests_rejected = 0
        self.steps = 0
        self.ttft = Histogram()
        self.inter_token = Histogram()

    def __getstate__(self) -> dict:  # a snapshot crosses to a server's front-end process without its lock
        with self.lock:
            return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def render(self, prefix: str = "gptoss") -> str:
        with self.lock:
            lines = []
            for name, kind, help_, value in (
                    ("queue_depth", "gauge", "requests waiting for a cache row", self.queue_depth),
                    ("running_rows", "gauge", "cache rows holding a request (prefilling or decoding)",
                     self.running_rows),
                    ("generated_tokens_total", "counter", "tokens generated", self.tokens_generated),
                    ("prompt_tokens_total", "counter", "prompt tokens of requests that got a first token",
                     self.prompt_tokens),
                    ("prompt_tokens_reused_total", "counter",
                     "prompt tokens not prefilled: their K/V were in a cache row already", self.prompt_tokens_reused),
                    ("requests_finished_total", "counter", "requests that ended (any reason)",
                     self.requests_finished),
                    ("requests_rejected_total", "counter", "requests refused with 429 (queue full)",
                     self.requests_rejected),
                    ("scheduler_steps_total", "counter", "scheduler steps that ran the model", self.steps)):
                lines += [f"# HELP {prefix}_{name} {help_}", f"# TYPE {prefix}_{name} {kind}",
                          f"{prefix}_{name} {value}"]
            for name, help_, hist in (("time_to_first_token_seconds", "from arrival to the first token", self.ttft),
                                      ("inter_token_seconds", "between consecutive tokens of a request",
                                       self.inter_token)):
                lines += [f"# HELP {prefix}_{name} {help_}", f"# TYPE {prefix}_{name} histogram"]
                lines += hist.lines(f"{prefix}_{name}")
            return "\n".join(lines) + "\n"
