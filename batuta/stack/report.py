"""Drawing a `StackReport` as text (for a terminal), JSON (for programs) or Markdown (for a PR).

Text is plain aligned columns; colour (ANSI) only when asked for, which the command line does
only for a terminal and never when NO_COLOR is set. Colour is never the only signal: a
version that differs from the coordinator's is also starred, a finding's severity is also
written out. A finding is never cut short: on a terminal, one longer than its width goes on
under its message column, a "; "-separated part (a failing kernel's reason) to a line;
elsewhere (a pipe, a CI log) each finding stays one line, for grep. JSON is one object
(`StackReport.to_json`), and nothing else goes to stdout.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from collections.abc import Sequence

from batuta.stack.model import COORDINATOR, ERROR, HEALTHY, WARNING, Finding, NodeReport, StackReport

FORMATS = ("text", "json", "markdown")

_RESET = "\x1b[0m"
_STYLES = {"ok": "\x1b[32m", WARNING: "\x1b[33m", ERROR: "\x1b[31m", "bold": "\x1b[1m", "dim": "\x1b[2m"}
_TAG = {HEALTHY: "ok", WARNING: "warn", ERROR: "error"}
_MISSING = "-"
_UNKNOWN = "?"


_NARROWEST = 30  # a message column narrower than this is not wrapped: words one to a line say less


def render(
    report: StackReport, fmt: str = "text", *, color: bool = False, quiet: bool = False, width: int | None = None
) -> str:
    """The report in `fmt` ("text", "json" or "markdown"); with `quiet`, only the verdict.
    `width`: the text's, in columns, for wrapping long findings (0: none); by default the
    terminal's when stdout is one, else no wrapping."""
    if fmt == "json":
        if quiet:
            return json.dumps(
                {"command": report.command, "verdict": _verdict_word(report), "exit_code": report.exit_code}
            )
        return json.dumps(report.to_json(), indent=2)
    if fmt == "markdown":
        return _markdown(report, quiet=quiet)
    if fmt == "text":
        return _Text(color, _terminal_width() if width is None else width).render(report, quiet=quiet)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def _verdict_word(report: StackReport) -> str:
    return "pass" if report.ok else "fail"


def verdict_line(report: StackReport) -> str:
    """One line: what was found, and the verdict. "gate: FAIL: 3 errors, 1 warning on 2 of 4 nodes"."""
    counts = report.counts()
    total = len(report.nodes)
    word = "PASS" if report.ok else "FAIL"
    if report.command == "versions":
        down = report.unreachable
        what = f"{len(down)} of {total} nodes unreachable ({', '.join(down)})" if down else f"{total} node(s) reached"
        return f"versions: {word}: {what}"
    if counts[ERROR] == counts[WARNING] == 0:
        return f"{report.command}: {word}: {total} node(s) healthy"
    parts = []
    if counts[ERROR]:
        parts.append(f"{counts[ERROR]} error{'s' if counts[ERROR] != 1 else ''}")
    if counts[WARNING]:
        parts.append(f"{counts[WARNING]} warning{'s' if counts[WARNING] != 1 else ''}")
    affected = sum(1 for n in report.nodes if n.severity != HEALTHY)
    strict = " (--strict)" if report.strict and not counts[ERROR] else ""
    return f"{report.command}: {word}{strict}: {', '.join(parts)} on {affected} of {total} node(s)"


def _title(report: StackReport) -> str:
    count = len(report.nodes)
    return f"batuta stack {report.command}: {report.source} ({count} node{'s' if count != 1 else ''})"


def _cell(value: str | None, reachable: bool) -> str:
    if not reachable:
        return _UNKNOWN
    return value if value else _MISSING


# -- text -------------------------------------------------------------------------------


