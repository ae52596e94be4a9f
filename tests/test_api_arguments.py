"""Bad arguments to the Python API are one-line UsageErrors naming the argument and the fix,
raised where they are passed: never a hang, never a TypeError from deep inside, never a value
taken silently (a str split into letters, a negative count)."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
from pathlib import Path
from typing import Any

import pytest

import batuta.runtime.builder as builder_module
from batuta import Pool, Task, TaskFuture
from batuta.core.task import Priority
from batuta.errors import TaskError, TaskUsageError, UsageError
from batuta.runtime.builder import PoolBuilder
from batuta.runtime.loop_owner import check_loop
from batuta.runtime.remote import RemoteExecutor, RemoteExecutorBuilder

# Every builder check is done twice over: the pool's own, and the RemoteExecutor's that hands it on.
BUILDERS = [pytest.param(Pool.builder, id="pool"), pytest.param(RemoteExecutor.builder, id="remote")]


def agent_flags(builder: PoolBuilder, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `builder.build()` asks the local agent's command line for (its --gpus, modules)."""
    asked: dict[str, Any] = {}
    real = builder_module.agent_command

    def recording(**flags: Any) -> list[str]:
        asked.update(flags)
        return real(**flags)

    monkeypatch.setattr(builder_module, "agent_command", recording)
    builder.build()  # built, never started: no agent runs
    return asked


# -- 1: heartbeat_interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"heartbeat_interval": -1}, "PoolConfig(heartbeat_interval=-1): give a positive number of seconds"),
        ({"start_timeout": math.nan}, "PoolConfig(start_timeout=nan): give a positive number of seconds"),
        ({"max_relaunches": -1}, "PoolConfig(max_relaunches=-1): give a number of relaunches >= 0"),
        ({"send_budget": 0}, "PoolConfig(send_budget=0): give a positive whole number"),
        (
            {"start_wait": -1},
            "PoolConfig(start_wait=-1): give a number of seconds >= 0, or math.inf to wait for every host",
        ),
    ],
)
def test_a_pool_config_made_by_hand_is_checked_as_the_builder_checks(given: dict[str, Any], said: str) -> None:
    """A heartbeat of -1 given straight to PoolConfig reached the agent, which refused its
    Welcome; the pool relaunched it for as long as one waited."""
    from batuta.runtime.builder import PoolConfig

    with pytest.raises(UsageError) as info:
        PoolConfig(**given)
    assert str(info.value) == said


@pytest.mark.parametrize("make", BUILDERS)
@pytest.mark.parametrize("seconds", [-1, 0, "1", True, math.nan, math.inf])
def test_heartbeat_interval_is_a_positive_finite_number_of_seconds(make: Any, seconds: object) -> None:
    # -1 used to relaunch the agent forever ("Welcome.heartbeat_interval: expected a number > 0")
    with pytest.raises(UsageError, match=r"^heartbeat_interval\(.*\): give a positive number of seconds$"):
        make().heartbeat_interval(seconds)


def test_a_heartbeat_not_below_suspect_after_is_refused_at_build() -> None:
    with pytest.raises(UsageError, match=r"heartbeat_interval\(5\) is not below liveness\(suspect_after=3\)"):
        Pool.builder().cpu_workers(1).heartbeat_interval(5).build()
    Pool.builder().cpu_workers(1).heartbeat_interval(5).liveness(suspect_after=10, lost_after=20).build()


# -- 2: the other numbers of both builders -----------------------------------------------------


