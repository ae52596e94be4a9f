"""Host telemetry for `Hello` and `Heartbeat`: CPU and memory (psutil), GPUs (NVML).

Everything the agent reports about its machine goes through the small `TelemetrySource`
interface so that tests, CI and the TUI's snapshot tests can swap in `FakeTelemetry`
(selected with `BATUTA_FAKE_GPUS=N`): N fake GPUs whose readings are a pure function of
(GPU index, sample number), so two runs print the same numbers.

Sampling is cheap by construction, because it runs on the agent's event loop: psutil's
`cpu_percent(interval=None)` compares against the previous call instead of sleeping, and an
NVML query is a few microseconds. A host without a driver, without `nvidia-ml-py`, or where
one NVML field is unsupported never raises: the field becomes None and `gpu_status` says why.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from batuta.protocol.messages import GpuCache, GpuInfo, GpuSample, SlotInfo

FAKE_GPUS_ENV = "BATUTA_FAKE_GPUS"
MAX_FAKE_GPUS = 64  # test GPUs: more than a host has, far fewer than would not start

# Distributions reported in Hello.packages, for `batuta stack versions`.
REPORTED_PACKAGES = (
    "numpy",
    "numba",
    "llvmlite",
    "numba-cuda",
    "msgpack",
    "psutil",
    "nvidia-ml-py",
    "asyncssh",
    "textual",
    "prometheus-client",
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSample:
    """One reading of the host, as carried by a Heartbeat."""

    cpu_percent: float
    memory_used: int
    memory_total: int
    gpus: tuple[GpuSample, ...]
    gpu_status: str


class TelemetrySource(Protocol):
    """Where the agent's numbers come from. `sample()` must return within microseconds."""

    def gpu_infos(self) -> tuple[GpuInfo, ...]:
        """The GPUs seen at start (for Hello and for `--gpus auto`)."""
        ...

    def gpu_status(self) -> str:
        """Why there is no GPU data ("no NVIDIA driver"), or "" when there is."""
        ...

    def sample(self) -> HostSample:
        """Read CPU, memory and every GPU now."""
        ...

    def close(self) -> None:
        """Release NVML and the like."""
        ...


def open_telemetry(environ: dict[str, str] | None = None) -> TelemetrySource:
    """The source the agent should use: fake when `BATUTA_FAKE_GPUS` is set, else the system."""
    env = os.environ if environ is None else environ
    fake = env.get(FAKE_GPUS_ENV)
    if fake is not None and fake.strip() != "":
        try:
            count = int(fake)
        except ValueError:
            count = -1
        if not 0 <= count <= MAX_FAKE_GPUS:  # one slot process each: 99999 of them never started
            raise ValueError(f"{FAKE_GPUS_ENV}={fake!r}: expected a GPU count from 0 to {MAX_FAKE_GPUS}")
        return FakeTelemetry(count)
    return SystemTelemetry()


# -- GPU slots' device caches ---------------------------------------------------------------


class CachingSlot(Protocol):
    """A slot as `with_device_caches` reads it (the agent's `SlotSupervisor`)."""

    @property
    def info(self) -> SlotInfo: ...

    @property
    def gpu_cache(self) -> GpuCache | None: ...


def with_device_caches(gpus: tuple[GpuSample, ...], slots: Iterable[CachingSlot]) -> tuple[GpuSample, ...]:
    """`gpus` with each GPU's device cache: the latest GpuCache of every slot on that GPU
    (`SlotInfo.gpu_index`), summed (values, bytes, cap). A GPU whose slots hold a cache but
    which has no reading of its own (no NVML, the CUDA simulator) gets a sample carrying
    only the cache, so its bytes are never hidden."""
    totals: dict[int, tuple[int, int, int]] = {}
    for slot in slots:
        cache, index = slot.gpu_cache, slot.info.gpu_index
        if cache is None or index is None:
            continue
        values, nbytes, cap = totals.get(index, (0, 0, 0))
        totals[index] = (values + cache.values, nbytes + cache.nbytes, cap + cache.cap)
    if not totals:
        return gpus
    samples = []
    for sample in gpus:
        total = totals.pop(sample.index, None)
        if total is not None:
            sample = dataclasses.replace(sample, cached_values=total[0], cached_bytes=total[1], cache_cap=total[2])
        samples.append(sample)
    for index, (values, nbytes, cap) in sorted(totals.items()):
        samples.append(GpuSample(index=index, cached_values=values, cached_bytes=nbytes, cache_cap=cap))
    return tuple(samples)


