"""`batuta cluster install`: put this exact batuta on SSH hosts that have only sshd and python3.

On each host, in batuta's cache folder there (`$XDG_CACHE_HOME/batuta`, else
`~/.cache/batuta`), one virtual environment per batuta version and Python minor:

    <cache>/venv/0.1.0-py3.12/            the environment (made with `python3 -m venv --without-pip`)
    <cache>/venv/0.1.0-py3.12/batuta-install.json   written last: what was installed, and how
    <cache>/venv/0.1.0-py3.12.lock        held while an install runs (flock)
    <cache>/wheels/...                    wheels pushed from the coordinator, gone after a success

A host is checked first with one small command (`PROBE`, run by the host's `python3`): its
Python, platform and glibc, and whether the environment's marker is there and the
environment's python prints this batuta's version. If so the host is done ("already").
Otherwise the coordinator pushes this batuta's wheel and its own pip (as a wheel: the host
needs no pip) over SFTP, and `INSTALL` runs on the host, under the lock: it removes a
half-made environment, makes a fresh one, and installs batuta with every dependency pinned to
the coordinator's versions. From the package index when the host reaches it (a short probe
with pip decides); otherwise the coordinator downloads a wheelhouse for the host's Python and
platform (once, cached; see `batuta.runtime.wheels`), pushes it, and the host installs with
`--no-index`. The marker is written last, so an interrupted install is redone from a clean
environment by the next run, while the wheels already pushed are kept and not sent again.

`agent_launcher` is how an SSH host without an explicit `python` starts its agent: the
installed environment's python when there is one, else `python3`. With `bootstrap = true`,
`launch_bootstrapped` starts the agent from this release's environment (`sh` compares the
marker, no Python runs first) and, only when the launcher says there is none, installs as
above and launches again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batuta.errors import BatutaError, HostUnusableError, InstallError
from batuta.runtime import wheels
from batuta.transport.base import Buffer, ByteStream
from batuta.transport.ssh_settings import SSHSettings, SSHTarget

if TYPE_CHECKING:  # asyncssh is imported when a host is reached, not with the cluster file
    from batuta.transport.ssh_exec import CommandResult, SSHHost

log = logging.getLogger("batuta.runtime.install")

MARKER = "batuta-install.json"
MIN_PYTHON = (3, 11)
PROBE_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 1800.0  # one host's pip install (a slow disk, a slow mirror)
LOCK_TIMEOUT_S = 900.0  # waiting for another install of the same environment on that host
DEFAULT_JOBS = 8
# INSTALL's exit statuses that send the coordinator to the wheelhouse instead
EXIT_NO_INDEX = 3  # the package index is not reachable from the host
EXIT_INDEX_FAILED = 5  # reachable, but installing from it failed

# Run by the host's python3 (any 3.x: it must be able to say that it is too old). argv[1] is
# the batuta version. Prints one JSON object.
PROBE = r"""
import json, os, platform, subprocess, sys
version = sys.argv[1]
cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "batuta")
minor = "%d.%d" % sys.version_info[:2]
venv = os.path.join(cache, "venv", "%s-py%s" % (version, minor))
facts = {"python": platform.python_version(), "implementation": sys.implementation.name,
         "executable": os.path.realpath(sys.executable), "machine": platform.machine(),
         "system": platform.system(), "glibc": "", "cache": cache, "venv": venv,
         "marker": None, "venv_batuta": None, "venv_error": ""}
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (AttributeError, ValueError, OSError):
    libc = ""
if libc.startswith("glibc "):
    facts["glibc"] = libc.split()[1]
try:
    with open(os.path.join(venv, "batuta-install.json")) as f:
        facts["marker"] = json.load(f)
except (OSError, ValueError):
    pass
if facts["marker"] is not None:
    try:
        done = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                               "import batuta._version as v; print(v.__version__)"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if done.returncode == 0:
            facts["venv_batuta"] = done.stdout.decode().strip()
        else:
            facts["venv_error"] = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.SubprocessError) as exc:
        facts["venv_error"] = str(exc)