@pytest.mark.parametrize("count", [0, -5, "a", True, 1.5])
def test_max_queued_is_a_positive_number_of_tasks(count: object) -> None:
    # 0 made every `await pool.submit(...)` wait forever
    with pytest.raises(UsageError, match=r"^max_queued\(.*\): give a positive number of tasks$"):
        Pool.builder().max_queued(count)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", BUILDERS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"max_relaunches": -1, "backoff": 1},
            r"relaunch\(max_relaunches=-1\): give a whole number of relaunches >= 0",
        ),
        ({"max_relaunches": True, "backoff": 1}, r"relaunch\(max_relaunches=True\)"),
        ({"max_relaunches": "3", "backoff": 1}, r"relaunch\(max_relaunches='3'\)"),
        ({"max_relaunches": 3, "backoff": -1}, r"relaunch\(backoff=-1\): give a positive number of seconds"),
        ({"max_relaunches": 3, "backoff": 0}, r"relaunch\(backoff=0\)"),
        ({"max_relaunches": 3, "backoff": "x"}, r"relaunch\(backoff='x'\)"),
    ],
)
def test_relaunch_takes_a_count_and_a_delay(make: Any, options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make().relaunch(**options)


def test_relaunch_zero_times_is_allowed_and_fewer_is_not() -> None:
    config = Pool.builder().cpu_workers(1).relaunch(max_relaunches=0, backoff=0.1).build().config
    assert (config.max_relaunches, config.relaunch_backoff) == (0, 0.1)
    with pytest.raises(UsageError, match=r"relaunch\(max_relaunches=-1\)"):
        Pool.builder().relaunch(max_relaunches=-1, backoff=0.1)


@pytest.mark.parametrize("make", BUILDERS)
@pytest.mark.parametrize("seed", ["a", True, 1.5, None])
def test_seed_is_a_whole_number(make: Any, seed: object) -> None:
    with pytest.raises(UsageError, match=r"^seed\(.*\): give a whole number$"):
        make().seed(seed)


@pytest.mark.parametrize("make", BUILDERS)
@pytest.mark.parametrize(
    ("suspect_after", "lost_after", "message"),
    [
        ("x", 3, r"liveness\(suspect_after='x'\): give a positive number of seconds"),
        (1, None, r"liveness\(lost_after=None\): give a positive number of seconds"),
        (math.nan, 3, r"liveness\(suspect_after=nan\)"),
        (5, 3, r"liveness\(suspect_after=5, lost_after=3\): a host is suspected before it is lost"),
    ],
)
def test_liveness_takes_two_ordered_numbers_of_seconds(
    make: Any, suspect_after: object, lost_after: object, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        make().liveness(suspect_after=suspect_after, lost_after=lost_after)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.python(3), r"python: 3 is not a path"),
        (lambda b: b.python(""), r"python\(''\): give the path of a Python interpreter"),
        (lambda b: b.job_file(None), r"job_file: None is not a path"),
        (lambda b: b.host("gpu1"), r"host: 'gpu1' is not a HostSpec"),
        (lambda b: b.hosts("gpu1"), r"hosts\('gpu1'\): pass a list of HostSpecs"),
        (lambda b: b.hosts([builder_module.local_host(1), 3]), r"hosts: 3 is not a HostSpec"),
        (lambda b: b.scheduler({"max_queued": 4}), r"scheduler\(\{'max_queued': 4\}\): give a .*SchedulerConfig"),
    ],
)
def test_the_other_pool_builder_methods_check_their_argument(call: Any, message: str) -> None:
    builder = Pool.builder()
    with pytest.raises(UsageError, match=message):
        call(builder)
    assert not builder._hosts  # a list with one bad entry adds none of it


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.add_worker(5), r"add_worker\(5\): give the worker's address as a str"),
        (lambda b: b.add_worker("h:9443", name=""), r"add_worker\('h:9443', name=''\): give a non-empty str"),
        (lambda b: b.add_workers(5), r"add_workers takes a list of 'host:port' strings"),
        (lambda b: b.tls(ca="a", cert="b", key="c", busy_timeout="x"), r"tls\(busy_timeout='x'\): give a number"),
        (lambda b: b.tls(ca="a", cert="b", key="c", busy_timeout=-1), r"tls\(busy_timeout=-1\)"),
        (lambda b: b.tls(ca="a", cert="b", key="c", connect_timeout=0), r"tls\(connect_timeout=0\): give a positive"),
        (lambda b: b.tls(ca="a", cert="b", key="c", hello_timeout="9"), r"tls\(hello_timeout='9'\)"),
        (lambda b: b.tls(ca=None, cert="b", key="c"), r"tls\(ca=None\): give the path of a PEM file"),
        (lambda b: b.tls(ca="a", cert="b", key="c", server_name=7), r"tls\(server_name=7\)"),
        (lambda b: b.tls_settings("certs/"), r"tls_settings\('certs/'\): give a TLSSettings"),
        (lambda b: b.check_versions("no"), r"check_versions\('no'\): give True or False"),
        (lambda b: b.pool(3), r"pool\(3\): give a function of the PoolBuilder"),
    ],
)
def test_the_remote_executor_builder_checks_its_arguments(call: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        call(RemoteExecutorBuilder())


# -- 3: gpu_workers, as the cluster file's gpus ------------------------------------------------


@pytest.mark.parametrize(
    ("which", "flag"), [(" 0, 1", "0,1"), ([0, 1], "0,1"), ((1,), "1"), ("ALL", "auto"), ([], "none")]
)
def test_gpu_workers_takes_what_the_cluster_file_takes(which: Any, flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent_flags(Pool.builder().cpu_workers(1).gpu_workers(which), monkeypatch)["gpus"] == flag


def test_a_gpu_count_is_refused_as_ambiguous() -> None:
    # it was a TypeError from the agent's launch: "expected str, bytes or os.PathLike object, not int"
    with pytest.raises(UsageError, match=r'^gpu_workers\(3\) is ambiguous: give GPU indices \("0,1" or \[0, 1\]\)'):
        Pool.builder().gpu_workers(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["zz", "0,,1", "-1", [0, -1], ["0"], None])
def test_a_bad_gpu_selection_is_refused_at_the_builder(which: Any) -> None:
    # "zz" used to fail only at start, naming the agent's --gpus flag
    with pytest.raises(UsageError, match=r"gpu_workers: expected \"auto\", \"none\" or a list of GPU indices"):
        Pool.builder().gpu_workers(which)


# -- 4: a str where a list of names or paths goes ----------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda b: b.kernel_modules("goodk"),
            r"kernel_modules\('goodk'\): pass a list of module names, .*\(\['goodk'\]\)",
        ),
        (lambda b: b.kernel_modules(5), r"kernel_modules\(5\): pass a list of module names"),
        (lambda b: b.kernel_modules(["k/goodk.py"]), r"kernel_modules: 'k/goodk.py' is not a dotted module name"),
        (lambda b: b.kernel_modules([5]), r"kernel_modules: 5 is not a dotted module name"),
        (lambda b: b.modules("k/goodk.py"), r"modules\('k/goodk.py'\): pass a list of paths, .*\(\['k/goodk.py'\]\)"),
        (
            lambda b: b.modules(Path("k/goodk.py")),
            r"modules\(.*\): pass a list of paths, e.g. modules\(\['k/goodk.py'\]\)",
        ),
        (lambda b: b.modules([3]), r"modules: 3 is not a path"),
    ],
)
def test_a_str_is_not_taken_for_a_list(call: Any, message: str) -> None:
    # kernel_modules("goodk") made the agent import g, o, o, d and k
    with pytest.raises(UsageError, match=message):
        call(Pool.builder())


