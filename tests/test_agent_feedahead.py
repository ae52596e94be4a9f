"""A real agent given tasks fed ahead (core/feedahead.py): a task naming an object that a task
ahead of it on its slot keeps, sent before that object exists. It gets exactly the value made
for it; when the producer makes nothing, it is answered "error" and never sees an older value."""

from __future__ import annotations

import numpy as np

from batuta.core.objects import ObjectRef
from batuta.core.task import Outcome
from batuta.protocol.messages import Put, Run
from tests.test_agent_harness import StartAgent, kernel_env, kernel_task, start_agent

__all__ = ["kernel_env", "start_agent"]  # fixtures, imported to be found by pytest


async def test_a_task_behind_the_one_keeping_its_input_gets_that_value_and_never_an_older_one(
    start_agent: StartAgent, kernel_env: dict[str, str]
) -> None:
    agent = await start_agent(
        "--slots", "1", "--gpus", "none", "--kernel-module", "batuta_test_kernels", env=kernel_env
    )
    a = np.arange(8, dtype=np.float64)
    x = ObjectRef(5)
    agent.send(Put(object_id=5, value=a))
    agent.send(
        Run(
            tasks=(
                kernel_task(1, "vadd", x, x, backend="scalar", keep=10),
                kernel_task(2, "vadd", ObjectRef(10), x, backend="scalar"),  # fed ahead: 10 is not made yet
            )
        )
    )
    made, read = await agent.outcomes_for([1, 2])
    assert made.status == Outcome.OK and made.value[0] == ObjectRef(10)
    assert read.status == Outcome.OK, read.error
    np.testing.assert_array_equal(read.value, 3 * a)
    # object 10 made again by a producer that fails: the task behind it must not read the old one
    agent.send(
        Run(
            tasks=(
                kernel_task(3, "test_boom", "no value", backend="scalar", keep=10),
                kernel_task(4, "vadd", ObjectRef(10), x, backend="scalar"),
            )
        )
    )
    failed, orphan = await agent.outcomes_for([3, 4])
    assert failed.status == Outcome.ERROR and orphan.status == Outcome.ERROR
    assert "10" in (orphan.error or "")
    # an object that no task ahead of it makes is refused at once, as before
    agent.send(Run(tasks=(kernel_task(5, "vadd", ObjectRef(30), x, backend="scalar"),)))
    refused = await agent.outcome(5)
    assert refused.status == Outcome.ERROR and "not on this host" in (refused.error or "")
    agent.send(Run(tasks=(kernel_task(6, "vadd", x, x, backend="scalar"),)))  # the slot goes on
    after = await agent.outcome(6)
    assert after.status == Outcome.OK
    np.testing.assert_array_equal(after.value, 2 * a)
