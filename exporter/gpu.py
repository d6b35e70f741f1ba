"""NVML GPU sampler: one snapshot every few seconds, exported by a collector at scrape time.

The `pynvml` module comes from the PyPI package `nvidia-ml-py` (NVIDIA's own bindings). It is
imported lazily, so a missing module or a missing driver never breaks `import exporter.gpu`, and
NVML failing never touches the proxy: every NVML call runs off the event loop, and every failure
becomes an absent series, never an exception.

Semantics (what an operator sees):
- `llmtap_gpu_up` is 1 when NVML initialised and enumerated the devices on the last tick, 0
  when it could not (module or library missing, driver not loaded, enumeration failing). While
  it is 0 no other `llmtap_gpu_*` series exist and initialisation is retried in the background
  with exponential backoff (interval, twice that, four times, … up to `max_backoff`).
- A GPU that fails on its own (lost, reset required, no permission to open it) loses its
  series while the others keep reporting; `llmtap_gpu_up` stays 1 because NVML itself works.
  Alert on a GPU disappearing with e.g. `count(llmtap_gpu_memory_total_bytes) < N`.
- A field one GPU does not support (power on some boards, per-process memory under MIG) is
  simply absent for that GPU.
- mode "off": NVML is never loaded and the collector exports nothing at all, not even
  `llmtap_gpu_up`, so a deliberately disabled sampler cannot trip a "GPU down" alert.
- Before the first sample has completed the collector exports nothing (unknown is not down).

Failures are logged when their state changes, never once per tick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import orjson
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = structlog.get_logger("llmtap.gpu")

T = TypeVar("T")

MODES = ("off", "auto", "on")
GPU_LABELS = ("gpu", "uuid", "name")

# Clock event ("throttle") reason bits. nvmlClocksEventReason* and the older
# nvmlClocksThrottleReason* constants share these values: they are the driver's ABI, so they
# are pinned here rather than read from whichever pynvml version happens to be installed.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)

# NVML_TEMPERATURE_GPU and NVML_CLOCK_SM, also ABI values (fallbacks if a module lacks them).
_TEMPERATURE_GPU = 0
_CLOCK_SM = 1

# Errors after which nothing this GPU reports can be trusted: drop the whole GPU this tick.
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_GpuNotFound")

UNAVAILABLE_HINT = "Is the NVIDIA driver installed and the GPU visible to this container?"


class NvmlUnavailable(Exception):
    """NVML cannot be used at all (module, library or driver missing, init failing)."""


class _GpuLost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    name: str
    memory_bytes: int | None  # None: NVML could not say (WDDM, some MIG setups)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    sm_clock_hertz: float | None = None
    energy_joules: float | None = None
    throttled: tuple[str, ...] | None = None  # active reasons; None when unreadable
    processes: tuple[GpuProcess, ...] | None = None  # biggest first; None when unreadable
    unavailable: dict[str, str] = field(default_factory=dict)  # field → NVML's reason

    def as_dict(self) -> dict[str, Any]:
        throttled = None if self.throttled is None else {
            reason: reason in self.throttled for reason, _ in THROTTLE_REASONS}
        processes = None if self.processes is None else [
            {"pid": p.pid, "name": p.name, "memory_bytes": p.memory_bytes}
            for p in self.processes]
        return {
            "index": self.index, "uuid": self.uuid, "name": self.name,
            "utilization_ratio": self.utilization_ratio,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "temperature_celsius": self.temperature_celsius,
            "power_watts": self.power_watts, "power_limit_watts": self.power_limit_watts,
            "sm_clock_hertz": self.sm_clock_hertz, "energy_joules": self.energy_joules,
            "throttled": throttled, "processes": processes,
            "unavailable": dict(self.unavailable),
        }


@dataclass(frozen=True, slots=True)
class GpuSample:
    up: bool
    gpus: tuple[GpuDevice, ...] = ()
    error: str | None = None  # why NVML is not usable, when up is False
    skipped: dict[int, str] = field(default_factory=dict)  # GPU index → why it has no series
    driver_version: str | None = None
    taken_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"up": self.up, "error": self.error, "driver_version": self.driver_version,
                "taken_at": self.taken_at, "gpus": [g.as_dict() for g in self.gpus],
                "skipped": {str(i): reason for i, reason in self.skipped.items()}}


def _reason(exc: BaseException) -> str:
    """A short human reason; str() of an NVMLError is NVML's own message."""
    text = str(exc) or type(exc).__name__
    if type(exc).__name__ == "NVMLError_LibraryNotFound":
        text += " (libnvidia-ml.so.1 could not be loaded)"
    return text