print(json.dumps(facts))
"""

# Run by the host's python3 with one JSON argument (see `_install_args`), after a first line
# `INDEX_URL = '...'` (the host's `index_url`, "" for pip's own) that comes with it on stdin,
# never in argv: a URL may hold credentials. Prints "step NAME
# [detail]" lines, pip's own output, and last one JSON object; exits 0, EXIT_NO_INDEX,
# EXIT_INDEX_FAILED, or 1.
INSTALL = r"""
import fcntl, json, os, shutil, signal, subprocess, sys, tempfile
a = json.loads(sys.argv[1])
venv = a["venv"]
python = os.path.join(venv, "bin", "python")
marker = os.path.join(venv, "batuta-install.json")

def say(step, detail=""):
    print(("step %s %s" % (step, detail)).rstrip(), flush=True)

def finish(code, **result):
    print(json.dumps(result), flush=True)
    sys.exit(code)

def tail(text, count=3):
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("WARNING: Location")]
    return " | ".join(lines[-count:]) or "(no output)"

def batuta_version():
    try:
        done = subprocess.run([python, "-c", "import batuta._version as v; print(v.__version__)"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    out = done.stdout.decode(errors="replace")
    return (out.strip(), "") if done.returncode == 0 else (None, tail(out))

def run(argv, timeout):
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = done.stdout.decode(errors="replace")
    sys.stdout.write(out)
    sys.stdout.flush()
    return done.returncode, out

pip = [a["python"], a["pip"], "--disable-pip-version-check", "--no-input"]
if INDEX_URL:  # set above this script by the coordinator (stdin, never argv: it may hold credentials)
    from urllib.parse import urlsplit
    os.environ["PIP_INDEX_URL"] = INDEX_URL
    where = urlsplit(INDEX_URL)
    if where.scheme == "http":  # asked for in plain HTTP: pip ignores such an index unless trusted
        os.environ["PIP_TRUSTED_HOST"] = where.hostname + (":%d" % where.port if where.port else "")
if not a["offline"]:
    say("probing", "the package index")
    scratch = tempfile.mkdtemp(prefix="batuta-probe-")
    try:
        code, out = run(pip + ["download", "--no-deps", "--timeout", "5", "--retries", "0",
                               "--dest", scratch, a["index_probe"]], 120)
    except subprocess.TimeoutExpired:
        code, out = 1, "timed out"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if code != 0:
        # pip says "No matching distribution" both for an index it cannot reach (with --retries 0,
        # nothing before it says so) and for one that lacks the package: the words cover both
        said = "the package index cannot give this host %s: not reachable from it, or without it (pip: %s)"
        finish(3, ok=False, error=said % (a["index_probe"], tail(out, 1)))

os.makedirs(os.path.dirname(venv), exist_ok=True)
lock = open(venv + ".lock", "a")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    say("waiting", "for another install of %s" % venv)
    def too_long(signum, frame):
        raise TimeoutError()
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(a["lock_timeout"]))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except TimeoutError:
        finish(1, ok=False, error="another install held %s.lock for %ds" % (venv, a["lock_timeout"]))
    signal.alarm(0)

want = a["marker"]
try:
    with open(marker) as f:
        found = json.load(f)
except (OSError, ValueError):
    found = None
if found is not None and all(found.get(k) == want[k] for k in ("batuta", "source", "pins")):
    version, _ = batuta_version()
    if version == want["batuta"]:
        say("already")
        finish(0, ok=True, already=True)
if os.path.lexists(venv):
    say("clearing", "an unfinished or outdated environment")
    shutil.rmtree(venv)

say("venv")
code, out = run([a["python"], "-m", "venv", "--without-pip", venv], 300)
if code != 0:
    finish(1, ok=False, error="%s -m venv failed: %s" % (a["python"], tail(out)))
pip[0] = python  # from here on, pip works in the new environment
install = pip + ["install", "--no-compile", "--progress-bar", "off"]
install += ["--no-index"] if a["offline"] else ["--timeout", "20", "--retries", "2"]
for folder in a["find_links"]:
    install += ["--find-links", folder]
say("pip", "from the wheelhouse" if a["offline"] else "from the package index")
try:
    code, out = run(install + a["requirements"], a["pip_timeout"])
except subprocess.TimeoutExpired:
    code, out = 1, "pip ran past %ds" % a["pip_timeout"]
if code != 0:
    finish(1 if a["offline"] else 5, ok=False, error="pip install failed: " + tail(out))
say("verify")
version, why = batuta_version()
if version != want["batuta"]:
    finish(1, ok=False, error="the new environment does not import batuta %s: %s" % (want["batuta"], why or version))
with open(marker + ".tmp", "w") as f:
    f.write(a["marker_text"])
os.replace(marker + ".tmp", marker)
for folder in a["cleanup"]:
    shutil.rmtree(folder, ignore_errors=True)
finish(0, ok=True, already=False)
"""

# The agent's launcher on an SSH host whose `python` the cluster file does not set: the
# installed environment of this batuta version (any Python minor) if there is one, else
# python3. "$@" is `-m batuta.agent ...`.
LAUNCHER = (
    'c="${XDG_CACHE_HOME:-$HOME/.cache}/batuta/venv"; p=python3; '
    'for v in "$c"/%s-py3.*; do [ -f "$v/' + MARKER + '" ] && p="$v/bin/python"; done; '
    'exec "$p" "$@"'
)


# The agent's launcher with `bootstrap = true`: this release's environment (its marker holds
# exactly `marker_text`), else exit EXIT_NOT_INSTALLED saying NOT_INSTALLED, before any
# protocol byte, so that the coordinator installs and launches again. No python runs for the
# check: on the way to an agent, it costs no more than the `sh` that reads one file.
BOOTSTRAP_LAUNCHER = (
    'c="${XDG_CACHE_HOME:-$HOME/.cache}/batuta/venv"; want=%s; '
    'for v in "$c"/%s-py3.*; do got=; '
    'if [ -f "$v/' + MARKER + '" ]; then IFS= read -r got < "$v/' + MARKER + '"; fi; '
    'if [ "$got" = "$want" ] && [ -x "$v/bin/python" ]; then exec "$v/bin/python" "$@"; fi; done; '
    "echo %s >&2; exit %d"
)
NOT_INSTALLED = "batuta bootstrap: this batuta is not installed here"  # logged at info (transport/base.py)
EXIT_NOT_INSTALLED = 75
FIRST_WORDS_TIMEOUT_S = 120.0  # for a bootstrapped agent's first bytes (Hello), before the session's own timeout


def marker_text(release: wheels.Release) -> str:
    """The marker file's one line: what was installed (compared byte for byte by the launcher)."""
    fields = {"batuta": release.version, "pins": release.pins_digest, "source": release.digest}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")) + "\n"


def bootstrap_launcher(agent_argv: Sequence[str], release: wheels.Release) -> list[str]:
    """`agent_argv` started by `BOOTSTRAP_LAUNCHER` from `release`'s environment."""
    script = BOOTSTRAP_LAUNCHER % (
        shlex.quote(marker_text(release).rstrip("\n")),
        shlex.quote(release.version),
        shlex.quote(NOT_INSTALLED),
        EXIT_NOT_INSTALLED,
    )
    return ["sh", "-c", script, "batuta-agent", *agent_argv[1:]]


async def launch_bootstrapped(
    installer: Installer,
    host: InstallTarget,
    agent_argv: Sequence[str],
    env: Mapping[str, str] | None,
) -> ByteStream:
    """Start the agent from this release's environment on `host`, installing it first when
    the launcher says it is not there (then launching once more)."""
    from batuta.transport.ssh import open_ssh_stream
    from batuta.transport.ssh_exec import SSHHost

    release = await installer.release()
    for attempt in range(2):
        argv = bootstrap_launcher(agent_argv, release)
        stream = await open_ssh_stream(host.target, argv, installer.settings, env=env)
        try:
            first = await asyncio.wait_for(stream.read(), FIRST_WORDS_TIMEOUT_S)
        except TimeoutError:
            return stream  # silent so far: the session's handshake timeout decides
        except BaseException:
            stream.kill()
            raise
        if first:
            return FirstBytes(stream, first)
        said = await stream.last_words(1.0)
        if NOT_INSTALLED not in said or attempt:
            return stream  # ended for its own reasons: the session reports its last words
        await stream.close()
        async with await SSHHost.connect(host.target, installer.settings) as remote:
            await installer.ensure(remote, host)
    raise AssertionError("unreachable: the second launch returns")


class FirstBytes:
    """A `ByteStream` whose first bytes were already read (to tell an agent from a launcher
    that found nothing installed): `read` gives them back first."""

    def __init__(self, stream: ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    @property
    def description(self) -> str:
        return self._stream.description

    @property
    def local_address(self) -> str | None:  # where `data_link = "ssh"` listens for this host
        return getattr(self._stream, "local_address", None)

    async def read(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._stream.read()

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    def write_parts(self, parts: Sequence[Buffer]) -> None:
        self._stream.write_parts(parts)

    async def drain(self) -> None:
        await self._stream.drain()

    async def close(self, timeout: float = 2.0) -> None:
        await self._stream.close(timeout)

    def kill(self) -> None:
        self._stream.kill()

    async def how_it_ended(self, timeout: float) -> str:
        return await self._stream.how_it_ended(timeout)

    async def last_words(self, timeout: float) -> str:
        return await self._stream.last_words(timeout)


def agent_launcher(agent_argv: Sequence[str], version: str) -> list[str]:
    """`agent_argv` (`python -m batuta.agent ...`) started through `LAUNCHER` instead of its
    python: the argv for an SSH host with no explicit `python`."""
    return ["sh", "-c", LAUNCHER % shlex.quote(version), "batuta-agent", *agent_argv[1:]]


# -- what a run reports ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallProgressed:
    """A host's install moved on: `step` ("checking", "pushing", "pip", ...), with bytes
    copied of `total` while pushing."""

    host: str
    step: str
    detail: str = ""
    done: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInstalled:
    """How one host's install ended. `path`: "index", "wheelhouse", "already", or "" when it failed."""

    host: str
    ok: bool
    path: str = ""
    python: str = ""  # the host's Python version
    venv_python: str = ""  # the environment's interpreter, on the host
    seconds: float = 0.0
    pushed_bytes: int = 0  # copied to the host by this run (wheels already there are not sent again)
    error: str = ""
    note: str = ""


ProgressHandler = Callable[[InstallProgressed], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class HostFacts:
    """What `PROBE` found on a host."""

    python: str
    implementation: str
    executable: str
    machine: str
    system: str
    glibc: str
    cache: str
    venv: str
    marker: Mapping[str, Any] | None
    venv_batuta: str | None
    venv_error: str

    @property
    def minor(self) -> str:
        return ".".join(self.python.split(".")[:2])

    @property
    def venv_python(self) -> str:
        return f"{self.venv}/bin/python"


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallTarget:
    """One SSH host to install on: how to reach it and the environment its commands get."""

    name: str
    target: SSHTarget
    env: Mapping[str, str] = field(default_factory=dict)
    note: str = ""
    index_url: str | None = None  # the package index pip uses there (PEP 503); None: pip's own setting


# -- the coordinator's shared state ---------------------------------------------------------


class Installer:
    """Installs on many hosts at once, building what they need on the coordinator once:
    this batuta's wheel, pip's, and one wheelhouse per (Python minor, platform)."""

    def __init__(
        self,
        settings: SSHSettings,
        *,
        cache: Path | None = None,
        offline: bool = False,
        jobs: int = DEFAULT_JOBS,
        on_progress: ProgressHandler | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.offline = offline
        self.on_progress = on_progress
        self._jobs = asyncio.Semaphore(jobs)
        self._release: wheels.Release | None = None
        self._build_lock = asyncio.Lock()
        self._wheelhouses: dict[tuple[str, str, str], Path] = {}
        self._installing: set[str] = set()  # hosts whose bootstrap install runs now

    def _progress(self, host: str, step: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        if self.on_progress is not None:
            self.on_progress(InstallProgressed(host=host, step=step, detail=detail, done=done, total=total))

    async def release(self) -> wheels.Release:
        async with self._build_lock:
            if self._release is None:
                self._release = await asyncio.to_thread(wheels.current_release)
            return self._release

    async def _base_wheels(self) -> list[Path]:
        release = await self.release()
        async with self._build_lock:
            batuta_wheel = await wheels.batuta_wheel(release, self.cache)
            pip_wheel = await asyncio.to_thread(wheels.pip_wheel, self.cache)
        return [batuta_wheel, pip_wheel]

    async def _wheelhouse(self, facts: HostFacts) -> Path:
        release = await self.release()
        key = (facts.minor, facts.glibc, facts.machine)
        async with self._build_lock:  # hosts that need the same one wait for the first to build it
            if key not in self._wheelhouses:
                self._wheelhouses[key] = await wheels.wheelhouse(
                    release, facts.minor, facts.glibc, facts.machine, self.cache
                )
            return self._wheelhouses[key]

    # -- every host -----------------------------------------------------------------------

    async def install_all(self, hosts: Sequence[InstallTarget]) -> list[HostInstalled]:
        """Install on every host, at most `jobs` at once; one result per host, in order."""
        return list(await asyncio.gather(*(self._install_bounded(h) for h in hosts)))

    async def _install_bounded(self, host: InstallTarget) -> HostInstalled:
        from batuta.transport.ssh_exec import SSHHost

        async with self._jobs:
            start = time.perf_counter()
            self._progress(host.name, "connecting")
            try:
                async with await SSHHost.connect(host.target, self.settings) as ssh:
                    result = await self.install(ssh, host)
            except (BatutaError, OSError) as exc:
                result = HostInstalled(host=host.name, ok=False, error=str(exc) or repr(exc))
            except Exception as exc:  # a bug here must not cost the other hosts their results
                log.exception("host %s: install failed", host.name)
                result = HostInstalled(host=host.name, ok=False, error=f"internal error: {exc!r}")
            seconds = round(time.perf_counter() - start, 2)
            done = HostInstalled(
                host=result.host,
                ok=result.ok,
                path=result.path,
                python=result.python,
                venv_python=result.venv_python,
                seconds=seconds,
                pushed_bytes=result.pushed_bytes,
                error=result.error,
                note=host.note or result.note,
            )
            self._progress(host.name, "done" if done.ok else "failed", done.path or done.error)
            return done

    def installing(self, host: str) -> bool:
        """Whether `host`'s bootstrap install is under way (or waits its turn): start-up waits
        for such a host past start_wait, since a run that ended first stopped the install, and
        the next run found the host without batuta again."""
        return host in self._installing

    # -- one host -------------------------------------------------------------------------

    async def ensure(self, ssh: SSHHost, host: InstallTarget) -> str:
        """`bootstrap = true` on connect: the environment's python on `host`, installed first
        when it is not there yet (at most `jobs` hosts install at once)."""
        release = await self.release()
        facts = await self.probe(ssh, host, release)
        if installed(facts, release):
            return facts.venv_python
        start = time.perf_counter()
        self._installing.add(host.name)
        try:
            async with self._jobs:
                log.info(
                    "host %s: installing batuta %s there (bootstrap = true; the first time takes a minute or so)",
                    host.name,
                    release.version,
                )
                result = await self.install(ssh, host)
        finally:
            self._installing.discard(host.name)
        log.info(
            "host %s: installed batuta %s for Python %s from the %s in %.1f s (bootstrap = true)",
            host.name,
            release.version,
            result.python,
            result.path,
            time.perf_counter() - start,
        )
        return result.venv_python

    async def install(self, ssh: SSHHost, host: InstallTarget) -> HostInstalled:
        """Check `host` over `ssh` and install there if needed. Raises InstallError (or a
        TransportError) when it cannot be done."""
        release = await self.release()
        self._progress(host.name, "checking")
        facts = await self.probe(ssh, host, release)
        if installed(facts, release):
            return self._result(host, facts, "already")
        try:
            return await self._install(ssh, host, release, facts)
        except (BatutaError, OSError) as failed:
            # Hosts that share a home folder (NFS) install into the same place at once, under
            # the environment's lock; the first to finish removes the pushed wheels, maybe from
            # under another's copy. Where the environment is there now, that host is done too.
            try:
                again = await self.probe(ssh, host, release)
            except (BatutaError, OSError):
                raise failed from None
            if installed(again, release):
                return self._result(host, again, "already")
            raise

    async def _install(
        self, ssh: SSHHost, host: InstallTarget, release: wheels.Release, facts: HostFacts
    ) -> HostInstalled:
        base = await self._base_wheels()
        base_dir = f"{facts.cache}/wheels/batuta-{release.version}-{release.digest[:16]}"
        pushed = await self._push(ssh, host, base, base_dir, "pushing batuta")
        fallback = ""
        if not self.offline:
            args = _install_args(facts, release, base[1].name, [base_dir], offline=False)
            result = await self._run_install(ssh, host, {**args, "cleanup": [base_dir]})
            if result.exit_status == 0:
                return self._result(host, facts, "index", pushed=pushed)
            if result.exit_status not in (EXIT_NO_INDEX, EXIT_INDEX_FAILED):
                raise InstallError(f"host {host.name}: {_reason(result)}")
            fallback = _reason(result)
            log.info(
                "host %s: %s; installing from a wheelhouse instead", host.name, fallback, extra={"host": host.name}
            )
        if not facts.glibc or facts.implementation != "cpython" or facts.system != "Linux":
            why = fallback or "offline install asked for"
            raise InstallError(
                f"host {host.name}: {why}, and a wheelhouse is made only for CPython on glibc Linux "
                f"(this host: {facts.implementation} on {facts.system} {facts.machine}); "
                "let the host reach the package index"
            )
        self._progress(host.name, "downloading", f"wheels for Python {facts.minor} ({facts.machine})")
        house = await self._wheelhouse(facts)
        house_dir = f"{facts.cache}/wheels/{house.name}"
        pushed += await self._push(ssh, host, wheels.wheel_files(house), house_dir, "pushing wheelhouse")
        args = _install_args(facts, release, base[1].name, [base_dir, house_dir], offline=True)
        result = await self._run_install(ssh, host, {**args, "cleanup": [base_dir, house_dir]})
        if result.exit_status != 0:
            raise InstallError(f"host {host.name}: {_reason(result)}")
        note = f"{fallback}; installed from a wheelhouse pushed over SSH" if fallback else ""
        return self._result(host, facts, "wheelhouse", note=note, pushed=pushed)

    def _result(
        self, host: InstallTarget, facts: HostFacts, path: str, *, note: str = "", pushed: int = 0
    ) -> HostInstalled:
        return HostInstalled(
            host=host.name,
            ok=True,
            path=path,
            python=facts.python,
            venv_python=facts.venv_python,
            pushed_bytes=pushed,
            note=note,
        )

    async def probe(self, ssh: SSHHost, host: InstallTarget, release: wheels.Release) -> HostFacts:
        """Run `PROBE` with the host's python3; its facts, or InstallError (HostUnusableError for
        a python3 missing or too old) saying what is missing."""
        done = await ssh.run(
            ["python3", "-", release.version], env=host.env, input=PROBE.encode(), timeout=PROBE_TIMEOUT_S
        )
        # No python3, or one too old: the host cannot run an agent until someone changes it
        # there, so a pool retires it at once (HostUnusableError), as it does a Python too old
        # for the agent; a relaunch every few seconds for 2.5 minutes met the same python3.
        if done.exit_status == 127:
            raise HostUnusableError(
                f"host {host.name}: no python3 on the PATH of its SSH sessions; install Python "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer there (e.g. apt install python3), "
                "or set env.PATH for the host in the cluster file"
            )
        try:
            data = json.loads(done.stdout.strip().splitlines()[-1])
            facts = HostFacts(**{k: data[k] for k in HostFacts.__dataclass_fields__})
        except (ValueError, IndexError, KeyError, TypeError):
            raise InstallError(
                f"host {host.name}: python3 could not describe itself: {wheels.last_lines(done.stderr or done.stdout)}"
            ) from None
        numbers = tuple(int(n) for n in facts.python.split(".")[:2] if n.isdigit())
        if numbers < MIN_PYTHON:
            raise HostUnusableError(
                f"host {host.name}: python3 there is Python {facts.python}; batuta needs "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer: install one and put it first on the PATH "
                "(or set env.PATH for the host in the cluster file)"
            )
        return facts

    async def _push(self, ssh: SSHHost, host: InstallTarget, files: list[Path], remote_dir: str, step: str) -> int:
        """Copy `files` to the host (those not there yet); the bytes sent."""
        total = sum(f.stat().st_size for f in files)
        self._progress(host.name, step, remote_dir, 0, total)
        sent = await ssh.put(files, remote_dir, on_bytes=lambda done: self._progress(host.name, step, "", done, total))
        return sum(f.stat().st_size for f in files if f.name in sent)

    async def _run_install(self, ssh: SSHHost, host: InstallTarget, args: dict[str, Any]) -> CommandResult:
        def on_line(line: str) -> None:
            if line.startswith("step "):
                step, _, detail = line[5:].partition(" ")
                self._progress(host.name, step, detail)
            elif line.startswith(("Collecting ", "Processing ")):
                what = line.split(" (", 1)[0].split()[-1].rsplit("/", 1)[-1]
                self._progress(host.name, "pip", " ".join(what.split("-")[:2]))
            elif line.startswith("Installing collected"):
                self._progress(host.name, "pip", "installing")

        script = f"INDEX_URL = {host.index_url or ''!r}\n{INSTALL}"
        return await ssh.run(
            ["python3", "-", json.dumps(args)],
            env=host.env,
            input=script.encode(),
            timeout=INSTALL_TIMEOUT_S + LOCK_TIMEOUT_S,
            on_line=on_line,
        )


def index_url_problem(url: str) -> str:
    """Why `url` cannot be the package index the hosts install from, or "". The URL itself is
    not repeated: it may hold credentials."""
    try:
        parts = urllib.parse.urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        usable = False
    if not usable or any(c.isspace() for c in url):
        return "expected the http:// or https:// URL of a simple index (PEP 503), like https://pypi.example.org/simple/"
    return ""


def installed(facts: HostFacts, release: wheels.Release) -> bool:
    """The environment on the host is this release, finished, and its python imports it."""
    marker = facts.marker or {}
    return (
        marker.get("batuta") == release.version
        and marker.get("source") == release.digest
        and marker.get("pins") == release.pins_digest
        and facts.venv_batuta == release.version
    )


def _install_args(
    facts: HostFacts, release: wheels.Release, pip_name: str, find_links: list[str], *, offline: bool
) -> dict[str, Any]:
    base_dir = find_links[0]
    probe = next((p for p in release.pins if p.startswith("msgpack==")), release.pins[0] if release.pins else "pip")
    return {
        "venv": facts.venv,
        "python": facts.executable,
        "pip": f"{base_dir}/{pip_name}/pip",
        "find_links": find_links,
        "requirements": [f"batuta=={release.version}", *release.pins],
        "offline": offline,
        "index_probe": probe,
        "marker": json.loads(marker_text(release)),
        "marker_text": marker_text(release),
        "cleanup": [],
        "lock_timeout": LOCK_TIMEOUT_S,
        "pip_timeout": INSTALL_TIMEOUT_S,
    }


def _reason(result: CommandResult) -> str:
    """What INSTALL said went wrong (its last JSON line), else the end of its output."""
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
        break
    status = "killed" if result.exit_status is None else f"exit status {result.exit_status}"
    return f"the install script ended ({status}): {wheels.last_lines(result.stderr or result.stdout)}"
