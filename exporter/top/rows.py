"""The rows `llmtap top` shows, from snapshots and their windows: pure, so tests read them
without a terminal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.top.window import Recent

SORT_KEYS = ("in_flight", "waiting", "ttft_p95", "tok_s", "errors", "model")


@dataclass(frozen=True, slots=True)
class ModelRow:
    backend: str
    model: str
    in_flight: int
    waiting: int
    ttft_p50: float | None
    ttft_p95: float | None
    tok_s: float | None
    loaded: bool | None
    vram_bytes: int | None
    errors: float | None  # recent error rate, 0..1


@dataclass(frozen=True, slots=True)
class GpuRow:
    backend: str
    gpu: str
    utilization: float | None
    used: int | None
    total: int | None


@dataclass(frozen=True, slots=True)
class BackendRow:
    """A router's view of one backend: sidecar or cloud."""

    router: str
    backend: str
    breaker: str
    in_flight: int
    detail: str  # state age / upstream for a sidecar; spend against budget for a cloud


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def model_rows(backend: str, state: dict[str, Any],
               recent: dict[str, Recent]) -> list[ModelRow]:
    rows = []
    models = state.get("models")
    for model, entry in (models.items() if isinstance(models, dict) else ()):
        if not isinstance(entry, dict):
            continue
        window = recent.get(model) or Recent(None, None, None, 0)
        loaded = entry.get("loaded")
        rows.append(ModelRow(
            backend, str(model), _int(entry.get("in_flight")), _int(entry.get("waiting")),
            window.ttft_p50, window.ttft_p95, window.tokens_per_second,
            loaded if isinstance(loaded, bool) else None,
            _int(entry["vram_bytes"]) if _num(entry.get("vram_bytes")) is not None else None,
            _num(entry.get("error_rate"))))
    return rows


def gpu_rows(backend: str, state: dict[str, Any]) -> list[GpuRow]:
    gpus = state.get("gpus")
    return [GpuRow(backend, f"{g.get('index', '?')} {g.get('name') or ''}".strip(),
                   _num(g.get("utilization_ratio")),
                   _int(g["memory_used_bytes"]) if _num(g.get("memory_used_bytes")) else None,
                   _int(g["memory_total_bytes"]) if _num(g.get("memory_total_bytes")) else None)
            for g in (gpus if isinstance(gpus, list) else ()) if isinstance(g, dict)]


def backend_rows(router: str, state: dict[str, Any]) -> list[BackendRow]:
    rows = []
    for s in state.get("sidecars") or ():
        if not isinstance(s, dict):
            continue
        age = _num(s.get("state_age_s"))
        up = "server up" if s.get("upstream_up") else "server down"
        detail = f"{up}, state {age:.1f} s old" if age is not None else f"{up}, never polled"
        in_flight = s.get("router_in_flight")
        rows.append(BackendRow(router, str(s.get("name")), str(s.get("breaker")),
                               sum(_int(n) for n in in_flight.values())
                               if isinstance(in_flight, dict) else 0, detail))
    for c in state.get("cloud") or ():
        if not isinstance(c, dict):
            continue
        budget, left = _num(c.get("budget")), _num(c.get("budget_left"))
        spend = f"spent {budget - left:.2f} of {budget:.2f}" if budget is not None and \
            left is not None else "no budget"
        why = c.get("unusable")
        rows.append(BackendRow(router, f"{c.get('name')} (cloud)", str(c.get("breaker")),
                               _int(c.get("in_flight")),
                               spend + (f", unusable: {why}" if why else "")))
    return rows


def spilling(state: dict[str, Any]) -> list[str]:
    routes = state.get("spilling")
    return sorted(str(r) for r, on in routes.items() if on) if isinstance(routes, dict) else []


def sort_models(rows: list[ModelRow], key: str) -> list[ModelRow]:
    """Biggest first (name: alphabetical); unknown figures last."""
    if key == "model":
        return sorted(rows, key=lambda r: (r.model, r.backend))

    def value(row: ModelRow) -> tuple[bool, float]:
        figure = {"in_flight": row.in_flight, "waiting": row.waiting, "ttft_p95": row.ttft_p95,
                  "tok_s": row.tok_s, "errors": row.errors}[key]
        return (figure is None, -(figure or 0.0))

    return sorted(rows, key=lambda r: (*value(r), r.backend, r.model))
