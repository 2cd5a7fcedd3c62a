"""Prometheus metrics of a server: engine state (read on the engine thread at scrape time) + latency histograms.

Every server has its own `CollectorRegistry`, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Turns the latest `LLMEngine.metrics()` dict into gauges and counters."""

    def __init__(self, server_metrics: "ServerMetrics"):
        self.m = server_metrics

    def collect(self):
        s = self.m.snapshot
        if not s:
            return
        w = GaugeMetricFamily("jaxserve_requests_waiting", "Sequences waiting for admission", labels=["priority"])
        w.add_metric(["interactive"], s.get("num_waiting_interactive", 0))
        w.add_metric(["batch"], s.get("num_waiting_batch", 0))
        yield w
        gauges = [
            ("jaxserve_requests_running", "Sequences holding KV pages (prefill or decode)", "num_running"),
            ("jaxserve_kv_pages_used", "KV cache pages referenced by running sequences", "kv_pages_used"),
            ("jaxserve_kv_pages_total", "Usable KV cache pages", "kv_pages_total"),
            ("jaxserve_kv_cache_usage_ratio", "Fraction of KV pages in use (0..1)", "kv_usage"),
            ("jaxserve_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up",
             "prefix_hit_rate"),
            ("jaxserve_generation_tokens_per_second", "Generated tokens per second of engine busy time",
             "generation_tokens_per_s"),
        ]
        for name, doc, key in gauges:
            yield GaugeMetricFamily(name, doc, value=float(s.get(key) or 0.0))
        if s.get("pipeline_stage_busy") is not None:  # a pipeline over stages
            yield GaugeMetricFamily("jaxserve_pipeline_stage_busy_ratio", "Pipeline stage-ticks with work / all "
                                    "stage-ticks (rotating decode groups keep it near 1)", value=s["pipeline_stage_busy"])
            yield CounterMetricFamily("jaxserve_pipeline_rotation_calls", "Decode pipeline calls with the stages on "
                                      "different groups", value=float(s.get("pipeline_rotation_calls") or 0))
        if "spec_method" in s:  # speculative decoding is on (docs/speculative.md)
            for name, doc, key in [
                ("jaxserve_spec_acceptance_rate", "Accepted draft tokens / drafted tokens", "spec_acceptance_rate"),
                ("jaxserve_spec_mean_accepted_length", "Accepted draft tokens per verified row-step",
                 "spec_mean_accepted_length"),
            ]:
                yield GaugeMetricFamily(name, doc, value=float(s.get(key) or 0.0))
            for name, doc, key in [
                ("jaxserve_spec_draft_tokens", "Draft tokens proposed", "spec_draft_tokens"),
                ("jaxserve_spec_accepted_tokens", "Draft tokens accepted", "spec_accepted_tokens"),
            ]:
                yield CounterMetricFamily(name, doc, value=float(s.get(key) or 0.0))
        counters = [
            ("jaxserve_generation_tokens", "Tokens generated", "generation_tokens"),
            ("jaxserve_prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)", "prompt_tokens_computed"),
            ("jaxserve_engine_steps", "Engine steps run", "steps"),
            ("jaxserve_mixed_steps", "Ragged steps that computed prompt chunks and decode tokens together",
             "mixed_steps"),
            ("jaxserve_preemptions", "Sequences preempted (pages freed, recomputed later)", "num_preemptions"),
            ("jaxserve_requests_finished", "Requests finished (stop or length)", "requests_finished"),
            ("jaxserve_requests_aborted", "Requests aborted (client gone, shutdown)", "requests_aborted"),
            ("jaxserve_step_host_seconds", "Engine step time outside the device wait (scheduling, inputs, "
             "bookkeeping, detokenization)", "step_host_seconds"),
            ("jaxserve_step_device_seconds", "Engine step time from the program's dispatch to its sampled ids on "
             "the host", "step_device_seconds"),
        ]
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=float(s.get(key) or 0.0))


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.snapshot: dict = {}
        self.registry.register(_EngineCollector(self))
        r = self.registry
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds", "Mean gap between later tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS,
                             registry=r)
        self.finished = Counter("jaxserve_request_success", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.http_requests = Counter("jaxserve_http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("jaxserve_http_requests_in_flight", "Generation requests being served", registry=r)
        self.client_disconnects = Counter("jaxserve_client_disconnects", "Requests aborted because the client left",
                                          registry=r)

    def observe_finished(self, ro) -> None:
        """Engine-thread callback for every finished RequestOutput (prometheus_client is thread-safe)."""
        m = ro.metrics
        if m is not None:
            if m.ttft is not None:
                self.ttft.observe(m.ttft)
            if m.tpot is not None:
                self.tpot.observe(m.tpot)
            if m.e2e is not None:
                self.e2e.observe(m.e2e)
        for c in ro.outputs:
            self.finished.labels(c.finish_reason or "unknown").inc()
