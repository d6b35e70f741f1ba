"""Write llmtap's Grafana dashboards (JSON) from one description, so they cannot drift.

    python dashboards/generate.py          # rewrite the committed JSON
    python dashboards/generate.py --check  # exit 1 if the committed JSON is stale

Conventions every panel follows (tests/test_dashboards.py checks them): the `datasource`
variable on every panel and target, chained job → instance → model variables, `$__rate_interval`
in every rate, quantiles as histogram_quantile over `sum by (le)`, denominators guarded
against zero, a unit and a description on every panel, modern panel types only, fixed uid,
`id: null`, schemaVersion 39, exemplars on latency panels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
MSEL = SEL + ', gen_ai_request_model=~"$model"'


def rate(metric: str, selector: str = MSEL) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def quantile(q: float, histogram: str, by: str = "", selector: str = MSEL) -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', selector)}))"


def tokens_rate(kind: str, by: str = "gen_ai_request_model") -> str:
    """Tokens per second of one kind (input, output, reasoning), under either version of the
    GenAI conventions llmtap can export (OTEL_SEMCONV_STABILITY_OPT_IN): v1.41's histogram
    sum (llmtap's counter for reasoning), or semantic-conventions-genai's usage counter."""
    if kind == "reasoning":
        v141 = rate("llmtap_reasoning_output_tokens_total")
    else:
        v141 = rate("gen_ai_client_token_usage_sum", MSEL + f', gen_ai_token_type="{kind}"')
    latest = rate(f"gen_ai_client_inference_usage_{kind}_tokens_total".replace(
        "reasoning_tokens", "reasoning_output_tokens"))
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({v141}) or sum{grouping} ({latest})"


def mean(histogram: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return (f"sum{grouping} ({rate(histogram + '_sum')}) / "
            f"clamp_min(sum{grouping} ({rate(histogram + '_count')}), 1e-9)")


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width: int, height: int) -> dict[str, int]:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        position = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return position

    def row(self, title: str) -> dict[str, Any]:
        if self.x:
            self.x, self.y = 0, self.y + self.row_height
        panel = {"type": "row", "title": title, "collapsed": False, "id": self.ids(),
                 "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []}
        self.y += 1
        self.row_height = 0
        return panel

    def ids(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "", ref: str = "A", exemplar: bool = False,
           instant: bool = False, fmt: str = "time_series") -> dict[str, Any]:
    out: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref,
                           "legendFormat": legend or "__auto", "format": fmt}
    if exemplar:
        out["exemplar"] = True
    if instant:
        out["instant"] = True
        out["range"] = False
    return out


def panel(layout: Layout, kind: str, title: str, description: str, unit: str,
          targets: list[dict[str, Any]], width: int = 8, height: int = 8,
          options: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
          ) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    out = {"type": kind, "title": title, "description": description, "id": layout.ids(),
           "datasource": DS, "gridPos": layout.place(width, height), "targets": targets,
           "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
           "options": options or {}}
    out.update(extra or {})
    return out


def stat(layout: Layout, title: str, description: str, unit: str, expr: str,
         thresholds: list[tuple[str, float | None]] | None = None) -> dict[str, Any]:
    p = panel(layout, "stat", title, description, unit, [target(expr)], width=3, height=4,
              options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value",
                       "graphMode": "area"})
    if thresholds:
        p["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for color, value in thresholds]}
    return p


def latency(layout: Layout, title: str, description: str, histogram: str) -> dict[str, Any]:
    targets = [target(quantile(q, histogram, "gen_ai_request_model"),
                      f"p{int(q * 100)} {{{{gen_ai_request_model}}}}", exemplar=True)
               for q in (0.5, 0.95, 0.99)]
    targets.append(target(mean(histogram, "gen_ai_request_model"),
                          "mean {{gen_ai_request_model}}"))
    return panel(layout, "timeseries", title, description, "s", targets, width=12)


def heatmap(layout: Layout, title: str, description: str, histogram: str) -> dict[str, Any]:
    return panel(layout, "heatmap", title, description, "s",
                 [target(f"sum by (le) ({rate(histogram + '_bucket')})", "{{le}}",
                         fmt="heatmap", exemplar=True)],
                 width=12, options={"calculate": False, "yAxis": {"unit": "s"},
                                    "exemplars": {"color": "rgba(255,0,255,0.7)"}})


def variables() -> dict[str, Any]:
    def query(name: str, expr: str) -> dict[str, Any]:
        return {"type": "query", "name": name, "label": name, "datasource": DS,
                "query": {"query": expr, "refId": name}, "definition": expr, "refresh": 2,
                "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
                "current": {"text": "All", "value": "$__all"}}

    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "data source",
         "query": "prometheus", "current": {}, "hide": 0},
        query("job", "label_values(llmtap_build_info, job)"),
        query("instance", 'label_values(llmtap_build_info{job=~"$job"}, instance)'),
        query("model", "label_values(gen_ai_server_request_duration_seconds_count"
                       f"{{{SEL}}}, gen_ai_request_model)"),
    ]}


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict:
    return {"uid": uid, "id": None, "title": title, "description": description,
            "tags": ["llmtap", "llm"], "schemaVersion": 39, "version": 1, "editable": True,
            "graphTooltip": 1, "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
            "timezone": "", "templating": variables(), "annotations": {"list": []},
            "panels": panels}


def overview() -> dict[str, Any]:
    lay = Layout()
    requests = f"sum({rate('gen_ai_server_request_duration_seconds_count')})"
    errors = ("sum(" + rate("gen_ai_server_request_duration_seconds_count",
                            MSEL + ', error_type!~"|cancelled"') + ")")
    panels = [
        stat(lay, "Requests/s", "Requests answered per second, all outcomes.", "reqps",
             requests),
        stat(lay, "Output tokens/s", "Generated tokens per second (server-reported counts), "
             "reasoning included.", "none", tokens_rate("output", by="")),
        stat(lay, "Error ratio", "Share of requests that failed (client cancels excluded).",
             "percentunit", f"{errors} / clamp_min({requests}, 1e-9)",
             [("green", None), ("orange", 0.01), ("red", 0.05)]),
        stat(lay, "TTFT p95", "95th percentile time to first token.", "s",
             quantile(0.95, "gen_ai_server_time_to_first_token_seconds"),
             [("green", None), ("orange", 1), ("red", 2.5)]),
        stat(lay, "TPOT p95", "95th percentile time per output token (streamed answers).",
             "s", quantile(0.95, "gen_ai_server_time_per_output_token_seconds")),
        stat(lay, "Waiting", "Requests in flight with no first token yet: the queue as "
             "clients feel it.", "none", f"sum(llmtap_requests_waiting{{{MSEL}}})",
             [("green", None), ("orange", 4), ("red", 16)]),
        stat(lay, "Upstreams down", "llmtap sidecars whose model server fails its health "
             "probe.", "none", f"count(llmtap_upstream_up{{{SEL}}} == 0) or vector(0)",
             [("green", None), ("red", 1)]),
        stat(lay, "Open proxies", "Sidecars whose proxy port requires no API key.", "none",
             f"count(llmtap_auth_enabled{{{SEL}}} == 0) or vector(0)",
             [("green", None), ("orange", 1)]),
        lay.row("Latency"),
        latency(lay, "Time to first token", "Arrival at llmtap to the first non-empty token "
                "relayed, a reasoning model's first thinking token included; click an exemplar "
                "to open its trace.", "gen_ai_server_time_to_first_token_seconds"),
        heatmap(lay, "TTFT distribution", "Time to first token, all models.",
                "gen_ai_server_time_to_first_token_seconds"),
        latency(lay, "Time to first answer token", "Arrival at llmtap to the first token of "
                "the answer, after any reasoning: what a user of a reasoning model waits for "
                "(the same as TTFT for a model that does not reason).",
                "llmtap_time_to_first_answer_token_seconds"),
        latency(lay, "Time per output token", "(last token - first token) / (output tokens - "
                "1), streamed answers.", "gen_ai_server_time_per_output_token_seconds"),
        latency(lay, "Request duration", "Arrival to the end of the answer, all outcomes.",
                "gen_ai_server_request_duration_seconds"),
        heatmap(lay, "Duration distribution", "Request duration, all models and outcomes.",
                "gen_ai_server_request_duration_seconds"),
        latency(lay, "Queue wait", "Time before the server began work, where its timings "
                "tell (Ollama load_duration with the model resident; llama.cpp TTFT - prompt "
                "time).", "llmtap_queue_wait_seconds"),
        panel(lay, "timeseries", "Cold loads", "Requests that found their model unloaded, "
              "and the server's load time for them.", "s",
              [target(mean("llmtap_model_load_duration_seconds", "gen_ai_request_model"),
                      "mean load {{gen_ai_request_model}}")], width=12),
        lay.row("Throughput"),
        panel(lay, "timeseries", "Tokens/s by model", "Input, output and reasoning (a part of "
              "the output) tokens per second, as the server reported them.", "none",
              [target(tokens_rate(kind), f"{kind} {{{{gen_ai_request_model}}}}")
               for kind in ("input", "output", "reasoning")], width=12),
        panel(lay, "timeseries", "Requests/s by model and operation", "Answered requests "
              "per second.", "reqps",
              [target("sum by (gen_ai_request_model, gen_ai_operation_name) ("
                      + rate("gen_ai_server_request_duration_seconds_count") + ")",
                      "{{gen_ai_operation_name}} {{gen_ai_request_model}}")], width=12),
        lay.row("Saturation"),
        panel(lay, "timeseries", "In flight and waiting", "Requests in flight at llmtap, and "
              "those still waiting for a first token.", "none",
              [target(f"sum by (gen_ai_request_model) (llmtap_requests_in_flight{{{MSEL}}})",
                      "in flight {{gen_ai_request_model}}"),
               target(f"sum by (gen_ai_request_model) (llmtap_requests_waiting{{{MSEL}}})",
                      "waiting {{gen_ai_request_model}}")]),
        panel(lay, "timeseries", "Server queue", "The server's own view: requests "
              "processing and deferred (llama.cpp, vLLM), busy slots.", "none",
              [target(f"sum by (instance) (llmtap_upstream_requests_processing{{{SEL}}})",
                      "processing {{instance}}"),
               target(f"sum by (instance) (llmtap_upstream_requests_deferred{{{SEL}}})",
                      "deferred {{instance}}"),
               target(f"sum by (instance) (llmtap_upstream_slots_busy{{{SEL}}})",
                      "busy slots {{instance}}")]),
        panel(lay, "bargauge", "GPU memory used", "Share of each GPU's memory in use.",
              "percentunit",
              [target(f"llmtap_gpu_memory_used_bytes{{{SEL}}} / "
                      f"clamp_min(llmtap_gpu_memory_total_bytes{{{SEL}}}, 1)",
                      "{{instance}} GPU {{gpu}}")],
              options={"displayMode": "gradient", "orientation": "horizontal"}),
        lay.row("Models"),
        panel(lay, "table", "Models", "Installed models: loaded, VRAM, digest, "
              "quantization, cold loads in the last day.", "none",
              [target(f"llmtap_model_info{{{MSEL}}}", instant=True, fmt="table"),
               target(f"llmtap_model_loaded{{{MSEL}}}", instant=True, fmt="table"),
               target(f"llmtap_model_vram_bytes{{{MSEL}}}", instant=True, fmt="table"),
               target("sum by (gen_ai_request_model) (increase("
                      f"llmtap_model_load_duration_seconds_count{{{MSEL}}}[1d]))",
                      instant=True, fmt="table")],
              width=24, extra={"transformations": [
                  {"id": "merge", "options": {}},
                  {"id": "organize", "options": {"excludeByName": {"Time": True}}}]}),
        lay.row("Errors"),
        panel(lay, "timeseries", "Errors by type", "Failed requests per second by "
              "error_type: an HTTP status, cancelled, timeout, upstream_connect, "
              "upstream_reset, upstream_error, queue_full.", "reqps",
              [target("sum by (error_type) (" + rate(
                  "gen_ai_server_request_duration_seconds_count",
                  MSEL + ', error_type!=""') + ")", "{{error_type}}")], width=12),
        panel(lay, "timeseries", "llmtap's own health", "Upstream health, span drops, "
              "unparseable frames and refused keys.", "none",
              [target(f"min by (instance) (llmtap_upstream_up{{{SEL}}})",
                      "upstream up {{instance}}"),
               target(f"sum(rate(llmtap_spans_dropped_total{{{SEL}}}[$__rate_interval]))",
                      "spans dropped/s"),
               target(f"sum(rate(llmtap_unparseable_frames_total{{{SEL}}}"
                      "[$__rate_interval]))", "unparseable frames/s"),
               target(f"sum(rate(llmtap_auth_rejected_total{{{SEL}}}[$__rate_interval]))",
                      "refused keys/s")], width=12),
    ]
    return dashboard("llmtap-overview", "llmtap overview",
                     "Local LLM serving as clients feel it: latency, throughput, queues, "
                     "models and errors, measured by llmtap.", panels)


def gpu() -> dict[str, Any]:
    lay = Layout()
    gsel = SEL
    by = "{{instance}} GPU {{gpu}}"

    def series(title: str, description: str, unit: str, expr: str, legend: str = by,
               width: int = 12) -> dict[str, Any]:
        return panel(lay, "timeseries", title, description, unit, [target(expr, legend)],
                     width=width)

    panels = [
        series("Utilization", "Share of time the GPU was busy.", "percentunit",
               f"llmtap_gpu_utilization_ratio{{{gsel}}}"),
        panel(lay, "timeseries", "Memory", "GPU memory used and total.", "bytes",
              [target(f"llmtap_gpu_memory_used_bytes{{{gsel}}}", "used " + by),
               target(f"llmtap_gpu_memory_total_bytes{{{gsel}}}", "total " + by)], width=12),
        series("Temperature", "GPU core temperature.", "celsius",
               f"llmtap_gpu_temperature_celsius{{{gsel}}}"),
        panel(lay, "timeseries", "Power vs limit", "Power draw and the enforced limit.",
              "watt", [target(f"llmtap_gpu_power_watts{{{gsel}}}", "draw " + by),
                       target(f"llmtap_gpu_power_limit_watts{{{gsel}}}", "limit " + by)],
              width=12),
        series("SM clock", "Streaming-multiprocessor clock.", "hertz",
               f"llmtap_gpu_sm_clock_hertz{{{gsel}}}"),
        series("Throttle reasons", "Active clock-throttle reasons (1 = active).", "none",
               f"llmtap_gpu_throttled{{{gsel}}} == 1", "{{instance}} GPU {{gpu}} {{reason}}"),
        series("Energy", "Average power from the energy counter.", "watt",
               f"rate(llmtap_gpu_energy_joules_total{{{gsel}}}[$__rate_interval])"),
        series("GPU memory by process", "Memory per process on each GPU.", "bytes",
               f"llmtap_gpu_process_memory_bytes{{{gsel}}}",
               "{{instance}} GPU {{gpu}} {{process}} ({{pid}})"),
        stat(lay, "Sampler up", "1 when NVML works on the sidecar (0: no driver or "
             "no GPU visible).", "none", f"min(llmtap_gpu_up{{{gsel}}})",
             [("red", None), ("green", 1)]),
    ]
    return dashboard("llmtap-gpu", "llmtap GPUs", "What the GPUs behind each llmtap sidecar "
                     "are doing, sampled through NVML.", panels)


def routing() -> dict[str, Any]:
    """The router (`llmtap route`): where requests went and why, how good its estimates are,
    backend health, and what the cloud costs."""
    lay = Layout()

    def series(title: str, description: str, unit: str, targets: list[dict[str, Any]],
               width: int = 12) -> dict[str, Any]:
        return panel(lay, "timeseries", title, description, unit, targets, width=width)

    def by(label: str, metric: str, selector: str = SEL) -> str:
        return f"sum by ({label}) ({rate(metric, selector)})"

    def est(q: float, histogram: str) -> str:
        return quantile(q, histogram, "backend", SEL)

    panels = [
        lay.row("Decisions"),
        series("Requests by backend", "Requests routed per second, by the backend that served "
               "them ('none': refused).", "reqps",
               [target(by("backend", "llmtap_router_decisions_total"), "{{backend}}")]),
        series("Requests by reason", "Why the router chose as it did: policy, light, heavy, "
               "spill, local_only, budget_exhausted, ...", "reqps",
               [target(by("reason", "llmtap_router_decisions_total"), "{{reason}}")]),
        series("Spills to the cloud", "Light requests sent to the cloud because the local "
               "fleet was over the route's TTFT SLO.", "reqps",
               [target(by("route", "llmtap_router_spills_total"), "{{route}}")], width=8),
        series("Routes spilling", "1 while a hybrid route sends its light requests to the "
               "cloud.", "none", [target(f"max by (route) (llmtap_router_spilling{{{SEL}}})",
                                         "{{route}}")], width=8),
        series("Classifier", "Requests by the classifier's label (light, heavy; local: "
               "kept by the keep-local gate) and reason (rule, model, detector, or a "
               "fallback's timeout / error).", "reqps",
               [target(by("label, reason", "llmtap_router_classifications_total"),
                       "{{label}} {{reason}}")], width=8),
        lay.row("Estimates"),
        series("Estimated vs actual TTFT (p50)", "The policy's expected time to first token "
               "for the backend it chose, and the TTFT then measured, per backend.", "s",
               [target(est(0.5, "llmtap_router_estimated_ttft_seconds"),
                       "estimated {{backend}}"),
                target(est(0.5, "llmtap_router_actual_ttft_seconds"), "actual {{backend}}")]),
        series("Actual / estimated TTFT", "Per request, measured TTFT divided by the estimate: "
               "1 is exact, above 1 the router was optimistic.", "none",
               [target(est(0.5, "llmtap_router_ttft_estimate_ratio"), "p50 {{backend}}"),
                target(est(0.9, "llmtap_router_ttft_estimate_ratio"), "p90 {{backend}}")]),
        series("Time to first token at the router", "Arrival at the router to first token, "
               "all backends (the sidecar's histogram, measured at the router).", "s",
               [target(quantile(q, "gen_ai_server_time_to_first_token_seconds",
                                "gen_ai_request_model"),
                       f"p{int(q * 100)} {{{{gen_ai_request_model}}}}", exemplar=True)
                for q in (0.5, 0.95, 0.99)], width=24),
        lay.row("Backends"),
        series("Backend up", "1 when the backend can take requests: breaker closed, fresh "
               "state, server up (cloud: key, breaker, budget).", "none",
               [target(f"min by (backend) (llmtap_router_backend_up{{{SEL}}})",
                       "{{backend}}")], width=8),
        series("In flight per backend", "This router's unfinished requests at each backend.",
               "short", [target(f"sum by (backend) (llmtap_router_backend_in_flight{{{SEL}}})",
                                "{{backend}}")], width=8),
        series("Ejections and retries", "Circuit-breaker ejections, and requests re-sent to the "
               "next backend before the first byte (connect failure, busy).", "short",
               [target("sum by (backend) (increase(llmtap_router_backend_ejections_total"
                       f"{{{SEL}}}[$__rate_interval]))", "ejected {{backend}}"),
                target("sum by (backend, reason) (increase(llmtap_router_retries_total"
                       f"{{{SEL}}}[$__rate_interval]))", "retry {{backend}} {{reason}}")],
               width=8),
        lay.row("Cloud"),
        series("Cloud cost per hour", "Spend rate from the configured prices (currency units "
               "per hour).", "short",
               [target(f"{by('backend', 'llmtap_router_cloud_cost_total')} * 3600",
                       "{{backend}}")], width=8),
        series("Cloud tokens", "Tokens per second to and from cloud backends.", "short",
               [target(by("backend, type", "llmtap_router_cloud_tokens_total"),
                       "{{backend}} {{type}}")], width=8),
        series("Cloud budget left", "Budget remaining in the current period.", "short",
               [target(f"min by (backend) (llmtap_router_cloud_budget_remaining{{{SEL}}})",
                       "{{backend}}")], width=8),
    ]
    return dashboard("llmtap-routing", "llmtap routing", "The llmtap router: decisions, "
                     "spills to the cloud, estimated vs actual TTFT, backend health and cloud "
                     "cost.", panels)


DASHBOARDS = {"llmtap-overview.json": overview, "llmtap-gpu.json": gpu,
              "llmtap-routing.json": routing}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