def test_lists_of_modules_reach_the_agent_and_the_code_to_ship(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = Pool.builder().cpu_workers(1)
    with pytest.raises(UsageError):
        builder.kernel_modules("pkg.kernels")  # the same name, not in a list
    builder.kernel_modules(("pkg.kernels",)).modules(["k/goodk.py"])
    assert list(agent_flags(builder, monkeypatch)["kernel_modules"]) == ["pkg.kernels"]
    assert builder._config.code.modules == (Path("k/goodk.py"),)


# -- 5: a task's options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"requires": "gpu"}, r"^requires='gpu': pass a list of capability tags, e.g. requires=\['gpu'\]$"),
        ({"requires": [1]}, r"^requires=\[1\]: each capability tag must be a str"),
        ({"requires": 5}, r"^requires=5: pass a list of capability tags"),
        ({"key": 5}, r"^key must be a str .* or None, not 5$"),
        ({"label": 5}, r"^label must be a str"),
        ({"timeout": "5"}, r"^timeout must be a positive number of seconds, not '5'$"),
        ({"timeout": True}, r"^timeout must be a positive number of seconds, not True$"),
        ({"max_attempts": True}, r"^max_attempts must be an int >= 1, not True$"),
        ({"retry": "no"}, r"^retry must be True or False, not 'no'$"),
        ({"priority": "urgent"}, r"^priority 'urgent': expected Priority\.LOW, .*'low', 'normal', 'high', 'critical'"),
        ({"priority": True}, r"^priority True: expected"),
        ({"priority": 7}, r"^priority 7: expected"),
    ],
)
def test_a_bad_task_option_names_the_option_and_what_it_takes(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        Task.kernel("good_k", 1.0, **options)
    assert isinstance(raised.value, TaskError)  # what a bad task has always raised, for callers that catch it


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.kernel("noop").timeout("x"), r"^timeout must be a positive number of seconds, not 'x'$"),
        (lambda b: b.kernel("noop").priority("high!"), r"^priority 'high!': expected"),
        (lambda b: b.kernel("noop").requires(["gpu"]), r"each capability tag must be a str"),
        (lambda b: b.kernel("noop").key(5), r"^key must be a str"),
        (lambda b: b.binary("/bin/echo").args("abc"), r"^args\('abc'\): pass a list of arguments, or \.arg\('abc'\)"),
        (lambda b: b.binary("/bin/echo").backend("gpu"), r"backend must be CPU, not GPU"),
    ],
)
def test_the_task_builder_checks_as_task_kernel_does(call: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        call(Task.builder()).build()


@pytest.mark.parametrize(("given", "expected"), [("high", Priority.HIGH), (" Critical ", Priority.CRITICAL)])
def test_a_priority_may_be_named_in_any_case(given: Any, expected: Priority) -> None:
    assert Task.kernel("noop", priority=given).priority is expected
    assert Task.builder().kernel("noop").priority(given).build().priority is expected
    assert Task.kernel("noop", priority=0).priority is Priority.LOW  # type: ignore[arg-type]  # by value, as before


def test_requires_keeps_whole_tags() -> None:
    assert Task.kernel("good_k", 1.0, requires=["gpu", "gpu:1"]).requires == {"gpu", "gpu:1"}
    assert Task.builder().kernel("noop").requires("gpu", "avx512").build().requires == {"gpu", "avx512"}
    assert Task.binary("/bin/true", cwd=Path("/tmp")).call.cwd == "/tmp"  # type: ignore[arg-type,union-attr]
    assert Task.binary("/bin/ls", Path("/tmp")).call.args == ("/tmp",)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            (["-c", "ls"],),
            r"^binary task '/bin/sh': argument 1 \(\['-c', 'ls'\]\) is not a str; give each argument on its own: ",
        ),
        (("-n", 5), r"^binary task '/bin/sh': argument 2 \(5\) is not a str; pass str\(5\)$"),
    ],
)
def test_a_binary_argument_that_is_not_a_str_is_named_with_the_fix(args: tuple[Any, ...], said: str) -> None:
    with pytest.raises(TaskUsageError, match=said):
        Task.binary("/bin/sh", *args)


