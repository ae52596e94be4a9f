"""`batuta stack gate`'s kernel findings: every reason said, and a fix that fits the reason.

A failing kernel's reason is never cut off the report: the finding's message names every
one, and the text report, on a terminal, goes on under the message column instead of
running past its width. A user's kernel (one their `--module` registered) that raises or
disagrees with its reference is their code to fix, not the node's versions to compare.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from batuta.kernels import kernel, registry

from batuta.stack import report
from batuta.stack.gate import conformance_findings
from batuta.stack.model import COORDINATOR, ERROR, Finding, KernelResult, NodeReport, StackReport
from batuta.stack.nodes import ROLE_LOCAL

USER_KERNELS = ("gate_report_scale", "gate_report_sum")


@pytest.fixture
def user_kernels() -> Iterator[str]:
    """Two kernels registered by this module, as a user's --module registers its own."""

    @kernel(USER_KERNELS[0])
    def scale(x):  # type: ignore[no-untyped-def]
        return x * 2.0

    @kernel(USER_KERNELS[1])
    def total(x):  # type: ignore[no-untyped-def]
        return x.sum()

    yield __name__
    registry.forget_modules([__name__])


def results(node: str, backend: str, *bad: tuple[str, str, str], passing: int = 3) -> list[KernelResult]:
    """`passing` built-in kernels that match, and each (kernel, status, detail) of `bad`."""
    found = [KernelResult(node=node, kernel=k, backend=backend, status="pass") for k in ("vadd", "dot", "sum")]
    found = found[:passing]
    found += [KernelResult(node=node, kernel=k, backend=backend, status=s, detail=d) for k, s, d in bad]
    return found


def test_every_reason_is_in_the_finding_however_many_there_are() -> None:
    bad = [(f"k{i}", "error", f"ValueError: reason number {i}") for i in range(6)]
    bad.append(("matmul", "fail", "result: max abs error 2.24 (scale 4.48, rtol 1e-06)"))
    (cpu,) = conformance_findings("n1", results("n1", "cpu", *bad))
    assert cpu.message.startswith("7 of 10 kernel(s) fail: k0: ValueError: reason number 0; ")
    for i in range(6):
        assert f"k{i}: ValueError: reason number {i}" in cpu.message
    assert cpu.message.endswith("; matmul: result: max abs error 2.24 (scale 4.48, rtol 1e-06)")
    assert "other reason" not in cpu.message


def test_a_user_kernel_that_disagrees_with_its_reference_is_the_users_to_fix(user_kernels: str) -> None:
    scale, _ = USER_KERNELS
    bad = [(f"k{i}", "error", f"ValueError: built-in reason {i}") for i in range(4)]
    bad.append((scale, "fail", "result: max abs error 2.24 (scale 4.48, rtol 1e-06)"))
    (cpu,) = conformance_findings("n1", results("n1", "cpu", *bad))
    assert f"{scale}: result: max abs error 2.24" in cpu.message
    fix_user, fix_ours = cpu.suggestion.split("; ", 1)
    assert fix_user == (
        f"fix {scale} in {user_kernels}: its cpu variant disagrees with its reference (the @kernel function)"
    )
    assert fix_ours.startswith("compare numba/numpy/driver versions of n1") and "(for batuta's kernels)" in fix_ours

    (alone,) = conformance_findings("n1", results("n1", "cpu", bad[-1]))
    assert alone.suggestion == fix_user  # nothing of the node's versions: they are not at fault


