"""Which version of the OpenTelemetry GenAI semantic conventions llmtap's token metrics and
spans follow, and the token metrics of each.

Default: v1.41.0, the last GenAI conventions published in open-telemetry/semantic-conventions
(tag v1.41.0, commit e018fe6f91862f5ed63c082f87697cddac596784: docs/gen-ai/gen-ai-metrics.md,
docs/gen-ai/gen-ai-spans.md, model/gen-ai/registry.yaml). Those documents ask instrumentations
to keep emitting the version they emit by default and to switch only when
`OTEL_SEMCONV_STABILITY_OPT_IN` lists `gen_ai_latest_experimental`; then llmtap follows
open-telemetry/semantic-conventions-genai main as read on 2026-12-01: model/gen-ai/
token-metrics.yaml and docs/gen-ai/gen-ai-token-metrics.md (commit
066d4a7f356f8600de6f10c42874626ab88692fb), docs/gen-ai/client-inference.md (commit
024a4f944a1291fcb627c9c47da69e79868dd15e), docs/gen-ai/client-embeddings.md (commit
88eccb155ca7d6984826da1f4b1c08ee916e0f49), docs/gen-ai/non-normative/migration.md (commit
32c328e85013588c6fe32ebc30934ab5b1752b6a).

What changes between them is how tokens are counted. v1.41 has one histogram,
`gen_ai.client.token.usage` with `gen_ai.token.type` (input, output), recorded here for
successful requests; cached and reasoning tokens are span attributes only, so llmtap counts
them in its own counters. The new repository replaces it (PR #374) with monotonic counters per
token category, each with `gen_ai.token.modality` (llmtap cannot tell text from image tokens:
`unknown`, as the conventions say for providers that give no breakdown), and per-operation
histograms apart for input and output; all of them recorded for every operation, failed ones
included, with 0 where no usage came back. Embeddings get their own input histogram. The
server metrics (`gen_ai.server.*`) are the same in both.

Prometheus names are the conventions' names as the OTel-to-Prometheus translation writes
them: dots to underscores, counters ending in `_total`, the `{token}` unit dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from exporter.events import EMBEDDINGS
from exporter.record import RequestRecord
from exporter.telemetry.histogram import LoopHistogram, Series

OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
LATEST = "gen_ai_latest_experimental"
BASE_LABELS = ("gen_ai_provider_name", "gen_ai_operation_name", "gen_ai_request_model")
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1 … 67108864, as both versions ask
UNKNOWN_MODALITY = "unknown"


def latest_experimental(env: Mapping[str, str] = os.environ) -> bool:
    """True when OTEL_SEMCONV_STABILITY_OPT_IN (a comma-separated list) names the GenAI
    conventions' latest experimental version."""
    return LATEST in {value.strip() for value in env.get(OPT_IN, "").split(",")}


Labels = tuple[str, str, str]


class TokenSeries(Protocol):
    """One label set's token metrics, resolved once: `record` is called for every finished
    observed request."""

    def record(self, record: RequestRecord, error_type: str) -> None: ...


class TokenMetrics(Protocol):
    def series(self, labels: Labels) -> TokenSeries: ...