@pytest.mark.parametrize(
    "make",
    [
        lambda name: Task.binary("/bin/cat", name),
        lambda name: Task.binary("/bin/cat", "x", env={"DATA": name}),
        lambda name: Task.binary("/bin/cat", cwd=name),
        lambda name: Task.kernel("noop", label=name),
        lambda name: Task.kernel("noop", key=name),
    ],
    ids=["argument", "env", "cwd", "label", "key"],
)
def test_text_that_cannot_travel_is_refused_where_the_task_is_made(make: Any) -> None:
    """A file name that is not UTF-8 (os.fsdecode) was taken, and lost its host when sent."""
    with pytest.raises(TaskUsageError, match=r"is not valid UTF-8 \(surrogates not allowed at index \d+: a file name"):
        make(os.fsdecode(b"file_\xff.dat"))
    assert make("fichier_é.dat") is not None  # valid text beyond ASCII travels


# -- 6: Pool.local's keywords ------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["bogus", "build", "no_local", "relaunch"])
def test_pool_local_refuses_an_unknown_keyword_listing_the_known(keyword: str) -> None:
    with pytest.raises(UsageError, match=rf"^Pool\.local\({keyword}=\.\.\.\): unknown keyword; it takes .*max_queued"):
        Pool.local(2, **{keyword: 1})  # type: ignore[arg-type]


def test_pool_local_applies_its_keywords() -> None:
    pool = Pool.local(1, gpu_workers="none", max_queued=10, heartbeat_interval=0.5)
    assert (pool.config.scheduler.max_queued, pool.config.heartbeat_interval) == (10, 0.5)
    with pytest.raises(UsageError, match=r"^max_queued\(0\)"):
        Pool.local(1, max_queued=0)


def test_every_pool_local_option_is_a_one_value_builder_method() -> None:
    for name in PoolBuilder.LOCAL_OPTIONS:
        parameters = list(inspect.signature(getattr(PoolBuilder, name)).parameters.values())[1:]
        assert [p.kind for p in parameters] == [inspect.Parameter.POSITIONAL_OR_KEYWORD], name