def _process_name(pid: int) -> str:
    # NVML reports PIDs as the driver sees them. Outside our PID namespace (a container
    # without hostPID) /proc has no such entry, so the name is "unknown".
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


async def _off_loop(fn: Callable[[], T]) -> T:
    """Run a blocking call in a daemon thread and await its result.

    Not asyncio.to_thread: a call on a lost GPU can hang for a long time, and a hung call in
    the default executor would hold one of the workers aiohttp needs for DNS, and keep
    asyncio.run() from ever returning (Python 3.11 joins the default executor at exit
    without a timeout). A daemon thread is never joined; a hung one costs one idle thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():  # the awaiting task may have been cancelled meanwhile
            setter(value)

    def work() -> None:
        try:
            result = fn()
        except Exception as exc:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="llmtap-gpu", daemon=True).start()
    return await future


class _DeviceReader:
    """Reads one GPU's fields. A failing field is recorded and left absent, never raised,
    except the errors that mean the whole GPU is gone."""

    def __init__(self, lost: tuple[type[BaseException], ...]) -> None:
        self.lost = lost
        self.unavailable: dict[str, str] = {}

    def read(self, name: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except self.lost as exc:
            raise _GpuLost(_reason(exc)) from None
        except Exception as exc:  # NotSupported, NoPermission, a too-old driver or module
            self.unavailable[name] = _reason(exc)
            return None


class GpuSampler:
    """Samples every visible GPU through NVML; `latest` is the most recent snapshot."""

    def __init__(self, interval: float = 2.0, mode: str = "auto", nvml: ModuleType | None = None,
                 max_processes: int = 32, max_backoff: float = 60.0) -> None:
        if mode not in MODES:
            raise ValueError(f"GPU mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.interval = interval
        self.mode = mode
        self.max_processes = max_processes
        self.max_backoff = max(max_backoff, interval)
        self.latest: GpuSample | None = None
        self._nvml: Any = nvml
        self._initialised = False
        self._closed = False
        self._driver: str | None = None
        self._throttle_fn: str | None = None  # which clock-reason call works here
        # NVML calls are serialised: a shutdown never races a sample still in its thread.
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._logged_error: str | None = None
        self._logged_skipped: dict[int, str] = {}
        self._logged_fields: dict[int, dict[str, str]] = {}

    # -- blocking side (worker thread or CLI) ------------------------------------------------

    def _load(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise NvmlUnavailable(
                    f"the pynvml module is not installed (pip install nvidia-ml-py): {exc}"
                ) from None
            self._nvml = pynvml
        return self._nvml

    def _ensure_init(self) -> Any:
        nvml = self._load()
        if not self._initialised:
            try:
                nvml.nvmlInit()
            except Exception as exc:
                raise NvmlUnavailable(_reason(exc)) from None
            self._initialised = True
            try:
                self._driver = str(nvml.nvmlSystemGetDriverVersion())
            except Exception:
                self._driver = None  # only used in logs and the CLI
        return nvml

    def _release(self) -> None:
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def shutdown(self) -> None:
        """Release NVML (blocking); a later sample_once() initialises it again."""
        with self._lock:
            self._release()

    def sample_once(self) -> GpuSample:
        """Take one sample (blocking: NVML calls take microseconds to, on a sick GPU, seconds)."""
        if self.mode == "off":
            return GpuSample(up=False, error="GPU sampling is off")
        with self._lock:
            if self._closed:
                return GpuSample(up=False, error="GPU sampler closed")
            try:
                nvml = self._ensure_init()
            except NvmlUnavailable as exc:
                return GpuSample(up=False, error=str(exc))
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception as exc:
                # Enumeration failing means NVML itself is broken (driver unloaded or reset):
                # start over with a fresh init on a later tick.
                self._release()
                return GpuSample(up=False, error=f"listing GPUs failed: {_reason(exc)}")
            lost = tuple(t for n in _LOST_ERRORS if isinstance(t := getattr(nvml, n, None), type))
            gpus: list[GpuDevice] = []
            skipped: dict[int, str] = {}
            for index in range(count):
                try:
                    gpus.append(self._sample_device(nvml, index, lost))
                except _GpuLost as exc:
                    skipped[index] = exc.reason
                except Exception as exc:  # no handle: no permission, not found, …
                    skipped[index] = _reason(exc)
            return GpuSample(up=True, gpus=tuple(gpus), skipped=skipped,
                             driver_version=self._driver)

    def _sample_device(self, nvml: Any, index: int,
                       lost: tuple[type[BaseException], ...]) -> GpuDevice:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            uuid = str(nvml.nvmlDeviceGetUUID(handle))
            name = str(nvml.nvmlDeviceGetName(handle))
        except lost as exc:
            raise _GpuLost(_reason(exc)) from None
        reader = _DeviceReader(lost)
        util = reader.read("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = reader.read("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = reader.read("temperature", lambda: nvml.nvmlDeviceGetTemperature(
            handle, getattr(nvml, "NVML_TEMPERATURE_GPU", _TEMPERATURE_GPU)))
        power_mw = reader.read("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = reader.read("power_limit",
                               lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        sm_mhz = reader.read("sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(
            handle, getattr(nvml, "NVML_CLOCK_SM", _CLOCK_SM)))
        energy_mj = reader.read("energy",
                                lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        reasons = reader.read("throttled", lambda: self._clock_reasons(nvml, handle))
        processes = reader.read("processes", lambda: self._processes(nvml, handle))
        return GpuDevice(
            index=index, uuid=uuid, name=name,
            utilization_ratio=None if util is None else util.gpu / 100.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_celsius=None if temperature is None else float(temperature),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
            sm_clock_hertz=None if sm_mhz is None else sm_mhz * 1e6,
            energy_joules=None if energy_mj is None else energy_mj / 1000.0,
            throttled=None if reasons is None else tuple(
                reason for reason, bit in THROTTLE_REASONS if reasons & bit),
            processes=processes, unavailable=reader.unavailable)

    def _clock_reasons(self, nvml: Any, handle: Any) -> int:
        # "ClocksEvent" is the current name; drivers before R535 only have the deprecated
        # "ClocksThrottle" call (FunctionNotFound), and old nvidia-ml-py lacks the new wrapper.
        if self._throttle_fn is not None:
            return int(getattr(nvml, self._throttle_fn)(handle))
        missing: tuple[type[BaseException], ...] = (AttributeError,)
        if isinstance(not_found := getattr(nvml, "NVMLError_FunctionNotFound", None), type):
            missing += (not_found,)
        try:
            value = int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
            self._throttle_fn = "nvmlDeviceGetCurrentClocksEventReasons"
        except missing:
            value = int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
            self._throttle_fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return value

    def _processes(self, nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
        # A process with compute and graphics contexts is listed twice with the same memory
        # figure (nvidia-smi shows it once as "C+G"): keep one entry per pid.
        memory: dict[int, int | None] = {}
        for listing in (nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                        nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)):
            for proc in listing:
                used = proc.usedGpuMemory  # None when NVML cannot tell
                previous = memory.get(proc.pid)
                memory[proc.pid] = used if previous is None else max(previous, used or 0)
        biggest = sorted(memory.items(), key=lambda item: (item[1] is None, -(item[1] or 0)))
        return tuple(GpuProcess(pid=pid, name=_process_name(pid), memory_bytes=used)
                     for pid, used in biggest[:self.max_processes])

    # -- async side ---------------------------------------------------------------------------

    async def sample(self) -> GpuSample:
        """One sample taken off the event loop; stored as `latest` and logged on change."""
        sample = await _off_loop(self.sample_once)
        self.latest = sample
        self._log_changes(sample)
        return sample

    async def run(self) -> None:
        """Sample forever (returns at once in mode "off", and when close() is called)."""
        if self.mode == "off":
            return
        failures = 0
        try:
            while not self._closed:
                sample = await self.sample()
                failures = 0 if sample.up else failures + 1
                delay = self.interval if sample.up else min(
                    self.interval * 2 ** min(failures - 1, 20), self.max_backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop run() and release NVML. Idempotent; never waits long on a hung driver."""
        self._closed = True
        self._wake.set()
        if self._initialised:
            with contextlib.suppress(Exception):  # TimeoutError: a hung driver keeps it
                await asyncio.wait_for(_off_loop(self.shutdown), 5.0)

    def _log_changes(self, sample: GpuSample) -> None:
        error = sample.error if not sample.up else None
        if error != self._logged_error:
            if error is not None:
                level = log.error if self.mode == "on" else log.warning
                level("GPU metrics unavailable: NVML not usable; retrying in the background",
                      reason=error)
            else:
                log.info("NVML available", driver=sample.driver_version, gpus=len(sample.gpus))
            self._logged_error = error
        if not sample.up:
            return
        if sample.skipped != self._logged_skipped:
            for index, reason in sample.skipped.items():
                if self._logged_skipped.get(index) != reason:
                    log.warning("GPU unavailable, its series are dropped", gpu=index,
                                reason=reason)
            for index in self._logged_skipped.keys() - sample.skipped.keys():
                log.info("GPU available again", gpu=index)
            self._logged_skipped = dict(sample.skipped)
        for gpu in sample.gpus:
            if gpu.unavailable != self._logged_fields.get(gpu.index, {}):
                # Not-supported fields are normal on many boards: note them quietly.
                routine = all(r == "Not Supported" for r in gpu.unavailable.values())
                (log.info if routine else log.warning)(
                    "GPU fields unavailable", gpu=gpu.index, name=gpu.name,
                    fields=gpu.unavailable)
                self._logged_fields[gpu.index] = dict(gpu.unavailable)

    # -- readers ------------------------------------------------------------------------------

    def state(self) -> list[dict[str, Any]]:
        """Per GPU, what `/llmtap/v1/state` carries for the router."""
        sample = self.latest
        if sample is None or not sample.up:
            return []
        return [{"index": g.index, "uuid": g.uuid, "name": g.name,
                 "utilization_ratio": g.utilization_ratio,
                 "memory_used_bytes": g.memory_used_bytes,
                 "memory_total_bytes": g.memory_total_bytes} for g in sample.gpus]


