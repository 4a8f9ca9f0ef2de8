"""Prometheus metrics of the server, on a registry of its own (several apps can live in one process).

Names follow vLLM where vLLM has the same quantity, so its dashboards work: ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:request_success_total{finished_reason}``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, ``vllm:e2e_request_latency_seconds``, ``vllm:time_to_first_token_seconds``
and the speculative counters ``vllm:spec_decode_num_drafts_total``, ``..._num_draft_tokens_total``,
``..._num_accepted_tokens_total`` and ``..._num_accepted_tokens_per_pos_total{position}`` (0-based). HTTP
traffic is ``dspark:http_requests_total{method,route,status}`` and ``dspark:http_request_duration_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dspark.runtime.generate import Generator, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, generator: Generator, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model = model_name
        self.speculative = generator.draft_length > 0
        m = {"model_name": model_name}
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", ["model_name"], registry=r).labels(**m)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a free row.", ["model_name"], registry=r).labels(**m)
        self.running.set_function(lambda: len(generator.running))
        self.waiting.set_function(lambda: len(generator.waiting))
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        for reason in ("stop", "length", "cancelled"):
            self.success.labels(model_name=model_name, finished_reason=reason)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", ["model_name"], registry=r).labels(**m)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.",
                                         ["model_name"], registry=r).labels(**m)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Submit-to-finish latency of a request.", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r).labels(**m)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Submit-to-first-token latency (queueing included).",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r).labels(**m)
        self.num_drafts = Counter("vllm:spec_decode_num_drafts", "Speculative rounds.", ["model_name"], registry=r).labels(**m)
        self.num_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens the target verified.",
                                        ["model_name"], registry=r).labels(**m)
        self.num_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                    ["model_name"], registry=r).labels(**m)
        self.per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted by position (0-based).",
                               ["model_name", "position"], registry=r)
        for k in range(generator.draft_length):
            self.per_pos.labels(model_name=model_name, position=str(k))
        self.http_requests = Counter("dspark:http_requests", "HTTP requests by route and status code.",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("dspark:http_request_duration_seconds", "HTTP request duration (whole stream).",
                                       ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)

    def request_finished(self, seq: Sequence) -> None:
        """Called from the engine thread when a request's row is freed."""
        stats = seq.stats()
        self.success.labels(model_name=self.model, finished_reason=seq.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(seq.request.prompt_ids))
        self.generation_tokens.inc(len(seq.generated))
        self.e2e.observe(stats["elapsed_s"])
        if stats["time_to_first_token_ms"] is not None:
            self.ttft.observe(stats["time_to_first_token_ms"] / 1000)
        if not self.speculative:
            return
        spec = stats["spec_decode"]
        self.num_drafts.inc(spec["num_drafts"])
        self.num_draft_tokens.inc(spec["num_draft_tokens"])
        self.num_accepted.inc(spec["num_accepted_tokens"])
        for k, n in enumerate(spec["num_accepted_tokens_per_pos"]):
            self.per_pos.labels(model_name=self.model, position=str(k)).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
