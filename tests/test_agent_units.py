"""The agent's parts without a running agent: options, GPU plan, telemetry, fd I/O, feed depth,
and the helpers that put outcomes into words."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import importlib.metadata
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta.agent import spawn, supervisor
from batuta.agent.code import SlotCode
from batuta.agent.execute import OUTPUT_CAP, _CappedBuffer, describe_exception, describe_exit, one_line
from batuta.agent.main import check_host, device_order_warning, plan_gpu_slots, visible_devices_warning
from batuta.agent.options import GpuSelection, parse_args
from batuta.agent.outbox import Flusher
from batuta.agent.spawn import spawn_mode
from batuta.agent.telemetry import (
    FakeTelemetry,
    SystemTelemetry,
    _sm_count,
    open_telemetry,
    package_versions,
)
from batuta.core.task import KernelCall
from batuta.errors import UsageError
from batuta.protocol.codec import FrameDecoder, encode_message
from batuta.protocol.messages import Done, GpuInfo, Run, SlotChanged, SlotInfo, TaskOutcome, TaskRequest
from batuta.transport.base import Buffer
from batuta.transport.fdio import PIPE_BYTES, FdReader, FdWriter, widen_pipe

# -- when the outbox goes out ---------------------------------------------------------------


async def test_flusher_writes_at_the_end_of_the_pass_and_lets_what_may_wait_wait() -> None:
    loop = asyncio.get_running_loop()
    writes: list[int] = []

    def flush() -> None:
        flusher.began()
        writes.append(len(writes))

    flusher = Flusher(flush, delay_s=60.0)
    flusher.soon(loop, wait=True)  # a busy slot's result: may wait
    for _ in range(3):
        await asyncio.sleep(0)
    assert writes == [] and flusher.planned
    flusher.soon(loop)  # something that may not wait takes it along, at the end of this pass
    flusher.soon(loop, wait=True)
    flusher.soon(loop)
    await asyncio.sleep(0)
    assert writes == [0] and not flusher.planned  # one write; the waiting one's timer is gone
    flusher.stop()
    flusher.soon(loop)
    flusher.soon(loop, wait=True)
    await asyncio.sleep(0)
    assert writes == [0] and not flusher.planned

    went = loop.create_future()

    def flush_alone() -> None:
        alone.began()
        went.set_result(True)

    alone = Flusher(flush_alone, delay_s=0.001)
    alone.soon(loop, wait=True)  # with nothing else coming, it goes by itself
    await asyncio.wait_for(went, 10.0)
    assert not alone.planned


# -- options ------------------------------------------------------------------------------


def test_defaults() -> None:
    options = parse_args(["--stdio"])
    assert options.cpu_slots == os.cpu_count()
    assert options.gpus == GpuSelection(mode="auto")
    assert options.kernel_modules == () and options.name is None


def test_all_options() -> None:
    options = parse_args(
        ["--stdio", "--slots", "0", "--gpus", "1,0,1", "--kernel-module", "a.b", "--kernel-module", "c", "--name", "n1"]
    )
    assert options.cpu_slots == 0
    assert options.gpus == GpuSelection(mode="list", indices=(1, 0))
    assert options.kernel_modules == ("a.b", "c")
    assert options.name == "n1"
    assert parse_args(["--stdio", "--gpus", "none"]).gpus.mode == "none"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--stdio", "--slots", "x"],
        ["--stdio", "--slots", "-2"],
        ["--stdio", "--gpus", "0,a"],
        ["--stdio", "--kernel-module", "1bad"],
        ["--stdio", "--name", " "],
        ["--stdio", "--what"],
    ],
)
def test_bad_options_raise_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert "\n" not in str(info.value)


# -- GPU plan -----------------------------------------------------------------------------

REAL = (
    GpuInfo(index=0, name="H100", uuid="GPU-aaaa-1111"),
    GpuInfo(index=1, name="H100", uuid="GPU-bbbb-2222"),
)


def _planned(selection: GpuSelection, env: dict[str, str], gpus: tuple[GpuInfo, ...] = REAL) -> list[Any]:
    return [(g.index, e["CUDA_VISIBLE_DEVICES"]) for g, e in plan_gpu_slots(selection, gpus, "", env)]


def test_auto_gives_every_gpu_pinned_by_uuid() -> None:
    assert _planned(GpuSelection(mode="auto"), {}) == [(0, "GPU-aaaa-1111"), (1, "GPU-bbbb-2222")]
    plan = plan_gpu_slots(GpuSelection(mode="auto"), REAL, "", {})
    assert all(env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for _, env in plan)
    # per-thread default streams, so the slot's uploader overlaps its kernels; the user's choice wins
    assert all(env["CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM"] == "1" for _, env in plan)
    chosen = plan_gpu_slots(GpuSelection(mode="auto"), REAL, "", {"CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM": "0"})
    assert all(env["CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM"] == "0" for _, env in chosen)


@pytest.mark.parametrize(
    "user",
    [
        {},
        {"CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM": "1"},  # the user's, though the agent's value too
        {"CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM": "0", "NUMBA_CUDA_MEMORY_MANAGER": "rmm.allocators.numba"},
    ],
    ids=["agent's", "user's stream", "user's both"],
)
def test_a_binary_on_a_gpu_slot_gets_the_users_cuda_settings_not_the_agents(user: dict[str, str]) -> None:
    """The per-thread default stream and memory manager the agent sets for its numba kernels
    went into every binary's environment; a binary gets the user's, and its GPU alone."""
    from batuta.agent.slot import binary_env

    base = {"PATH": "/usr/bin", **user}
    for gpu, overrides in plan_gpu_slots(GpuSelection(mode="auto"), REAL, "", base):
        slot = {**base, **overrides}
        assert slot["CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM"] == user.get(
            "CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "1"
        )  # the slot's kernels keep theirs
        assert binary_env(slot) == {**base, "CUDA_VISIBLE_DEVICES": gpu.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_gpu_slots_get_the_pooled_allocator_unless_the_user_chose_one() -> None:
    plan = plan_gpu_slots(GpuSelection(mode="auto"), REAL, "", {})
    assert [env["NUMBA_CUDA_MEMORY_MANAGER"] for _, env in plan] == ["batuta.kernels.cuda_memory"] * 2
    chosen = plan_gpu_slots(GpuSelection(mode="auto"), REAL, "", {"NUMBA_CUDA_MEMORY_MANAGER": "rmm.allocators.numba"})
    assert {env["NUMBA_CUDA_MEMORY_MANAGER"] for _, env in chosen} == {"rmm.allocators.numba"}


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", [1]),
        ("GPU-bbbb", [1]),
        ("1,0", [1, 0]),
        ("0,7,1", [0]),  # CUDA stops at the first device it cannot find
        ("", []),
        ("-1", []),
    ],
)
def test_auto_honours_cuda_visible_devices(visible: str, expected: list[int]) -> None:
    planned = _planned(GpuSelection(mode="auto"), {"CUDA_VISIBLE_DEVICES": visible})
    assert [index for index, _ in planned] == expected


def test_explicit_indices_and_none() -> None:
    assert _planned(GpuSelection(mode="list", indices=(1,)), {}) == [(1, "GPU-bbbb-2222")]
    assert _planned(GpuSelection(mode="none"), {}) == []
    with pytest.raises(UsageError, match="no GPU 5"):
        _planned(GpuSelection(mode="list", indices=(5,)), {})
    with pytest.raises(UsageError, match="no NVIDIA driver"):
        plan_gpu_slots(GpuSelection(mode="list", indices=(0,)), (), "no NVIDIA driver", {})


def test_explicit_indices_stay_within_cuda_visible_devices() -> None:
    """`gpus = [0, 1]` on a node whose batch scheduler set CUDA_VISIBLE_DEVICES=1 used GPU 0
    all the same (someone else's): only `auto` looked at the setting."""
    pick = GpuSelection(mode="list", indices=(1,))
    assert _planned(pick, {"CUDA_VISIBLE_DEVICES": "1"}) == [(1, "GPU-bbbb-2222")]
    assert _planned(pick, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}) == [(1, "GPU-bbbb-2222")]
    with pytest.raises(UsageError) as info:
        _planned(GpuSelection(mode="list", indices=(0, 1)), {"CUDA_VISIBLE_DEVICES": "1"})
    assert str(info.value) == (
        "--gpus 0,1: GPU 0 is not among those CUDA_VISIBLE_DEVICES='1' lets this agent use (1; a batch scheduler "
        'may have set it); list only those, or use gpus = "auto", which takes them all'
    )
    with pytest.raises(UsageError, match=r"CUDA_VISIBLE_DEVICES='' lets this agent use \(none; "):
        _planned(pick, {"CUDA_VISIBLE_DEVICES": ""})