class GpuCollector(Collector):
    """llmtap_gpu_* from the sampler's latest snapshot, built at scrape time."""

    def __init__(self, sampler: GpuSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        sampler = self._sampler
        sample = sampler.latest
        if sampler.mode == "off" or sample is None:
            return
        up = GaugeMetricFamily("llmtap_gpu_up",
                               "1 when NVML initialised and listed the GPUs on the last sample")
        up.add_metric([], 1.0 if sample.up else 0.0)
        yield up
        if sample.up:
            yield from _device_families(sample.gpus)


def _gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=(*GPU_LABELS, *extra))


def _device_families(gpus: tuple[GpuDevice, ...]) -> Iterator[Metric]:
    simple: list[tuple[GaugeMetricFamily, Callable[[GpuDevice], float | int | None]]] = [
        (_gauge("llmtap_gpu_utilization_ratio",
                "Fraction of the last sample period during which a kernel ran (0-1)"),
         lambda g: g.utilization_ratio),
        (_gauge("llmtap_gpu_memory_used_bytes", "GPU memory in use"),
         lambda g: g.memory_used_bytes),
        (_gauge("llmtap_gpu_memory_total_bytes", "GPU memory installed"),
         lambda g: g.memory_total_bytes),
        (_gauge("llmtap_gpu_temperature_celsius", "GPU core temperature"),
         lambda g: g.temperature_celsius),
        (_gauge("llmtap_gpu_power_watts", "Power drawn by the board"), lambda g: g.power_watts),
        (_gauge("llmtap_gpu_power_limit_watts", "Power limit the driver enforces"),
         lambda g: g.power_limit_watts),
        (_gauge("llmtap_gpu_sm_clock_hertz", "Current SM clock"), lambda g: g.sm_clock_hertz),
    ]
    throttled = _gauge("llmtap_gpu_throttled",
                       "1 while this reason holds the clocks down (NVML clock event reasons)",
                       ("reason",))
    energy = CounterMetricFamily("llmtap_gpu_energy_joules",
                                 "Energy used by the GPU since the driver was loaded",
                                 labels=GPU_LABELS)
    processes = _gauge("llmtap_gpu_process_memory_bytes",
                       "GPU memory used per process (the biggest ones)", ("pid", "process"))
    for gpu in gpus:
        labels = [str(gpu.index), gpu.uuid, gpu.name]
        for family, value_of in simple:
            if (value := value_of(gpu)) is not None:
                family.add_metric(labels, float(value))
        if gpu.throttled is not None:  # every reason, always: series never flap in and out
            for reason, _ in THROTTLE_REASONS:
                throttled.add_metric([*labels, reason], 1.0 if reason in gpu.throttled else 0.0)
        if gpu.energy_joules is not None:
            energy.add_metric(labels, gpu.energy_joules)
        for proc in gpu.processes or ():
            if proc.memory_bytes is not None:
                processes.add_metric([*labels, str(proc.pid), proc.name],
                                     float(proc.memory_bytes))
    for family, _ in simple:
        yield family
    yield throttled
    yield energy
    yield processes