def test_a_user_kernel_whose_code_raised_is_named_with_the_code_that_raised(user_kernels: str) -> None:
    scale, total = USER_KERNELS
    sample = f"its sample failed on the coordinator: ValueError: no rng for {scale}"
    reference = "reference failed on the coordinator: ZeroDivisionError: division by zero"
    for backend in ("scalar", "cpu"):
        (finding,) = conformance_findings(
            "n1", results("n1", backend, (scale, "error", sample), (total, "error", reference))
        )
        assert finding.suggestion == (
            f"fix the sample function (@{scale}.sample) of {scale} in {user_kernels}: it raised on the "
            f"coordinator; fix the reference (the @kernel function) of {total} in {user_kernels}, or what its "
            "sample gives it: it raised on the coordinator"
        )
    (raised,) = conformance_findings(
        "n1", results("n1", "gpu", (scale, "error", "TypeError: x"), (total, "error", "y"))
    )
    assert raised.suggestion == f"fix {scale} and {total} in {user_kernels}: their gpu variant raised on n1"
    missing = "kernel 'scale' is unknown on host n1: importing userk failed: ModuleNotFoundError: No module named 'x'"
    (unimported,) = conformance_findings("n1", results("n1", "cpu", (scale, "error", missing)))
    assert unimported.suggestion == (  # not its reference's fault: its module did not import there
        f"make {user_kernels} import on n1 (the code finding says why it did not); {scale} never ran there"
    )
    slow = "timed out after 10 s; its processes were killed"
    (timed,) = conformance_findings("n1", results("n1", "cpu", (scale, "error", slow)))
    assert timed.suggestion == (  # not "raised": it never ended
        f"make {scale} in {user_kernels} finish sooner on its sample (its cpu variant ran past --timeout on n1), "
        "or give it longer with --timeout"
    )
    (other,) = conformance_findings("n1", results("n1", "scalar", (total, "fail", "result: 1.0, expected 2.0")))
    assert other.suggestion.startswith(f"make the reference (the @kernel function) of {total} in {user_kernels} give")
    # where nothing runs on the backend, batuta's kernels neither, what the user's raised is the node's doing
    why = "ImportError: no numba"
    (broken,) = conformance_findings(
        "n1", results("n1", "cpu", *((k, "error", why) for k in ("vadd", scale)), passing=0)
    )
    assert broken.suggestion == "the cpu backend does not run at all on n1: see `batuta stack check`"


def gate_report(*findings: Finding) -> StackReport:
    return StackReport(
        command="gate",
        source="c.toml",
        coordinator=NodeReport(name=COORDINATOR, role=COORDINATOR, reachable=True),
        nodes=(NodeReport(name="n1", role=ROLE_LOCAL, reachable=True, findings=findings),),
        components=(),
    )


def test_the_text_report_goes_on_under_the_message_column_where_it_has_a_width() -> None:
    reasons = [f"k{i}: ValueError: a reason long enough to want a line of its own, number {i}" for i in range(5)]
    message = f"5 of 9 kernel(s) fail: {'; '.join(reasons)}"
    suggestion = "fix k0, k1, k2, k3 and k4 in userk: their cpu variant raised on n1; compare nothing else there"
    finding = Finding(node="n1", check="kernels cpu", severity=ERROR, message=message, suggestion=suggestion)
    lines = report.render(gate_report(finding), "text", width=90).splitlines()
    first = next(i for i, line in enumerate(lines) if "kernels cpu" in line)
    column = lines[first].index("5 of 9")
    arrow = next(i for i, line in enumerate(lines) if line[column:].startswith("-> "))
    assert all(len(line) <= 90 for line in lines), lines
    assert all(line[:column].isspace() and not line[column].isspace() for line in lines[first + 1 : arrow]), lines
    said = [line[column:] for line in lines[first:arrow]]
    assert " ".join(said) == message  # every word, in order: only spaces became line ends
    for reason in reasons[1:]:
        assert any(line.startswith(reason.split(",")[0]) for line in said), said  # each reason starts a line
    # the suggestion goes on under itself, past its arrow
    more = [line[column + 3 :] for line in lines[arrow + 1 :] if line.strip() and line[: column + 3].isspace()]
    assert more and " ".join([lines[arrow][column + 3 :], *more]) == suggestion
    # with no width (a pipe, a CI log) the finding stays on its line, whole, for grep
    unwrapped = report.render(gate_report(finding), "text", width=0).splitlines()
    assert sum(line.endswith(f"kernels cpu  {message}") for line in unwrapped) == 1