MIXED = (
    GpuInfo(index=0, name="NVIDIA A100-SXM4-80GB", uuid="GPU-aaaa-1111"),
    GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb-2222"),
)


def test_a_numbered_cuda_visible_devices_on_mixed_gpus_is_warned_about_unless_pci_order() -> None:
    """CUDA reads "1" fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID; the agent reads it as
    NVML's (PCI) GPU 1. Among one model the two agree; among mixed ones the agent says so."""
    warning = device_order_warning(MIXED, {"CUDA_VISIBLE_DEVICES": "1"})
    assert warning is not None and "\n" not in warning
    assert warning.startswith("CUDA_VISIBLE_DEVICES='1' is read in PCI order (nvidia-smi's numbers)")
    assert "unset (FASTEST_FIRST)" in warning and "NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3" in warning
    assert warning.endswith("set CUDA_DEVICE_ORDER=PCI_BUS_ID beside it, or name the GPUs by UUID (nvidia-smi -L)")
    fastest = device_order_warning(MIXED, {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert fastest is not None and "CUDA_DEVICE_ORDER FASTEST_FIRST CUDA numbers" in fastest
    quiet = [
        (MIXED, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        (MIXED, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}),  # a UUID names one GPU in any order
        (MIXED, {}),
        (REAL, {"CUDA_VISIBLE_DEVICES": "1"}),  # one model: the orders agree
        (FakeTelemetry(2).gpu_infos(), {"CUDA_VISIBLE_DEVICES": "1"}),  # CUDA never sees fake GPUs
    ]
    assert [device_order_warning(gpus, env) for gpus, env in quiet] == [None] * len(quiet)


def test_a_cuda_visible_devices_that_stops_short_is_warned_about_naming_the_entry() -> None:
    """A MIG instance, or a number or UUID naming no GPU NVML reads here (a GPU fenced off from
    this process, a typo): CUDA, and so the agent, take no GPU from that entry on. The agent
    offered no GPU slot, or fewer, and said nothing; a GPU task then failed "no slot offers gpu"."""
    mig = "MIG-3b2c5d1e-0000-5a1b-9c4d-123456789abc"
    warning = visible_devices_warning(REAL, {"CUDA_VISIBLE_DEVICES": mig})
    assert warning == (
        f"CUDA_VISIBLE_DEVICES={mig!r} names MIG instances ({mig}), and batuta runs GPU slots on whole GPUs only, "
        "so no GPU slot from there on; name whole GPUs (nvidia-smi -L) or disable MIG on them"
    )
    fenced = visible_devices_warning(REAL[1:], {"CUDA_VISIBLE_DEVICES": "0"})  # NVML cannot open GPU 0
    assert fenced == (
        "CUDA_VISIBLE_DEVICES='0': 0 is no GPU NVML can read here (GPUs: 1), so no GPU slot from there on, as "
        "CUDA would use none; name GPUs by nvidia-smi's numbers or UUIDs (nvidia-smi -L)"
    )
    partial = visible_devices_warning(REAL, {"CUDA_VISIBLE_DEVICES": "1,GPU-cccc"})
    assert partial is not None and partial.startswith("CUDA_VISIBLE_DEVICES='1,GPU-cccc': GPU-cccc is no GPU NVML")
    quiet = [
        {},
        {"CUDA_VISIBLE_DEVICES": ""},  # hidden on purpose
        {"CUDA_VISIBLE_DEVICES": "-1"},
        {"CUDA_VISIBLE_DEVICES": "NoDevFiles"},  # an old Slurm's, for a job given no GPU
        {"CUDA_VISIBLE_DEVICES": "1,0"},
        {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"},
    ]
    assert [visible_devices_warning(REAL, env) for env in quiet] == [None] * len(quiet)


def test_the_agent_says_why_cuda_visible_devices_left_it_no_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATUTA_FAKE_GPUS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0000")
    check_host(parse_args(["--stdio", "--slots", "1", "--gpus", "auto"]))
    assert capsys.readouterr().err == (
        "batuta agent: warning: CUDA_VISIBLE_DEVICES='MIG-0000' names MIG instances (MIG-0000), and batuta runs "
        "GPU slots on whole GPUs only, so no GPU slot from there on; name whole GPUs (nvidia-smi -L) or disable MIG "
        "on them\n"
    )
    check_host(parse_args(["--stdio", "--slots", "1", "--gpus", "none"]))  # GPUs left out on purpose
    assert capsys.readouterr().err == ""


def test_fake_gpus_are_pinned_by_index() -> None:
    fake = FakeTelemetry(2).gpu_infos()
    assert _planned(GpuSelection(mode="auto"), {}, fake) == [(0, "0"), (1, "1")]


# -- telemetry ----------------------------------------------------------------------------


def test_fake_telemetry_is_deterministic() -> None:
    first, second = FakeTelemetry(3), FakeTelemetry(3)
    samples = [first.sample() for _ in range(4)]
    assert samples == [second.sample() for _ in range(4)]
    assert [len(s.gpus) for s in samples] == [3] * 4
    assert samples[0] != samples[1]  # readings move between samples
    for sample in samples:
        assert 0 < sample.memory_used < sample.memory_total
        for gpu in sample.gpus:
            assert gpu.utilization is not None and 0 <= gpu.utilization <= 100
            assert gpu.memory_used is not None and gpu.memory_total is not None
            assert gpu.memory_used < gpu.memory_total
    assert FakeTelemetry(0).sample().gpu_status


def test_open_telemetry_selects_by_environment() -> None:
    assert isinstance(open_telemetry({"BATUTA_FAKE_GPUS": "2"}), FakeTelemetry)
    with pytest.raises(ValueError, match="BATUTA_FAKE_GPUS"):
        open_telemetry({"BATUTA_FAKE_GPUS": "lots"})
    with pytest.raises(ValueError, match=r"BATUTA_FAKE_GPUS='99999': expected a GPU count from 0 to 64"):
        open_telemetry({"BATUTA_FAKE_GPUS": "99999"})  # one slot process each: the start hung
    real = open_telemetry({})
    try:
        assert isinstance(real, SystemTelemetry)
    finally:
        real.close()


def test_system_telemetry_never_raises() -> None:
    telemetry = SystemTelemetry()
    try:
        sample = telemetry.sample()
        assert sample.memory_total > 0
        if telemetry.gpu_infos():
            assert len(sample.gpus) == len(telemetry.gpu_infos())
        else:
            assert sample.gpus == () and sample.gpu_status
    finally:
        telemetry.close()
        telemetry.close()  # twice is fine


def test_package_versions_match_importlib_metadata() -> None:
    versions = package_versions()
    for name in ("msgpack", "psutil", "numpy"):
        assert versions[name] == importlib.metadata.version(name)
    assert "no-such-distribution" not in package_versions(("no-such-distribution",))


# -- spawn mode ---------------------------------------------------------------------------


def test_spawn_mode() -> None:
    assert spawn_mode({"BATUTA_SLOT_SPAWN": "exec"}) == "exec"
    assert spawn_mode({}) in ("fork", "exec")


def _read_to_end(fd: int, timeout: float = 60.0) -> bytes:
    """What `fd` gives until its end, waiting at most `timeout` s for each read."""
    data = b""
    while select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no end of the stderr pipe in {timeout} s; read {data!r}")


def test_a_forked_slot_that_cannot_start_says_why_on_its_stderr_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reads a starting slot's stderr (slot_stderr.py): a forked slot's fd 2 is that
    pipe before anything else runs in it, so its traceback, and exit code 70, reach it."""

    def cannot_start(*_: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spawn, "_forked_child", cannot_start)  # runs in the child only
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # fd 2, as in an agent (not pytest's capture)
    proc, to_slot, from_slot, stderr = spawn.spawn_slot(slot=0, env={}, kernel_modules=(), mode="fork", code=SlotCode())
    try:
        assert proc.wait(timeout=60) == 70
        lines = _read_to_end(stderr).decode().strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert lines[-1] == "OSError: [Errno 24] Too many open files"
    finally:
        for fd in (to_slot, from_slot, stderr):
            os.close(fd)


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_a_ready_slot_writes_to_the_agents_stderr_not_the_pipe(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once ready, a slot writes to the agent's stderr, not to the pipe the agent reads: a
    kernel printing much then slows itself, not the agent passing its every line on. (The
    pipe stays open for a fatal signal's dump alone, `slot_stderr.py`: nothing else comes.)"""
    if mode == "fork" and spawn_mode({}) != "fork":
        pytest.skip("no fork here")
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    modules = ("tests.support.misbehaving_kernels",)
    for name in ("stdout", "stderr"):  # fds 1 and 2, as in an agent (a forked slot closes pytest's capture)
        monkeypatch.setattr(sys, name, getattr(sys, f"__{name}__"))
    proc, to_slot, from_slot, stderr = spawn.spawn_slot(
        slot=0, env=env, kernel_modules=modules, mode=mode, code=SlotCode()
    )
    try:
        decoder = FrameDecoder()

        def next_message() -> object:
            while (message := decoder.next_message()) is None:
                assert select.select([from_slot], [], [], 60)[0], "the slot said nothing in 60 s"
                decoder.feed(os.read(from_slot, 65536))
            return message

        message = next_message()
        assert isinstance(message, SlotChanged) and message.state == "up"
        call = KernelCall(name="test_print", args=(5,))
        os.write(to_slot, encode_message(Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=call),))))
        while not isinstance(message := next_message(), Done):
            pass
        assert [(o.task_id, o.value, o.error) for o in message.results] == [
            (1, 5, None)
        ]  # it printed, to the agent's stderr
        os.close(to_slot)  # its input ends: it exits
        assert proc.wait(timeout=60) == 0
        assert _read_to_end(stderr) == b""  # nothing came through the pipe
    finally:
        for fd in (from_slot, stderr):
            os.close(fd)