def _terminal_width() -> int:
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else 0


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` (0: one line), every word of it kept: when it does not
    fit, each "; "-separated part starts a line, and a part longer than `width` is wrapped at
    spaces (a single longer word overruns rather than being cut)."""
    if not width or len(text) <= width:
        return [text]
    parts = text.split("; ")
    lines: list[str] = []
    for index, part in enumerate(parts):
        part = part + (";" if index < len(parts) - 1 else "")
        lines += textwrap.wrap(part, width, break_long_words=False, break_on_hyphens=False) or [part]
    return lines


class _Text:
    def __init__(self, color: bool, width: int = 0) -> None:
        self.color = color
        self.width = width

    def paint(self, text: str, style: str) -> str:
        return f"{_STYLES[style]}{text}{_RESET}" if self.color and text else text

    def render(self, report: StackReport, *, quiet: bool) -> str:
        verdict = verdict_line(report)
        style = "ok" if report.ok else ERROR
        if quiet:
            return self.paint(verdict, style)
        body = self.versions(report) if report.command == "versions" else self.findings(report)
        return "\n".join([self.paint(_title(report), "bold"), "", *body, "", self.paint(verdict, style)])

    def versions(self, report: StackReport) -> list[str]:
        columns: Sequence[NodeReport] = (report.coordinator, *report.nodes)
        header = ["COMPONENT", *(n.name for n in columns)]
        rows: list[list[tuple[str, str | None]]] = [[(h, "bold") for h in header]]
        starred = False
        for component in report.components:
            row: list[tuple[str, str | None]] = [(component, None)]
            ours = report.coordinator.versions.get(component)
            for node in columns:
                value = _cell(node.versions.get(component), node.reachable)
                if node.role != COORDINATOR and node.reachable and node.versions.get(component) != ours:
                    row.append((value + " *", WARNING))
                    starred = True
                elif not node.reachable:
                    row.append((value, ERROR))
                else:
                    row.append((value, None))
            rows.append(row)
        widths = [max(len(row[i][0]) for row in rows) for i in range(len(header))]
        lines = []
        for row in rows:
            cells = [
                self.paint(text.ljust(width), style) if style else text.ljust(width)
                for (text, style), width in zip(row, widths, strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        notes = []
        if starred:
            notes.append("* differs from the coordinator")
        for node in report.nodes:
            for finding in node.findings:
                if finding.severity != HEALTHY:
                    notes.extend(self.finding_lines(finding, indent="", with_node=True))
        return lines + (["", *notes] if notes else [])

    def findings(self, report: StackReport) -> list[str]:
        lines: list[str] = []
        for node in report.nodes:
            where = f"  {node.where}" if node.where and node.where != node.name else ""
            severity = node.severity
            status = self.paint(severity, "ok" if severity == HEALTHY else severity)
            lines.append(f"{self.paint(node.name, 'bold')}  {status}{self.paint(where, 'dim')}")
            width = max((len(f.check) for f in node.findings), default=0)
            for finding in node.findings:
                lines.extend(self.finding_lines(finding, indent="  ", check_width=width))
            lines.append("")
        return lines[:-1]

    def finding_lines(
        self, finding: Finding, *, indent: str, check_width: int = 0, with_node: bool = False
    ) -> list[str]:
        tag = _TAG[finding.severity]
        painted = self.paint(tag.ljust(5), "ok" if finding.severity == HEALTHY else finding.severity)
        subject = f"{finding.node} {finding.check}" if with_node else finding.check.ljust(check_width)
        pad = " " * (len(indent) + 5 + 2 + len(subject) + 2)
        room = self.width - len(pad)
        room = room if self.width and room >= _NARROWEST else 0
        message = _wrap(finding.message, room)
        lines = [f"{indent}{painted}  {subject}  {message[0]}", *(pad + line for line in message[1:])]
        if not finding.suggestion or finding.severity == HEALTHY:
            return lines
        arrow = "-> "
        suggestion = _wrap(finding.suggestion, room and room - len(arrow))
        lines.append(f"{pad}{self.paint(arrow + suggestion[0], 'dim')}")
        lines += [f"{pad}{self.paint(' ' * len(arrow) + line, 'dim')}" for line in suggestion[1:]]
        return lines


# -- markdown ---------------------------------------------------------------------------


def _md(text: str) -> str:
    """A table cell: pipes escaped, on one line."""
    return " ".join(text.split()).replace("|", "\\|")


def _markdown(report: StackReport, *, quiet: bool) -> str:
    verdict = f"**{verdict_line(report)}**"
    if quiet:
        return verdict
    lines = [f"### {_md(_title(report))}", ""]
    if report.command == "versions":
        columns = (report.coordinator, *report.nodes)
        lines.append("| component | " + " | ".join(_md(n.name) for n in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for component in report.components:
            ours = report.coordinator.versions.get(component)
            cells = []
            for node in columns:
                value = _md(_cell(node.versions.get(component), node.reachable))
                differs = node.role != COORDINATOR and node.reachable and node.versions.get(component) != ours
                cells.append(f"**{value}** ⚠" if differs else value)
            lines.append(f"| {component} | " + " | ".join(cells) + " |")
        problems = [f for f in report.findings if f.severity != HEALTHY]
        if problems:
            lines.append("")
            lines.extend(f"- **{_md(f.node)}** ({f.severity}): {_md(f.message)}" for f in problems)
    else:
        lines.append("| node | check | status | finding | suggestion |")
        lines.append("|---|---|---|---|---|")
        for finding in report.findings:
            mark = {HEALTHY: "✅ healthy", WARNING: "⚠️ warning", ERROR: "❌ error"}[finding.severity]
            lines.append(
                f"| {_md(finding.node)} | {_md(finding.check)} | {mark} | {_md(finding.message)} | "
                f"{_md(finding.suggestion) if finding.severity != HEALTHY else ''} |"
            )
    lines += ["", verdict]
    return "\n".join(lines)
