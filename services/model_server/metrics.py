"""Prometheus metrics under vLLM's names, labels and buckets, so one set of dashboards serves both servers.

`model_name` is the served base model name, as in vLLM (adapters show up in `vllm:lora_requests_info`).
Gauges that describe the engine right now (running, waiting, KV use, adapters) are read at scrape time
from the engine instead of being kept in step by hand.

KV cache use: the engine's batch holds a [rows x columns] KV cache, padding included; the gauge is those
slots over the most the batch may hold (max_batch_size x max_model_len), in [0, 1] like vLLM's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["EngineGauges", "Metrics"]

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def _token_buckets(max_model_len: int) -> list[float]:
    # vLLM's 1-2-5 series up to the context length.
    out: list[float] = []
    mantissa, exp = [1, 2, 5], 1
    while True:
        for m in mantissa:
            v = m * exp
            if v > max_model_len:
                return out
            out.append(float(v))
        exp *= 10


class EngineGauges:
    """What the collector asks the engine at scrape time."""

    def __init__(
        self,
        running: Callable[[], int],
        waiting: Callable[[], int],
        kv_usage: Callable[[], float],
        adapters: Callable[[], tuple[list[str], list[str]]],
        max_loras: int,
    ) -> None:
        self.running, self.waiting, self.kv_usage, self.adapters = running, waiting, kv_usage, adapters
        self.max_loras = max_loras


class _EngineCollector(Collector):
    def __init__(self, model_name: str, gauges: EngineGauges) -> None:
        self._name = model_name
        self._g = gauges

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self._name], value)
            return g

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", self._g.running()
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", self._g.waiting()
        )
        usage = self._g.kv_usage()
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge(
            "vllm:gpu_cache_usage_perc", "KV-cache usage (older vLLM name). 1 means 100 percent.", usage
        )
        running, waiting = self._g.adapters()
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        info.add_metric(
            [str(self._g.max_loras), ",".join(sorted(waiting)), ",".join(sorted(running))], time.time()
        )
        yield info


class Metrics:
    def __init__(self, model_name: str, max_model_len: int, gauges: EngineGauges) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success", "Count of finished requests.", [*labels, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels,
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels,
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels,
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        tok_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", labels,
            buckets=tok_buckets, registry=r,
        )  # fmt: skip
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", labels,
            buckets=tok_buckets, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(model_name, gauges))

    # Per-request hooks, called by serving as outputs arrive.

    def on_first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.ttft.labels(self.model_name).observe(ttft_s)

    def on_tokens(self, n: int, gap_s: float | None) -> None:
        if n <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(n)
        if gap_s is not None:
            # One engine step yields one token per sequence; n > 1 only for n > 1 choices in one step.
            self.itl.labels(self.model_name).observe(gap_s)

    def on_finished(self, reason: str, prompt_tokens: int, generated: int, e2e_s: float) -> None:
        self.request_success.labels(self.model_name, reason).inc()
        self.request_prompt_tokens.labels(self.model_name).observe(prompt_tokens)
        self.request_generation_tokens.labels(self.model_name).observe(generated)
        self.e2e.labels(self.model_name).observe(e2e_s)