# -- fd I/O -------------------------------------------------------------------------------


async def test_fd_writer_buffers_what_the_pipe_refuses() -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    payload = os.urandom(3 * 1024 * 1024)  # far more than a pipe holds
    received = bytearray()
    eof = asyncio.Event()

    def on_data(data: bytes) -> None:
        received.extend(data)
        if not data:
            eof.set()

    writer = FdWriter(loop, write_fd)
    writer.write(payload[:100])
    writer.write(memoryview(payload)[100:])
    assert writer.buffered > 0
    reader = FdReader(loop, read_fd, on_data)
    await asyncio.wait_for(writer.drain(), 10)
    assert writer.buffered == 0
    writer.close()
    await asyncio.wait_for(eof.wait(), 10)
    reader.close()
    assert bytes(received) == payload


@pytest.mark.parametrize("count", [3, 2000])  # 2000 parts: more than one writev takes
async def test_fd_writer_write_parts_sends_the_parts_in_order_across_partial_writes(count: int) -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    rng = np.random.default_rng(count)
    sizes = rng.integers(0, 4096, size=count)
    sizes[0] = 0  # empty parts are skipped
    parts: list[Buffer] = [rng.bytes(int(n)) for n in sizes]
    parts.append(np.arange(300_000, dtype=np.float64).view(np.uint8))  # an array, more than a pipe holds
    parts.append(memoryview(b"tail"))
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    received = bytearray()
    eof = asyncio.Event()

    def on_data(data: bytes) -> None:
        received.extend(data)
        if not data:
            eof.set()

    writer = FdWriter(loop, write_fd)
    writer.write_parts(parts)
    writer.write(b"after")  # queued behind whatever the pipe refused
    reader = FdReader(loop, read_fd, on_data)
    await asyncio.wait_for(writer.drain(), 10)
    writer.close()
    await asyncio.wait_for(eof.wait(), 10)
    reader.close()
    assert bytes(received) == payload + b"after"