def test_a_pool_used_from_a_second_event_loop_says_it_belongs_to_the_first() -> None:
    """Notebook style: started in one asyncio.run, used in the next, it raised "RuntimeError:
    Event loop is closed" from deep inside asyncio. (The pool's own wiring is the next test's:
    a pool whose loop has ended can no longer be closed, so this one checks the rule alone.)"""
    ended = asyncio.new_event_loop()
    ended.close()

    async def use() -> None:
        check_loop(ended)

    with pytest.raises(UsageError) as info:
        asyncio.run(use())
    assert str(info.value).startswith("the pool belongs to the event loop it was started on, which has ended;")
    check_loop(ended)  # off any loop (put, submit_nowait from plain code): nothing to say


async def test_a_pool_used_from_another_thread_s_loop_says_so() -> None:
    async with Pool.local(1, gpu_workers="none") as pool:

        def elsewhere() -> None:
            asyncio.run(pool.submit(Task.kernel("noop", 1)))

        with pytest.raises(UsageError, match="which is another; use it inside one loop"):
            await asyncio.to_thread(elsewhere)
        assert (await pool.run(Task.kernel("noop", 1))).value == 1  # still fine on its own loop


async def test_a_pool_called_from_a_plain_thread_says_so_and_loses_nothing() -> None:
    """`submit_nowait` from several threads lost a task in four runs of five (1,600 futures,
    1,599 submitted, one never resolved) or left the pool stalled: it said nothing off a loop."""
    async with Pool.local(1, gpu_workers="none") as pool:
        ref = pool.put(1.0)
        future = await pool.submit(Task.kernel("spin", 30.0))
        calls = {
            "submit_nowait": lambda: pool.submit_nowait(Task.kernel("noop", 1)),
            "put": lambda: pool.put(2.0),
            "drop": lambda: pool.drop(ref),
            "cancel": future.cancel,
            "cancel_job": lambda: pool.cancel_job("x"),
            "pause": pool.pause,
            "drain": lambda: pool.drain("local"),
        }
        for name, call in calls.items():
            with pytest.raises(UsageError, match="called from a thread other than its event loop's; ") as info:
                await asyncio.to_thread(call)
            assert "loop.call_soon_threadsafe(pool.submit_nowait, task)" in str(info.value), name
        assert pool.stats().submitted == 1 and not future.done() and not pool.paused
        future.cancel()  # from its loop: the slot is free for the next
        loop = asyncio.get_running_loop()
        handed = await asyncio.to_thread(
            lambda: asyncio.run_coroutine_threadsafe(pool.submit(Task.kernel("noop", 7)), loop).result(60)
        )
        assert (await handed).value == 7  # the way the error names


async def test_submit_nowait_on_a_full_pool_from_a_done_callback_says_how_to_wait() -> None:
    """From a future's done callback asyncio only logs the error, and a program counting on the
    task waits for ever: the message names the way that waits for room from a callback."""
    async with Pool.local(1, gpu_workers="none", max_queued=1) as pool:
        first = await pool.submit(Task.kernel("spin", 30.0))  # runs on the one slot
        queued: list[TaskFuture] = []
        with pytest.raises(UsageError, match=r"await pool\.submit\(task\) from a coroutine to wait for room$"):
            for n in range(100):  # the slot's prefetch takes some; then one waits and the pool is full
                queued.append(pool.submit_nowait(Task.kernel("noop", n)))
        said: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_done(_: object) -> None:
            try:
                for _ in range(100):  # until the pool is full again
                    queued.append(pool.submit_nowait(Task.kernel("noop", len(queued))))
            except UsageError as exc:
                said.set_result(str(exc))

        asyncio.get_running_loop().call_soon(on_done, first)  # as a done callback runs: no task
        assert (await asyncio.wait_for(said, 60)).endswith(
            "; from a callback, asyncio.get_running_loop().create_task(pool.submit(task))"
        )
        first.cancel()
        later = await asyncio.get_running_loop().create_task(pool.submit(Task.kernel("noop", 3)))
        assert [(await f).value for f in queued] == list(range(len(queued)))
        assert (await later).value == 3  # the way it names waits for room and runs the task
