"""The NVML sampler, driven through a fake pynvml that raises the real NVML error types, and
once through the real pynvml on this driverless machine (CI's reality)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import gpu as gpu_module
from exporter.gpu import (
    THROTTLE_REASONS,
    GpuCollector,
    GpuSampler,
    add_gpu_command,
    run_gpu_command,
)
from tests.fake_pynvml import FakeGpu, FakeNvml, GiB

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
NO_SUCH_PID = 4_000_001  # above the kernel's pid_max ceiling (2**22): never in /proc
CALLS_PER_GPU = 13  # NVML calls the sampler makes per GPU per sample

Labels = tuple[tuple[str, str], ...]


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
                utilization=45, memory_total=80 * GiB, memory_used=10 * GiB, temperature=41,
                power_usage=123_456, power_limit=700_000, sm_clock=1980,
                energy=5_000_000, compute_processes=[(NO_SUCH_PID, 8 * GiB)]),
        FakeGpu(name="NVIDIA L4", uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000",
                utilization=90, memory_total=24 * GiB, memory_used=1 * GiB, temperature=67,
                power_usage=72_000, power_limit=72_000, sm_clock=2040, energy=1_234,
                clocks_event_reasons=0x4),
    ]


def scrape(sampler: GpuSampler) -> dict[tuple[str, Labels], float]:
    """Render the collector the way /metrics does and parse it back."""
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series_of(scraped: dict[tuple[str, Labels], float], gpu: str) -> set[str]:
    return {name for name, labels in scraped if ("gpu", gpu) in labels}


def value(scraped: dict[tuple[str, Labels], float], name: str, gpu: str, **extra: str) -> float:
    for (n, labels), v in scraped.items():
        if n == name and ("gpu", gpu) in labels and all((k, x) in labels
                                                         for k, x in extra.items()):
            return v
    raise KeyError((name, gpu, extra))


async def until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not true within {within} s")


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


class LogRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.events.append((level, event, kw))

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._record(level)

    def of(self, level: str) -> list[str]:
        return [event for lvl, event, _ in self.events if lvl == level]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> LogRecorder:
    recorder = LogRecorder()
    monkeypatch.setattr(gpu_module, "log", recorder)
    return recorder


@pytest.fixture
async def running() -> AsyncIterator[Callable[[GpuSampler], asyncio.Task[None]]]:
    """Start sampler.run() tasks; cancel and reap whatever is left at the end of the test."""
    tasks: list[asyncio.Task[None]] = []

    def start(sampler: GpuSampler) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(sampler.run()))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- values ---------------------------------------------------------------------------------------

async def test_two_gpus_export_base_units() -> None:
    sampler = GpuSampler(nvml=FakeNvml(two_gpus()))
    await sampler.sample()
    got = scrape(sampler)

    assert got[("llmtap_gpu_up", ())] == 1
    h100 = (("gpu", "0"), ("name", "NVIDIA H100 80GB HBM3"),
            ("uuid", "GPU-aaaaaaaa-0000-0000-0000-000000000000"))
    assert got[("llmtap_gpu_utilization_ratio", h100)] == pytest.approx(0.45)
    assert got[("llmtap_gpu_memory_used_bytes", h100)] == 10 * GiB
    assert got[("llmtap_gpu_memory_total_bytes", h100)] == 80 * GiB
    assert got[("llmtap_gpu_temperature_celsius", h100)] == 41
    assert got[("llmtap_gpu_power_watts", h100)] == pytest.approx(123.456)
    assert got[("llmtap_gpu_power_limit_watts", h100)] == 700
    assert got[("llmtap_gpu_sm_clock_hertz", h100)] == 1.98e9
    assert got[("llmtap_gpu_energy_joules_total", h100)] == 5000
    assert value(got, "llmtap_gpu_utilization_ratio", "1") == pytest.approx(0.9)
    assert value(got, "llmtap_gpu_memory_total_bytes", "1") == 24 * GiB
    assert value(got, "llmtap_gpu_sm_clock_hertz", "1") == 2.04e9
    assert value(got, "llmtap_gpu_power_watts", "1") == 72

    assert sampler.state() == [
        {"index": 0, "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
         "name": "NVIDIA H100 80GB HBM3", "utilization_ratio": 0.45,
         "memory_used_bytes": 10 * GiB, "memory_total_bytes": 80 * GiB},
        {"index": 1, "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "name": "NVIDIA L4",
         "utilization_ratio": 0.9, "memory_used_bytes": 1 * GiB,
         "memory_total_bytes": 24 * GiB},
    ]


FIELDS = [
    ("nvmlDeviceGetUtilizationRates", {"llmtap_gpu_utilization_ratio"}),
    ("nvmlDeviceGetMemoryInfo", {"llmtap_gpu_memory_used_bytes",
                                 "llmtap_gpu_memory_total_bytes"}),
    ("nvmlDeviceGetTemperature", {"llmtap_gpu_temperature_celsius"}),
    ("nvmlDeviceGetPowerUsage", {"llmtap_gpu_power_watts"}),
    ("nvmlDeviceGetEnforcedPowerLimit", {"llmtap_gpu_power_limit_watts"}),
    ("nvmlDeviceGetClockInfo", {"llmtap_gpu_sm_clock_hertz"}),
    ("nvmlDeviceGetTotalEnergyConsumption", {"llmtap_gpu_energy_joules_total"}),
    ("nvmlDeviceGetCurrentClocksEventReasons", {"llmtap_gpu_throttled"}),
    ("nvmlDeviceGetComputeRunningProcesses", {"llmtap_gpu_process_memory_bytes"}),
]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED,
                                  pynvml.NVML_ERROR_NO_PERMISSION])
@pytest.mark.parametrize(("function", "metrics"), FIELDS, ids=[f for f, _ in FIELDS])
async def test_failing_field_drops_only_its_series(function: str, metrics: set[str],
                                                   code: int) -> None:
    gpus = two_gpus_with_procs()
    healthy = scrape_once(FakeNvml(two_gpus_with_procs()))
    gpus[1].errors = {function: code}
    sampler = GpuSampler(nvml=FakeNvml(gpus))
    await sampler.sample()
    got = scrape(sampler)

    assert got[("llmtap_gpu_up", ())] == 1
    assert series_of(got, "0") == series_of(healthy, "0")
    assert series_of(got, "1") == series_of(healthy, "1") - metrics
    assert metrics <= series_of(healthy, "1")
    assert sampler.latest is not None
    assert sampler.latest.gpus[1].unavailable  # the reason is kept for `llmtap gpu`


def two_gpus_with_procs() -> list[FakeGpu]:
    gpus = two_gpus()
    gpus[1].compute_processes = [(4343, 1 * GiB)]
    return gpus


def scrape_once(fake: FakeNvml) -> dict[tuple[str, Labels], float]:
    sampler = GpuSampler(nvml=fake)
    sampler.latest = sampler.sample_once()
    sampler.shutdown()
    return scrape(sampler)


async def test_gpu_lost_mid_run_drops_only_that_gpu(logs: LogRecorder, running: Any) -> None:
    gpus = two_gpus()
    gpus[1].lost_after = CALLS_PER_GPU + 5  # one good sample, then lost halfway through one
    fake = FakeNvml(gpus)
    sampler = GpuSampler(interval=0.01, nvml=fake)
    task = running(sampler)
    await until(lambda: sampler.latest is not None and 1 in sampler.latest.skipped)
    lost_at = fake.calls["nvmlDeviceGetCount"]
    await until(lambda: fake.calls["nvmlDeviceGetCount"] >= lost_at + 3)  # keeps sampling

    assert not task.done()
    got = scrape(sampler)
    assert got[("llmtap_gpu_up", ())] == 1
    assert series_of(got, "1") == set()
    assert "llmtap_gpu_memory_total_bytes" in series_of(got, "0")
    assert sampler.latest is not None and sampler.latest.skipped == {1: "GPU is lost"}
    assert [g["index"] for g in sampler.state()] == [0]
    assert logs.of("warning") == ["GPU unavailable, its series are dropped"]  # once, not per tick

    gpus[1].lost_after = None  # back (after a reset)
    await until(lambda: sampler.latest is not None and not sampler.latest.skipped)
    assert "llmtap_gpu_memory_total_bytes" in series_of(scrape(sampler), "1")
    assert "GPU available again" in logs.of("info")


# -- NVML unavailable -----------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "level"), [("auto", "warning"), ("on", "error")])
async def test_library_missing_then_retry_succeeds(mode: str, level: str, logs: LogRecorder,
                                                   running: Any) -> None:
    fake = FakeNvml(two_gpus(), init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    sampler = GpuSampler(interval=0.005, mode=mode, nvml=fake, max_backoff=0.02)
    task = running(sampler)
    await until(lambda: fake.calls["nvmlInit"] >= 4)

    assert scrape(sampler) == {("llmtap_gpu_up", ()): 0.0}  # and no other gpu series
    assert sampler.state() == []
    assert sampler.latest is not None and "NVML Shared Library Not Found" in str(
        sampler.latest.error)
    assert logs.of(level) == [
        "GPU metrics unavailable: NVML not usable; retrying in the background"]

    fake.init_error = None  # the driver shows up (device plugin, late module load)
    await until(lambda: sampler.latest is not None and sampler.latest.up)
    got = scrape(sampler)
    assert got[("llmtap_gpu_up", ())] == 1
    assert value(got, "llmtap_gpu_memory_total_bytes", "1") == 24 * GiB
    assert "NVML available" in logs.of("info")
    assert not task.done()


async def test_retry_backs_off(running: Any) -> None:
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    sampler = GpuSampler(interval=0.01, nvml=fake, max_backoff=0.16)
    running(sampler)
    await asyncio.sleep(0.5)
    # Without backoff: ~50 attempts. With it: 0.01, 0.02, 0.04, 0.08, then every 0.16 s.
    assert 3 <= fake.calls["nvmlInit"] <= 10


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    sampler = GpuSampler()
    sample = sampler.sample_once()
    assert not sample.up
    assert "pip install nvidia-ml-py" in str(sample.error)


async def test_enumeration_failure_is_down_and_reinitialises() -> None:
    fake = FakeNvml(two_gpus(), count_error=pynvml.NVML_ERROR_UNKNOWN)
    sampler = GpuSampler(nvml=fake)
    sample = await sampler.sample()
    assert not sample.up and "listing GPUs failed" in str(sample.error)
    assert scrape(sampler) == {("llmtap_gpu_up", ()): 0.0}
    assert fake.refcount == 0  # released, so the next tick starts from a fresh nvmlInit

    fake.count_error = None
    assert (await sampler.sample()).up
    assert fake.calls["nvmlInit"] == 2


# -- decoding ---------------------------------------------------------------------------------

def test_throttle_bits_match_the_real_constants() -> None:
    for reason, bit in THROTTLE_REASONS:
        camel = "".join(part.capitalize() for part in reason.split("_"))
        assert getattr(pynvml, f"nvmlClocksEventReason{camel}") == bit
        assert getattr(pynvml, f"nvmlClocksThrottleReason{camel}") == bit


@pytest.mark.parametrize("old_driver", [False, True])
async def test_throttle_reasons_decoded_one_series_each(old_driver: bool) -> None:
    gpus = two_gpus()
    gpus[0].clocks_event_reasons = (pynvml.nvmlClocksEventReasonSwPowerCap
                                    | pynvml.nvmlClocksEventReasonHwThermalSlowdown)
    gpus[1].clocks_event_reasons = 0
    fake = FakeNvml(gpus, old_driver=old_driver)
    sampler = GpuSampler(nvml=fake)
    await sampler.sample()
    await sampler.sample()
    got = scrape(sampler)

    active = {r for r, _ in THROTTLE_REASONS
              if value(got, "llmtap_gpu_throttled", "0", reason=r) == 1}
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    for reason, _ in THROTTLE_REASONS:  # every reason always present, so none flaps
        assert value(got, "llmtap_gpu_throttled", "1", reason=reason) == 0
    # The fallback is found once, then used directly.
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == (4 if old_driver else 0)
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == (1 if old_driver else 4)


async def test_energy_is_a_counter_in_joules() -> None:
    gpus = two_gpus()
    sampler = GpuSampler(nvml=FakeNvml(gpus))
    await sampler.sample()
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert families["llmtap_gpu_energy_joules"].type == "counter"
    assert value(scrape(sampler), "llmtap_gpu_energy_joules_total", "0") == 5000

    gpus[0].energy += 2_500  # 2.5 J later
    await sampler.sample()
    assert value(scrape(sampler), "llmtap_gpu_energy_joules_total", "0") == 5002.5


async def test_process_memory_biggest_first_capped_with_proc_names() -> None:
    me = os.getpid()
    my_name = comm(me)
    nowhere = NO_SUCH_PID
    gpu = FakeGpu(compute_processes=[(100_000 + i, (i + 1) * MiB) for i in range(40)]
                  + [(me, 64 * GiB), (nowhere, 32 * GiB), (5_000_000, None)],
                  graphics_processes=[(me, 64 * GiB)])  # C+G: the same process listed twice
    sampler = GpuSampler(nvml=FakeNvml([gpu]), max_processes=32)
    sample = await sampler.sample()
    got = scrape(sampler)

    procs = {(dict(labels)["pid"], dict(labels)["process"]): v for (name, labels), v
             in got.items() if name == "llmtap_gpu_process_memory_bytes"}
    assert len(procs) == 32
    assert procs[(str(me), my_name)] == 64 * GiB
    assert procs[(str(nowhere), "unknown")] == 32 * GiB
    assert min(procs.values()) == 11 * MiB  # the 30 biggest of the 40 others: 40 … 11 MiB
    assert [p.memory_bytes for p in sample.gpus[0].processes or ()][:3] == [
        64 * GiB, 32 * GiB, 40 * MiB]


async def test_unknown_process_memory_is_kept_but_not_exported() -> None:
    gpu = FakeGpu(compute_processes=[(5_000_000, None)])
    sampler = GpuSampler(nvml=FakeNvml([gpu]))
    sample = await sampler.sample()
    assert sample.gpus[0].processes is not None
    assert [p.memory_bytes for p in sample.gpus[0].processes] == [None]
    assert not any(n == "llmtap_gpu_process_memory_bytes" for n, _ in scrape(sampler))


# -- the event loop and the lifecycle -------------------------------------------------------------

async def test_run_never_blocks_the_event_loop(running: Any) -> None:
    fake = FakeNvml(two_gpus(), delays={"nvmlDeviceGetCount": 0.5})
    sampler = GpuSampler(interval=60, nvml=fake)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    running(sampler)
    await until(lambda: sampler.latest is not None)
    ticking.cancel()
    # ~50 ticks fit in the 0.5 s NVML call; a blocked loop would manage 1 or 2.
    assert ticks >= 20
    assert sampler.latest is not None and sampler.latest.up


async def test_cancel_and_close_release_nvml(running: Any) -> None:
    fake = FakeNvml(two_gpus())
    sampler = GpuSampler(interval=0.01, nvml=fake)
    task = running(sampler)
    await until(lambda: sampler.latest is not None)
    assert fake.refcount == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.refcount == 0
    assert fake.calls["nvmlShutdown"] == 1

    other = GpuSampler(interval=0.01, nvml=(fake2 := FakeNvml()))
    task2 = running(other)
    await until(lambda: other.latest is not None)
    await other.close()
    await asyncio.wait_for(task2, 1)  # run() returns on close()
    await other.close()  # idempotent
    assert fake2.refcount == 0 and fake2.calls["nvmlShutdown"] == 1


async def test_mode_off_touches_nothing_and_exports_nothing() -> None:
    fake = FakeNvml(two_gpus())
    sampler = GpuSampler(mode="off", nvml=fake)
    await asyncio.wait_for(sampler.run(), 1)  # returns at once
    assert not sampler.sample_once().up
    assert scrape(sampler) == {}
    assert sampler.state() == []
    assert sum(fake.calls.values()) == 0


def test_nothing_exported_before_the_first_sample() -> None:
    assert scrape(GpuSampler(nvml=FakeNvml())) == {}


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="off, auto, on"):
        GpuSampler(mode="maybe")


# -- `llmtap gpu` ---------------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmtap")
    add_gpu_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_gpu_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    gpus = two_gpus()
    gpus[1].errors = {"nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NOT_SUPPORTED}
    assert run_gpu_command(parse("gpu"), nvml=FakeNvml(gpus)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "NVML driver 550.54.15, 2 GPU(s)"
    header = lines[1]
    assert header.split()[:4] == ["GPU", "NAME", "UUID", "UTIL"]
    row0, row1 = lines[2], lines[3]
    assert row0.index("45 %") == row1.index("90 %") == header.index("UTIL")  # aligned
    assert "NVIDIA H100 80GB HBM3" in row0 and "10.0 GiB" in row0 and "123.5 W" in row0
    assert "1980 MHz" in row0 and "sw_power_cap" in row1
    assert str(NO_SUCH_PID) in out and "8192 MiB" in out  # the process table
    assert "GPU 1 power: Not Supported" in out
    assert err == ""


def test_gpu_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_gpu_command(parse("gpu", "--json"), nvml=FakeNvml(two_gpus())) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["up"] is True
    first = doc["gpus"][0]
    assert first["memory_total_bytes"] == 80 * GiB
    assert first["power_watts"] == pytest.approx(123.456)
    assert first["sm_clock_hertz"] == 1.98e9
    assert first["energy_joules"] == 5000
    assert first["throttled"]["sw_power_cap"] is False
    assert doc["gpus"][1]["throttled"]["sw_power_cap"] is True
    assert first["processes"] == [
        {"pid": NO_SUCH_PID, "name": "unknown", "memory_bytes": 8 * GiB}]


def test_gpu_command_nvml_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert run_gpu_command(parse("gpu"), nvml=fake) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("NVML not available: NVML Shared Library Not Found (libnvidia-ml.so.1 could "
                   "not be loaded). Is the NVIDIA driver installed and the GPU visible to this "
                   "container?\n")


def test_gpu_command_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_gpu_command(parse("gpu"), nvml=FakeNvml([])) == 1
    assert "sees no GPU" in capsys.readouterr().err


# -- the real pynvml ------------------------------------------------------------------------------

def test_real_pynvml(capsys: pytest.CaptureFixture[str]) -> None:
    """CI has no NVIDIA driver: the real binding must give gpu_up 0 and a clean message.
    On a machine with one, the same test checks the real GPUs are read."""
    sampler = GpuSampler()
    sampler.latest = sample = sampler.sample_once()
    sampler.shutdown()
    got = scrape(sampler)
    code = run_gpu_command(parse("gpu"))
    out, err = capsys.readouterr()
    if sample.up:  # a GPU machine
        assert sample.gpus and got[("llmtap_gpu_up", ())] == 1
        assert code == 0 and sample.gpus[0].name in out
        return
    assert got == {("llmtap_gpu_up", ()): 0.0}
    assert code == 1 and out == ""
    assert err.startswith("NVML not available: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_real_pynvml_cli_process_is_clean() -> None:
    """The same through a fresh interpreter: no traceback, no log noise, one line."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, argparse; from exporter.gpu import run_gpu_command;"
                               "sys.exit(run_gpu_command(argparse.Namespace(json=False)))"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode == 0:  # a GPU machine
        assert proc.stdout.startswith("NVML driver ")
        return
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("NVML not available: NVML Shared Library Not Found")
    assert proc.stderr.count("\n") == 1