# -- the real thing -------------------------------------------------------------------------


def _field(read: Callable[..., _T], *args: Any) -> _T | None:
    """One NVML field, `read(*args)`: a value, or None when NVML raises (unsupported, no
    permission, GPU lost), so one missing field never hides the others."""
    try:
        return read(*args)
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# FP32 cores per SM by CUDA compute capability (major, minor); major alone as the fallback.
_CORES_PER_SM = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}
_CORES_PER_SM_MAJOR = {5: 128, 6: 128, 7: 64, 8: 128, 9: 128, 10: 128, 12: 128}


def _sm_count(nvml: Any, handle: Any) -> int:
    """Streaming multiprocessors of a GPU, or 0 when NVML cannot tell.

    NVML's device attributes carry the count only for MIG instances (a full H200 answers
    "not supported"), so a whole GPU's count is its CUDA cores over the cores per SM of
    its compute capability (H100/H200: 16896 / 128 = 132).
    """
    attributes: Any = _field(nvml.nvmlDeviceGetAttributes, handle)
    mig_sms = getattr(attributes, "multiprocessorCount", None)
    if mig_sms:
        return int(mig_sms)
    cores = _field(nvml.nvmlDeviceGetNumGpuCores, handle)
    capability = _field(nvml.nvmlDeviceGetCudaComputeCapability, handle)
    if not cores or not capability:
        return 0
    major, minor = int(capability[0]), int(capability[1])
    per_sm = _CORES_PER_SM.get((major, minor)) or _CORES_PER_SM_MAJOR.get(major)
    return int(cores) // per_sm if per_sm else 0


