"""What the pollers last learned about the upstream: its models, what is loaded, its queue.

Pollers replace these fields wholesale on each successful poll (never mutate in place), so
the scrape collector, the state endpoint and the relay can read them at any moment without
locks and always see one consistent poll.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exporter.record import RequestRecord
from exporter.relay.observers import Observer


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    digest: str = ""
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    vram_bytes: int | None = None
    size_bytes: int | None = None
    expires_at: str = ""
    state: str = "loaded"  # llama.cpp's router: "sleeping" (its child freed the weights)

    @property
    def in_memory(self) -> bool:
        return self.state != "sleeping"


@dataclass(frozen=True, slots=True)
class ServerQueue:
    """The server's own view of its work (llama.cpp /metrics and /slots, vLLM /metrics)."""

    processing: float | None = None
    deferred: float | None = None
    slots_total: int | None = None
    slots_busy: int | None = None
    kv_cache_usage_ratio: float | None = None
    counters: dict[str, float] = field(default_factory=dict)  # llmtap name → value


@dataclass
class UpstreamView:
    models: dict[str, ModelInfo] | None = None  # None: the inventory could not be read yet
    loaded: dict[str, LoadedModel] | None = None  # None: this upstream does not say
    queue: ServerQueue | None = None
    # Per model, the server's own view where it has one per model (Ollama's llama-server
    # runners); None: not seen.
    model_queues: dict[str, ServerQueue] | None = None
    loads: dict[str, int] = field(default_factory=dict)  # load transitions seen per model
    unloads: dict[str, int] = field(default_factory=dict)
    # Models a request found unloaded and is loading now; set by the relay, cleared by polls.
    loading: set[str] = field(default_factory=set)
    # The last load seen of each model (llama.cpp's router /models/sse): (began, ended), on
    # the relay's clock, for the requests that waited for it.
    load_times: dict[str, tuple[float, float]] = field(default_factory=dict)

    def model_was_loaded(self, name: str) -> bool | None:
        """At a request's arrival: was its model resident? None when the server won't say."""
        loaded = self.loaded
        if loaded is None:
            return None
        resident = loaded.get(name)
        if (resident is not None and resident.in_memory) or name in self.loading:
            return True  # a request behind a load in progress waits in the queue, not a load
        self.loading.add(name)
        return False

    def note_load(self, name: str, began: float, ended: float) -> None:
        self.load_times[name] = (began, ended)

    def load_seen_by(self, name: str, arrival: float) -> float | None:
        """The duration of a load of `name` that ended after a request arrived, if one was
        seen (a request that found its model unloaded waited for it)."""
        seen = self.load_times.get(name)
        return seen[1] - seen[0] if seen is not None and seen[1] >= arrival else None

    def note_finished(self, name: str, was_loaded: bool | None, success: bool) -> None:
        """A request that found its model unloaded failed: the load may not have happened,
        so the next request must not assume it. (A successful one stays in `loading` until
        a poll lists the model, so requests meanwhile are not miscounted as cold loads.)"""
        if was_loaded is False and not success:
            self.loading.discard(name)

    def set_loaded(self, loaded: dict[str, LoadedModel]) -> tuple[list[str], list[str]]:
        """Replace the loaded set from a poll; returns (loaded now, unloaded) transitions."""
        before = self.loaded
        self.loaded = loaded
        self.loading -= {name for name, m in loaded.items() if m.in_memory}
        if before is None:
            return [], []
        came = [name for name in loaded if name not in before]
        went = [name for name in before if name not in loaded]
        for name in came:
            self.loads[name] = self.loads.get(name, 0) + 1
        for name in went:
            self.unloads[name] = self.unloads.get(name, 0) + 1
        return came, went

    def as_dict(self) -> dict[str, Any]:
        queue = self.queue
        return {
            "models": sorted(self.models) if self.models is not None else None,
            "loaded": None if self.loaded is None else {
                name: {"vram_bytes": m.vram_bytes, "expires_at": m.expires_at or None,
                       "state": m.state}
                for name, m in sorted(self.loaded.items())},
            "queue": None if queue is None else {
                "processing": queue.processing, "deferred": queue.deferred,
                "slots_total": queue.slots_total, "slots_busy": queue.slots_busy,
                "kv_cache_usage_ratio": queue.kv_cache_usage_ratio},
            "model_queues": None if self.model_queues is None else {
                name: {"slots_total": q.slots_total, "slots_busy": q.slots_busy,
                       "kv_cache_usage_ratio": q.kv_cache_usage_ratio}
                for name, q in sorted(self.model_queues.items())},
        }


class LoadTracking(Observer):
    """Tells the view how each request that found its model unloaded ended."""

    def __init__(self, view: UpstreamView) -> None:
        self.view = view

    def finished(self, record: RequestRecord) -> None:
        if record.model_was_loaded is False and "load_duration" not in record.server_timings:
            load = self.view.load_seen_by(record.live_label, record.arrival)
            if load is not None:  # llama.cpp's router: its answers carry no load time
                record.server_timings["load_duration"] = load
        if record.operation and record.live_label:
            self.view.note_finished(record.live_label, record.model_was_loaded,
                                    record.succeeded)