class TokensV141:
    """gen_ai.client.token.usage, and llmtap's counters for what v1.41 has no metric for."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.usage = LoopHistogram(
            "gen_ai_client_token_usage",
            "Tokens per request as the server reported them (output counted from content "
            "frames only where it reported nothing)",
            (*BASE_LABELS, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=registry)
        self.cached = Counter(
            "llmtap_cache_read_input_tokens",
            "Prompt tokens the server reported serving from its prompt cache "
            "(llama.cpp timings.cache_n, OpenAI usage.prompt_tokens_details.cached_tokens, "
            "Ollama prompt_eval_cached_count); part of the input tokens",
            BASE_LABELS, registry=registry)
        self.reasoning = Counter(
            "llmtap_reasoning_output_tokens",
            "Output tokens the model spent reasoning (OpenAI usage.completion_tokens_details."
            "reasoning_tokens where reported, else llmtap's count of reasoning frames: Ollama "
            "thinking, llama-server reasoning_content); part of the output tokens",
            BASE_LABELS, registry=registry)

    def series(self, labels: Labels) -> TokenSeries:
        return _V141Series(self, labels)


class _V141Series:
    __slots__ = ("cached", "input", "output", "reasoning")

    def __init__(self, metrics: TokensV141, labels: Labels) -> None:
        self.input = metrics.usage.labels(*labels, "input")
        self.output = metrics.usage.labels(*labels, "output")
        self.cached = metrics.cached.labels(*labels)
        self.reasoning = metrics.reasoning.labels(*labels)

    def record(self, record: RequestRecord, error_type: str) -> None:
        if error_type:  # v1.41: usage of answered requests only (failed ones would skew it)
            return
        if record.input_tokens is not None:
            self.input.observe(record.input_tokens)
        if (output := record.output_token_count) is not None:
            self.output.observe(output)
        if record.cached_input_tokens is not None:
            self.cached.inc(record.cached_input_tokens)
        if (reasoning := record.reasoning_output_tokens) is not None:
            self.reasoning.inc(reasoning)


class TokensLatest:
    """The usage counters and per-operation histograms of semantic-conventions-genai."""

    def __init__(self, registry: CollectorRegistry) -> None:
        counter_labels = (*BASE_LABELS, "gen_ai_token_modality")
        histogram_labels = (*BASE_LABELS, "error_type")

        def counter(name: str, help_text: str) -> Counter:
            return Counter(name, help_text, counter_labels, registry=registry)

        def histogram(name: str, help_text: str) -> LoopHistogram:
            return LoopHistogram(name, help_text, histogram_labels, buckets=TOKEN_BUCKETS,
                                 registry=registry)

        self.input_total = counter(
            "gen_ai_client_inference_usage_input_tokens",
            "Input tokens of inference requests, cached ones included, as the server reported "
            "them (0 where it reported none)")
        self.output_total = counter(
            "gen_ai_client_inference_usage_output_tokens",
            "Output tokens of inference requests, reasoning included (the server's count; "
            "content frames counted where it reported none)")
        self.cached = counter(
            "gen_ai_client_inference_usage_cache_read_input_tokens",
            "Input tokens the server served from its prompt cache (a part of the input)")
        self.reasoning = counter(
            "gen_ai_client_inference_usage_reasoning_output_tokens",
            "Output tokens spent reasoning (the server's count, else llmtap's count of "
            "reasoning frames; a part of the output)")
        self.input = histogram(
            "gen_ai_client_inference_operation_input_tokens",
            "Input tokens per inference request, failed ones included (0: no usage came back)")
        self.output = histogram(
            "gen_ai_client_inference_operation_output_tokens",
            "Output tokens per inference request, failed ones included (0: no usage came "
            "back)")
        self.embedding_input = histogram(
            "gen_ai_client_embeddings_operation_input_tokens",
            "Input tokens per embeddings request, failed ones included")

    def series(self, labels: Labels) -> TokenSeries:
        return _LatestSeries(self, labels)


class _LatestSeries:
    __slots__ = ("counters", "inputs", "labels", "metrics", "outputs")

    def __init__(self, metrics: TokensLatest, labels: Labels) -> None:
        self.metrics = metrics
        self.labels = labels
        # The usage counters are inference's (an embeddings label set gets none); made now,
        # so that they read 0 from the first request on, not absent.
        modality = (*labels, UNKNOWN_MODALITY)
        self.counters = None if labels[1] == EMBEDDINGS else (
            metrics.input_total.labels(*modality), metrics.output_total.labels(*modality),
            metrics.cached.labels(*modality), metrics.reasoning.labels(*modality))
        # error_type -> histogram child, made on first use (few error types ever occur)
        self.inputs: dict[str, Series] = {}
        self.outputs: dict[str, Series] = {}

    def _child(self, children: dict[str, Series], family: LoopHistogram,
               error_type: str) -> Series:
        child = children.get(error_type)
        if child is None:
            child = children[error_type] = family.labels(*self.labels, error_type)
        return child

    def record(self, record: RequestRecord, error_type: str) -> None:
        m = self.metrics
        input_tokens = record.input_tokens or 0
        if record.operation == EMBEDDINGS:  # input tokens only, in their own histogram
            self._child(self.inputs, m.embedding_input, error_type).observe(input_tokens)
            return
        output_tokens = record.output_token_count or 0
        self._child(self.inputs, m.input, error_type).observe(input_tokens)
        self._child(self.outputs, m.output, error_type).observe(output_tokens)
        if self.counters is not None:
            inputs, outputs, cached, reasoning = self.counters
            inputs.inc(input_tokens)
            outputs.inc(output_tokens)
            cached.inc(record.cached_input_tokens or 0)
            reasoning.inc(record.reasoning_output_tokens or 0)


def token_metrics(registry: CollectorRegistry, env: Mapping[str, str] = os.environ,
                  ) -> TokenMetrics:
    return TokensLatest(registry) if latest_experimental(env) else TokensV141(registry)
