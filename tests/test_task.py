"""The task model's own checks: what a caller gets wrong is a one-line TaskError with the fix."""

from __future__ import annotations

import inspect

import pytest

import batuta.core.task as task_module
from batuta import Backend, Task
from batuta.errors import TaskError


@pytest.mark.parametrize(("given", "expected"), [("gpu", Backend.GPU), ("CPU", Backend.CPU), (" auto ", Backend.AUTO)])
def test_a_backend_may_be_named_by_its_string(given: str, expected: Backend) -> None:
    assert Task.kernel("noop", 1, backend=given).backend is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("given", ["cuda", 3, None])
def test_an_unknown_backend_names_the_choices(given: object) -> None:
    with pytest.raises(TaskError, match=r"expected Backend\.CPU, Backend\.GPU, Backend\.SCALAR or Backend\.AUTO"):
        Task.kernel("noop", 1, backend=given)  # type: ignore[arg-type]


def test_a_kernel_task_needs_a_name() -> None:
    with pytest.raises(TaskError, match=r"needs a kernel name: Task\.kernel\('vadd', a, b\)"):
        Task.kernel("")


def test_a_failure_names_the_slot_once() -> None:
    from batuta import TaskResult, TaskStatus

    result = TaskResult(
        task_id=7, name="noop", status=TaskStatus.FAILED, error="boom", host="gpu1", slot="gpu1/3", attempts=1
    )
    assert result.describe_failure() == "task 7 (noop) failed on gpu1/3 after 1 attempt(s): boom"


def test_an_outcome_ends_the_task_unless_the_worker_crashed() -> None:
    from batuta.core.task import Outcome, TaskStatus

    # the values are the wire's (TaskOutcome.status): changing one needs a new PROTOCOL_VERSION
    assert {o.value: o.final_status() for o in Outcome} == {
        "ok": TaskStatus.SUCCEEDED,
        "error": TaskStatus.FAILED,
        "timeout": TaskStatus.TIMED_OUT,
        "cancelled": TaskStatus.CANCELLED,
        "crashed": None,  # only the attempt is lost: the scheduler retries, or resolves LOST
        "unfit": None,  # the host's failure: the task goes to another host (core/hostfit.py)
    }


def test_unwrap_says_when_no_slot_can_run_the_task() -> None:
    from batuta import TaskFailedError, TaskResult, TaskStatus
    from batuta.errors import NoCapableSlotError

    why = "no slot offers gpu (the cluster offers: cpu); add such a host or change the task's backend"
    unschedulable = TaskResult(task_id=3, name="vadd", status=TaskStatus.UNSCHEDULABLE, error=why)
    with pytest.raises(NoCapableSlotError, match="no slot offers gpu") as caught:
        unschedulable.unwrap()
    assert isinstance(caught.value, TaskFailedError) and caught.value.result is unschedulable
    failed = TaskResult(task_id=4, name="vadd", status=TaskStatus.FAILED, error="boom")
    with pytest.raises(TaskFailedError) as raised:
        failed.unwrap()
    assert not isinstance(raised.value, NoCapableSlotError)


def test_retry_false_is_one_attempt_in_every_spelling() -> None:
    once = [
        Task.binary("/bin/true", retry=False),
        Task.kernel("noop", 1, retry=False),
        Task.kernel("noop", 1, retry=False, max_attempts=1),
        Task.builder().binary("/bin/true").retry(False).build(),
        Task.kernel("noop", 1, max_attempts=1),
    ]
    assert [(t.max_attempts, t.retry) for t in once] == [(1, False)] * len(once)
    assert (Task.binary("/bin/true").max_attempts, Task.binary("/bin/true").retry) == (3, True)
    assert Task.kernel("noop", max_attempts=5).max_attempts == 5
    with pytest.raises(TaskError, match=r"retry=False means one attempt; drop max_attempts=4"):
        Task.kernel("noop", retry=False, max_attempts=4)


def test_kernel_arguments_by_name_are_refused_with_the_way_to_pass_them() -> None:
    with pytest.raises(TaskError) as info:
        Task.kernel("saxpy", 2.0, x=1, y=2)  # type: ignore[arg-type]  # what mypy says too
    assert str(info.value) == (
        "Task.kernel('saxpy', x=..., y=...): a kernel's arguments go by position, in the order its function "
        "takes them (Task.kernel('saxpy', a, b, ...)); Task.kernel's own keywords are backend, priority, "
        "timeout, max_attempts, requires, key, label, retry"
    )
    options = [p.name for p in inspect.signature(Task.kernel).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert options == list(task_module._KERNEL_OPTIONS)  # the message names every option, and only those


def test_a_binary_given_a_backend_other_than_cpu_is_refused_naming_requires() -> None:
    """A binary's slot is chosen by `requires`: Task(call=BinaryCall(...), backend=GPU) ran it on
    a CPU slot, silently (the builder already refused it)."""
    from batuta.core.task import BinaryCall

    call = BinaryCall(path="./cuda_prog")
    for made in (
        lambda: Task(call=call, backend=Backend.GPU),
        lambda: Task(call=call, backend=Backend.GPU, requires=frozenset({"cpu"})),
        lambda: Task.binary("./cuda_prog").with_options(backend=Backend.GPU),
    ):
        with pytest.raises(
            TaskError,
            match=r"^binary task './cuda_prog': backend must be CPU, not GPU; "
            r"to run it on a GPU slot, with that GPU visible, pass requires=\['gpu'\] \(or 'gpu:N'\)$",
        ):
            made()
    with pytest.raises(TaskError, match="backend must be CPU, not SCALAR"):
        Task(call=call, backend=Backend.SCALAR)
    # what the message names is what works
    assert Task(call=call, requires=frozenset({"gpu"})).requires == frozenset({"gpu"})
    assert Task(call=call, backend=Backend.CPU).backend is Backend.CPU