async def test_fd_writer_reports_a_vanished_reader_once() -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    errors: list[OSError] = []
    writer = FdWriter(loop, write_fd, errors.append)
    writer.write(b"x")
    writer.write(b"y")
    assert len(errors) == 1 and isinstance(errors[0], BrokenPipeError)
    assert writer.failed
    await writer.drain()
    writer.close()


# -- feed depth ---------------------------------------------------------------------------


class _NoEvents:
    def task_started(self, task_id: int) -> None: ...

    def task_finished(self, outcome: TaskOutcome) -> None: ...

    def slot_changed(self, state: SlotChanged) -> None: ...


@pytest.mark.parametrize(
    ("mean_run_s", "depth"),
    [(None, 1), (0.0, 32), (0.05, 1), (4e-3, 2), (1e-3, 2), (0.4e-3, 3), (1e-5, 32), (1e-6, 32)],
)
async def test_feed_depth_follows_run_time(mean_run_s: float | None, depth: int) -> None:
    slot = supervisor.SlotSupervisor(
        info=SlotInfo(slot=0, capabilities=("cpu",)),
        env={},
        kernel_modules=(),
        events=_NoEvents(),
        loop=asyncio.get_running_loop(),
    )
    slot._run_time_mean = mean_run_s
    assert slot.depth() == depth