class SystemTelemetry:
    """psutil for CPU and memory, NVML (module `pynvml` from nvidia-ml-py) for GPUs."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        # The first interval=None reading compares against process start and means nothing;
        # taking it now makes the first heartbeat's figure cover the first interval.
        psutil.cpu_percent(interval=None)
        self._nvml: Any = None
        self._handles: list[tuple[int, Any]] = []  # (NVML index, handle)
        self._infos: tuple[GpuInfo, ...] = ()
        self._status = self._open_nvml()

    def _open_nvml(self) -> str:
        try:
            import pynvml
        except ImportError:
            return "NVML not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
                return "no NVIDIA driver"
            return f"NVML failed to start: {exc}"
        except Exception as exc:  # a broken install must not take the agent down
            return f"NVML failed to start: {type(exc).__name__}: {exc}"
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:
            return f"NVML cannot count GPUs: {exc}"
        infos = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:
                continue
            self._handles.append((index, handle))
            memory = _field(pynvml.nvmlDeviceGetMemoryInfo, handle)
            infos.append(
                GpuInfo(
                    index=index,
                    name=_text(_field(pynvml.nvmlDeviceGetName, handle) or "NVIDIA GPU"),
                    uuid=_text(_field(pynvml.nvmlDeviceGetUUID, handle) or ""),
                    memory_total=int(memory.total) if memory is not None else 0,
                    compute_units=_sm_count(pynvml, handle),
                )
            )
        self._infos = tuple(infos)
        return "" if infos else "no NVIDIA GPU"

    def gpu_infos(self) -> tuple[GpuInfo, ...]:
        return self._infos

    def gpu_status(self) -> str:
        return self._status

    def sample(self) -> HostSample:
        memory = self._psutil.virtual_memory()
        return HostSample(
            cpu_percent=float(self._psutil.cpu_percent(interval=None)),
            # "used" as the kernel means it differs between psutil versions; total minus
            # available is what a person means by "memory in use".
            memory_used=int(memory.total - memory.available),
            memory_total=int(memory.total),
            gpus=tuple(self._sample_gpu(i, h) for i, h in self._handles),
            gpu_status=self._status,
        )

    def _sample_gpu(self, index: int, handle: Any) -> GpuSample:
        nvml = self._nvml
        utilization = _field(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _field(nvml.nvmlDeviceGetMemoryInfo, handle)
        temperature = _field(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = _field(nvml.nvmlDeviceGetPowerUsage, handle)
        return GpuSample(
            index=index,
            utilization=float(utilization.gpu) if utilization is not None else None,
            memory_used=int(memory.used) if memory is not None else None,
            memory_total=int(memory.total) if memory is not None else None,
            temperature=float(temperature) if temperature is not None else None,
            power=power_mw / 1000.0 if power_mw is not None else None,
        )

    def close(self) -> None:
        if self._nvml is not None:
            _field(self._nvml.nvmlShutdown)
            self._nvml = None


# -- the deterministic fake -----------------------------------------------------------------

_FAKE_MEMORY_TOTAL = 64 * 2**30
_FAKE_GPU_MEMORY = 80 * 2**30


class FakeTelemetry:
    """N fake GPUs (and a fake CPU and memory) whose readings depend only on (index, seq).

    Used by CI and the TUI snapshot tests, which need GPU numbers on machines without GPUs
    and the same numbers on every run. GPU `index` of sample `seq` is drawn from
    `random.Random("batuta-fake-gpu:<index>:<seq>")` (string seeds are stable across runs and
    Python versions), shaped to look like a busy accelerator.
    """

    def __init__(self, gpu_count: int) -> None:
        self._count = gpu_count
        self._seq = 0

    def gpu_infos(self) -> tuple[GpuInfo, ...]:
        return tuple(
            GpuInfo(
                index=i,
                name=f"Fake GPU {i}",
                uuid=f"FAKE-GPU-{i:08d}",  # not "GPU-...": nothing may pin a real device by it
                memory_total=_FAKE_GPU_MEMORY,
                compute_units=132,
            )
            for i in range(self._count)
        )

    def gpu_status(self) -> str:
        return "" if self._count else "no NVIDIA GPU (fake)"

    def sample(self) -> HostSample:
        seq = self._seq
        self._seq += 1
        host = random.Random(f"batuta-fake-host:{seq}")
        return HostSample(
            cpu_percent=round(host.uniform(5.0, 95.0), 1),
            memory_used=int(_FAKE_MEMORY_TOTAL * host.uniform(0.2, 0.6)),
            memory_total=_FAKE_MEMORY_TOTAL,
            gpus=tuple(fake_gpu_sample(i, seq) for i in range(self._count)),
            gpu_status=self.gpu_status(),
        )

    def close(self) -> None:
        pass


def fake_gpu_sample(index: int, seq: int) -> GpuSample:
    """The fake reading of GPU `index` at sample `seq` (exposed so tests can predict it)."""
    rng = random.Random(f"batuta-fake-gpu:{index}:{seq}")
    utilization = round(rng.uniform(0.0, 100.0), 1)
    return GpuSample(
        index=index,
        utilization=utilization,
        memory_used=int(_FAKE_GPU_MEMORY * rng.uniform(0.05, 0.95)),
        memory_total=_FAKE_GPU_MEMORY,
        temperature=round(35.0 + utilization * 0.4 + rng.uniform(0.0, 5.0), 1),
        power=round(70.0 + utilization * 6.0 + rng.uniform(0.0, 20.0), 1),
    )


# -- installed package versions -------------------------------------------------------------


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Versions of the installed distributions among `names`; absent ones are left out.

    Reads the metadata folder names on sys.path instead of importing the packages (or even
    importlib.metadata, which costs tens of milliseconds of agent start-up): installers name
    them `<name>-<version>.dist-info`, or `<name>-<version>[-pyX.Y].egg-info` (Debian's
    packages), with any "-" in the name written as "_". The first match on sys.path wins,
    as it does for imports.
    """
    wanted = {_normalise(n): n for n in names}
    found: dict[str, str] = {}
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        try:
            listing = os.listdir(entry)
        except OSError:
            continue
        for item in listing:
            if item.endswith(".dist-info"):
                stem = item[: -len(".dist-info")]
            elif item.endswith(".egg-info"):
                stem = item[: -len(".egg-info")]
            else:
                continue
            parts = stem.split("-")
            if len(parts) < 2:
                continue
            key = _normalise(parts[0])
            if key in wanted and wanted[key] not in found:
                found[wanted[key]] = parts[1]
        if len(found) == len(wanted):
            break
    return found
