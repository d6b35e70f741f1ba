"""A fake `pynvml` module (nvidia-ml-py) for tests on machines without an NVIDIA driver.

Faithful where the sampler can tell the difference: the same function names and signatures,
the constants and error classes taken from the REAL `pynvml` (importing it needs no driver, only
nvmlInit fails), the real ctypes structures as return values (`c_nvmlMemory_t`,
`c_nvmlUtilization_t`), process entries as the real `nvmlFriendlyObject` with `usedGpuMemory`
None when NVML cannot tell, and values in NVML's own units: bytes, percent, °C, milliwatts,
MHz, millijoules. Like the C library, every call before nvmlInit (or after the matching
nvmlShutdown) raises NVMLError_Uninitialized.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml as real

GiB = 2**30


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    utilization: int = 0  # percent, like c_nvmlUtilization_t.gpu
    memory_utilization: int = 0  # percent
    memory_total: int = 80 * GiB  # bytes
    memory_used: int = 0  # bytes
    temperature: int = 40  # °C
    power_usage: int = 100_000  # mW
    power_limit: int = 700_000  # mW
    sm_clock: int = 1980  # MHz
    clocks_event_reasons: int = 0  # nvmlClocksEventReason* bitmask
    energy: int = 0  # mJ since the driver was loaded
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, B)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    # NVML function name → NVML_ERROR_* code that call raises on this GPU.
    errors: dict[str, int] = field(default_factory=dict)
    # After this many calls on this GPU every further call raises NVMLError_GpuIsLost.
    lost_after: int | None = None
    calls: int = 0


@dataclass(frozen=True)
class FakeHandle:
    """Stands in for the opaque c_nvmlDevice_t pointer."""

    index: int


def _exports() -> dict[str, Any]:
    prefixes = ("NVML_", "NVMLError", "nvmlClocksEventReason", "nvmlClocksThrottleReason")
    names = [n for n in dir(real) if n.startswith(prefixes)]
    return {n: getattr(real, n) for n in names} | {
        "NVMLLibraryMismatchError": real.NVMLLibraryMismatchError,
        "nvmlFriendlyObject": real.nvmlFriendlyObject,
        "c_nvmlMemory_t": real.c_nvmlMemory_t,
        "c_nvmlUtilization_t": real.c_nvmlUtilization_t,
    }


class FakeNvml(ModuleType):
    """A module object: pass it as `GpuSampler(nvml=FakeNvml(...))`.

    init_error: NVML_ERROR_* code nvmlInit raises (e.g. NVML_ERROR_LIBRARY_NOT_FOUND); set it
    back to None and the next init succeeds. count_error: code nvmlDeviceGetCount raises.
    old_driver: the driver predates nvmlDeviceGetCurrentClocksEventReasons (R535), which then
    raises NVMLError_FunctionNotFound, as the real binding does. delays: function name →
    seconds that call sleeps (a slow or sick driver).
    """

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None,
                 count_error: int | None = None, old_driver: bool = False,
                 delays: dict[str, float] | None = None,
                 driver_version: str = "550.54.15") -> None:
        super().__init__("pynvml")
        for name, value in _exports().items():
            setattr(self, name, value)
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.count_error = count_error
        self.old_driver = old_driver
        self.delays = delays or {}
        self.driver_version = driver_version
        self.refcount = 0  # nvmlInit minus nvmlShutdown, as the C library counts them
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------------

    def _enter(self, fn: str) -> None:
        with self._lock:
            self.calls[fn] += 1
        if (delay := self.delays.get(fn)) is not None:
            time.sleep(delay)
        if self.refcount <= 0 and fn != "nvmlInit":
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, fn: str, handle: FakeHandle) -> FakeGpu:
        self._enter(fn)
        gpu = self.gpus[handle.index]
        gpu.calls += 1
        if gpu.lost_after is not None and gpu.calls > gpu.lost_after:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        if (code := gpu.errors.get(fn)) is not None:
            raise real.NVMLError(code)  # maps to the matching real subclass
        return gpu

    # -- library -----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        if self.count_error is not None:
            raise real.NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        handle = FakeHandle(index)
        self._gpu("nvmlDeviceGetHandleByIndex", handle)  # a lost GPU fails here too
        return handle

    # -- device fields -----------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return real.c_nvmlUtilization_t(gpu=gpu.utilization, memory=gpu.memory_utilization)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return real.c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used,
                                   used=gpu.memory_used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_usage

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        if type != real.NVML_CLOCK_SM:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)  # only SM is modelled
        return gpu.sm_clock

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle)
        if self.old_driver:
            raise real.NVMLError(real.NVML_ERROR_FUNCTION_NOT_FOUND)
        return gpu.clocks_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons",
                         handle).clocks_event_reasons

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        return [_process(pid, used) for pid, used in gpu.compute_processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetGraphicsRunningProcesses", handle)
        return [_process(pid, used) for pid, used in gpu.graphics_processes]


def _process(pid: int, used: int | None) -> Any:
    # The real binding builds these from c_nvmlProcessInfo_v3_t and turns
    # NVML_VALUE_NOT_AVAILABLE into None.
    return real.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used,
                                    "gpuInstanceId": 0xFFFFFFFF,
                                    "computeInstanceId": 0xFFFFFFFF})