# -- words --------------------------------------------------------------------------------


def test_descriptions() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by signal 9 (SIGKILL)"
    assert describe_exception(ValueError("bad\ninput")) == "ValueError: bad input"
    assert describe_exception(KeyError()) == "KeyError"

    class Unsayable(Exception):  # a user's exception whose __str__ raises: its type still said
        def __str__(self) -> str:
            raise RuntimeError("str fails")

    assert describe_exception(Unsayable()) == "Unsayable: (its str() raised RuntimeError('str fails'))"
    long = "TypeError: " + "x" * 2000 + "; fix it like this"
    assert len(one_line(long)) == 1000
    assert one_line(long).startswith("TypeError: x") and one_line(long).endswith("x; fix it like this")
    assert " … " in one_line(long)


def test_capped_buffer_keeps_the_head_and_counts_the_rest() -> None:
    buffer = _CappedBuffer(10)
    buffer.add(b"12345")
    buffer.add(b"67890abc")
    buffer.add(b"def")
    value = buffer.value("stdout")
    assert value.startswith(b"1234567890\n")
    assert b"stdout truncated, 6 more bytes dropped" in value
    assert OUTPUT_CAP == 1 << 20


class _Nvml:
    """Just enough of pynvml for `_sm_count`."""

    def __init__(self, cores: int, capability: tuple[int, int], mig_sms: int | None = None) -> None:
        self.cores, self.capability, self.mig_sms = cores, capability, mig_sms

    def nvmlDeviceGetAttributes(self, handle: object) -> Any:
        if self.mig_sms is None:
            raise RuntimeError("NVML: not supported")
        return type("Attributes", (), {"multiprocessorCount": self.mig_sms})()

    def nvmlDeviceGetNumGpuCores(self, handle: object) -> int:
        return self.cores

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        return self.capability