# -- `llmtap gpu` --------------------------------------------------------------------------------

def add_gpu_command(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gpu", help="print one GPU sample (NVML) for diagnosis",
        description="Take one NVML sample of every visible GPU and print it, with the reason "
                    "for every value NVML could not give. Exits 1 when NVML is unavailable.")
    parser.add_argument("--json", action="store_true",
                        help="print the sample as JSON (base units: bytes, watts, hertz, "
                             "joules, ratio 0-1)")
    return parser


def run_gpu_command(args: argparse.Namespace, nvml: ModuleType | None = None) -> int:
    sampler = GpuSampler(mode="auto", nvml=nvml)
    try:
        sample = sampler.sample_once()
    finally:
        sampler.shutdown()
    if getattr(args, "json", False):
        sys.stdout.write(orjson.dumps(sample.as_dict(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    elif sample.up:
        sys.stdout.write(format_sample(sample))
    if not sample.up:
        print(f"NVML not available: {sample.error}. {UNAVAILABLE_HINT}", file=sys.stderr)
        return 1
    if not sample.gpus and not sample.skipped:
        print(f"NVML works (driver {sample.driver_version or 'unknown'}) but sees no GPU. "
              f"{UNAVAILABLE_HINT}", file=sys.stderr)
        return 1
    return 0


def _fmt(value: float | None, scale: float, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f} {unit}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                   + "\n" for line in lines)


def format_sample(sample: GpuSample) -> str:
    """The human table `llmtap gpu` prints."""
    count = len(sample.gpus) + len(sample.skipped)
    out = [f"NVML driver {sample.driver_version or 'unknown'}, {count} GPU(s)\n"]
    if sample.gpus:
        rows = [[str(g.index), g.name, g.uuid, _fmt(g.utilization_ratio, 0.01, "%", 0),
                 _fmt(g.memory_used_bytes, 2**30, "GiB"), _fmt(g.memory_total_bytes, 2**30, "GiB"),
                 _fmt(g.temperature_celsius, 1, "C", 0), _fmt(g.power_watts, 1, "W"),
                 _fmt(g.power_limit_watts, 1, "W"), _fmt(g.sm_clock_hertz, 1e6, "MHz", 0),
                 _fmt(g.energy_joules, 1, "J", 0),
                 "n/a" if g.throttled is None else ",".join(g.throttled) or "-"]
                for g in sample.gpus]
        out.append(_table(["GPU", "NAME", "UUID", "UTIL", "MEM USED", "MEM TOTAL", "TEMP",
                           "POWER", "LIMIT", "SM CLOCK", "ENERGY", "THROTTLED"], rows))
    procs = [[str(g.index), str(p.pid), p.name, _fmt(p.memory_bytes, 2**20, "MiB", 0)]
             for g in sample.gpus for p in g.processes or ()]
    if procs:
        out.append("\n" + _table(["GPU", "PID", "PROCESS", "MEMORY"], procs))
    notes = [f"GPU {g.index} {name}: {reason}\n"
             for g in sample.gpus for name, reason in g.unavailable.items()]
    notes += [f"GPU {index}: no series ({reason})\n" for index, reason in sample.skipped.items()]
    if notes:
        out.append("\nunavailable:\n" + "".join("  " + n for n in notes))
    return "".join(out)
