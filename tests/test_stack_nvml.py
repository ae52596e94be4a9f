"""`stack check`'s NVML facts where NVML refuses the process that asks: a CPU slot forked from
an agent that has NVML open (seen on an H100 host: "The operating system has blocked the
request"). A stand-in `pynvml` on the path refuses the test's own process, or every process,
as told by the environment; the fresh interpreter the facts are then read from imports it too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from batuta.stack.node_kernels import FAKE_GPUS_ENV, nvml_facts

FAKE_PYNVML = """
import os

NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_OPERATING_SYSTEM = 17


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return "The operating system has blocked the request."


def nvmlInit():
    if os.environ.get("FAKE_NVML_REFUSE") in ("all", str(os.getpid())):
        raise NVMLError(NVML_ERROR_OPERATING_SYSTEM)


def nvmlShutdown():
    pass


def nvmlSystemGetDriverVersion():
    return b"550.54.15"


def nvmlSystemGetCudaDriverVersion():
    return 12040


def nvmlDeviceGetCount():
    return 2


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetName(handle):
    return f"Stand-in H100 {handle}"
"""


@pytest.fixture
def stand_in_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv(FAKE_GPUS_ENV, raising=False)
    return tmp_path


def test_nvml_refused_to_this_process_is_read_from_a_fresh_one(
    stand_in_nvml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NVML_REFUSE", str(os.getpid()))
    facts = nvml_facts()
    assert facts["status"] == "ok", facts
    assert facts["gpus"] == ["Stand-in H100 0", "Stand-in H100 1"]
    assert (facts["driver"], facts["cuda_driver"]) == ("550.54.15", "12.4")


def test_nvml_refused_everywhere_says_the_first_error(stand_in_nvml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_REFUSE", "all")
    facts = nvml_facts()
    assert facts["status"] == "NVML failed to start: NVMLError: The operating system has blocked the request."
    assert facts["gpus"] == []


def test_nvml_that_starts_is_read_in_process(stand_in_nvml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_REFUSE", "nobody")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")  # a fresh interpreter would not find the stand-in
    assert nvml_facts()["gpus"] == ["Stand-in H100 0", "Stand-in H100 1"]