@pytest.mark.parametrize(
    ("nvml", "sms"),
    [
        (_Nvml(16896, (9, 0)), 132),  # H100 SXM / H200, as NVML reports them
        (_Nvml(6912, (8, 0)), 108),  # A100
        (_Nvml(16384, (8, 9)), 128),  # RTX 4090
        (_Nvml(0, (9, 0), mig_sms=16), 16),  # a MIG instance
        (_Nvml(0, (9, 0)), 0),  # unknown
    ],
)
def test_sm_count(nvml: _Nvml, sms: int) -> None:
    assert _sm_count(nvml, object()) == sms


def test_package_versions_read_dist_info_and_egg_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "numba_cuda-0.20.1.dist-info",
        "prometheus_client-0.21.0.dist-info",
        "psutil-5.9.8.egg-info",
        "numpy-1.26.4-py3.12.egg-info",
        "msgpack.pth",
    ):
        (tmp_path / name).mkdir()
    monkeypatch.setattr("sys.path", [str(tmp_path)])
    assert package_versions(("numba-cuda", "prometheus-client", "psutil", "numpy", "msgpack")) == {
        "numba-cuda": "0.20.1",
        "prometheus-client": "0.21.0",
        "psutil": "5.9.8",
        "numpy": "1.26.4",
    }


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are a Linux feature")
def test_widen_pipe_gives_a_pipe_a_mebibyte_and_ignores_what_is_not_a_pipe(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        assert fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) < PIPE_BYTES
        widen_pipe(write_end)
        assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) == PIPE_BYTES  # one buffer, both ends
    finally:
        os.close(read_end)
        os.close(write_end)
    with open(tmp_path / "plain", "wb") as plain:
        widen_pipe(plain.fileno())  # not a pipe: no error, nothing changes


def test_an_agents_stderr_is_a_warning_but_for_detail_prints_and_the_bootstrap_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kernel prints and the launcher's "not installed here" (an install follows, saying so)
    read as faults at the console; a 100 KB line was one record."""
    import logging

    from batuta.transport.base import MAX_LINE_CHARS, log_stderr_line

    logger = logging.getLogger("batuta.transport.test")
    lines = [
        b"something went wrong\n",
        b"task 7 printed: hello\n",
        b"batuta bootstrap: this batuta is not installed here\n",
        b"Traceback (most recent call last):\n",
        b"x" * (MAX_LINE_CHARS + 5) + b"\n",
    ]
    with caplog.at_level(logging.DEBUG, logger="batuta.transport.test"):
        for line in lines:
            log_stderr_line(logger, "h1 agent[1]", line, None)
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.INFO, logging.INFO, logging.INFO, logging.WARNING]
    assert caplog.records[-1].getMessage().endswith("x … (5 more characters)")


def test_a_sticky_cuda_error_is_told_from_the_others() -> None:
    """After these the process's CUDA context is unusable (the slot restarts, slot.py)."""
    from batuta.kernels.cuda_support import GpuKernelError, lost_context

    class CudaAPIError(Exception):  # numba-cuda's shape: a code and a message
        def __init__(self, code: int, message: str) -> None:
            super().__init__(f"[{code}] {message}")
            self.code = code

    try:
        try:
            raise CudaAPIError(700, "Call to cuMemcpyDtoH results in UNKNOWN_CUDA_ERROR")
        except CudaAPIError as exc:
            raise GpuKernelError("kernel 'k' on GPU failed") from exc
    except GpuKernelError as wrapped:
        assert lost_context(wrapped) == "CUDA_ERROR_ILLEGAL_ADDRESS"  # found through the cause
    assert lost_context(RuntimeError("cuLaunchKernel: CUDA_ERROR_LAUNCH_FAILED")) == "CUDA_ERROR_LAUNCH_FAILED"
    assert lost_context(CudaAPIError(2, "CUDA_ERROR_OUT_OF_MEMORY")) == ""  # the context survives this one
    assert lost_context(ValueError("bad input")) == ""
