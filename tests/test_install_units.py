"""`batuta cluster install` without hosts: what gets pinned, repacked and asked for, and the
command line's errors (the hosts themselves: tests/test_cluster_install.py)."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as metadata
import io
import zipfile
from pathlib import Path

import pytest

from batuta.cli import main
from batuta.errors import InstallError
from batuta.runtime import wheels
from batuta.runtime.install import HostFacts, installed


def test_runtime_pins_are_the_versions_installed_here_and_leave_batuta_out() -> None:
    pins = dict(p.split("==") for p in wheels.runtime_pins())
    for name in ("numpy", "numba", "llvmlite", "msgpack", "asyncssh", "textual"):
        assert pins[name] == metadata.version(name), name
    assert "batuta" not in pins
    assert list(pins) == sorted(pins)


def test_manylinux_platforms_go_from_the_hosts_glibc_down_with_the_legacy_names() -> None:
    x86 = wheels.manylinux_platforms("2.36", "x86_64")
    assert x86[0] == "manylinux_2_36_x86_64" and x86[-1] == "manylinux1_x86_64"
    assert x86.index("manylinux2014_x86_64") == x86.index("manylinux_2_17_x86_64") + 1
    arm = wheels.manylinux_platforms("2.31", "aarch64")
    assert arm[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    with pytest.raises(InstallError, match=r"not a version like 2\.36"):
        wheels.manylinux_platforms("musl", "x86_64")


def test_a_repacked_wheel_holds_the_installed_files_and_a_record_that_matches(tmp_path: Path) -> None:
    wheel = wheels.repack_installed("pip", tmp_path)
    version = metadata.version("pip")
    assert wheel.name == f"pip-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "pip/__main__.py" in names and f"pip-{version}.dist-info/METADATA" in names
        assert not any(n.endswith(".pyc") or n.startswith("..") for n in names)
        record = archive.read(f"pip-{version}.dist-info/RECORD").decode()
        rows = list(csv.reader(io.StringIO(record)))
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if not digest:
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name


def facts(marker: dict[str, str] | None, venv_batuta: str | None) -> HostFacts:
    return HostFacts(
        python="3.12.1",
        implementation="cpython",
        executable="/usr/bin/python3.12",
        machine="x86_64",
        system="Linux",
        glibc="2.36",
        cache="/home/u/.cache/batuta",
        venv="/home/u/.cache/batuta/venv/0.1.0-py3.12",
        marker=marker,
        venv_batuta=venv_batuta,
        venv_error="",
    )


def test_a_host_counts_as_installed_only_with_this_release_and_a_python_that_imports_it() -> None:
    release = wheels.Release(version="0.1.0", digest="d" * 64, pins=("numpy==2.0.0",))
    marker = {"batuta": "0.1.0", "source": "d" * 64, "pins": release.pins_digest}
    assert installed(facts(marker, "0.1.0"), release)
    assert not installed(facts(None, None), release)  # nothing there, or a half-made environment
    assert not installed(facts(marker, None), release)  # the marker, but the python cannot import batuta
    assert not installed(facts({**marker, "source": "e" * 64}, "0.1.0"), release)  # other source, same version
    assert not installed(facts({**marker, "pins": "other"}, "0.1.0"), release)  # other dependency versions


def test_install_without_a_cluster_file_or_ssh_hosts_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", "install"]) == 2
    assert "--cluster" in capsys.readouterr().err
    only_tls = tmp_path / "tls.toml"
    only_tls.write_text(
        'local = true\n[[hosts]]\naddress = "w"\ntransport = "tls"\n[tls]\nca = "a"\ncert = "b"\nkey = "c"\n'
    )
    assert main(["cluster", "install", "-c", str(only_tls)]) == 2
    err = capsys.readouterr().err
    assert "no SSH hosts to install on" in err and "a TLS worker is installed by its owner" in err
    assert "nothing to install" in err  # the local host
    assert main(["cluster", "install", "-c", str(tmp_path / "missing.toml")]) == 2


def test_an_index_url_must_be_an_http_url_and_holds_no_credentials_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "s3cr3t-token"
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(f'[defaults]\nindex_url = "ftp://ci:{secret}@mirror/simple/"\n[[hosts]]\naddress = "n1"\n')
    assert main(["cluster", "install", "-c", str(cluster)]) == 2
    err = capsys.readouterr().err
    assert "index_url" in err and "expected the http:// or https:// URL of a simple index" in err
    assert secret not in err and len(err.strip().splitlines()) == 1

    cluster.write_text('[defaults]\nindex_url = "https://mirror.example/simple/"\n[[hosts]]\naddress = "n1"\n')
    url = f"https://ci:{secret}@mirror.example/simple/"
    assert main(["cluster", "install", "-c", str(cluster), "--index-url", url]) == 2
    err = capsys.readouterr().err
    assert "--index-url: the URL holds credentials" in err and "put index_url in the cluster file" in err
    assert secret not in err
    assert main(["cluster", "install", "-c", str(cluster), "--index-url", "mirror.example/simple"]) == 2
    assert "--index-url: expected the http:// or https:// URL" in capsys.readouterr().err


def test_the_index_url_reaches_install_targets_and_the_command_line_one_wins(tmp_path: Path) -> None:
    from batuta.cli._install import install_targets
    from batuta.runtime.cluster import load_cluster

    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        '[defaults]\nindex_url = "https://a.example/simple/"\n'
        '[[hosts]]\naddress = "n1"\n'
        '[[hosts]]\naddress = "n2"\nindex_url = "http://10.0.0.9:8080/simple/"\n'
    )
    config = load_cluster(cluster)
    targets, _ = install_targets(config)
    assert [t.index_url for t in targets] == ["https://a.example/simple/", "http://10.0.0.9:8080/simple/"]
    targets, _ = install_targets(config, index_url="https://b.example/simple/")
    assert {t.index_url for t in targets} == {"https://b.example/simple/"}


def test_the_bootstrap_launcher_starts_only_this_releases_finished_environment(tmp_path: Path) -> None:
    """No marker, or a marker of another build: exit 75 saying so, before any byte on stdout
    (the coordinator then installs); this release's marker: exec that environment's python."""
    import subprocess
    import sys

    from batuta.runtime.install import EXIT_NOT_INSTALLED, MARKER, NOT_INSTALLED, bootstrap_launcher, marker_text

    release = wheels.Release(version="0.1.0", digest="d" * 64, pins=("numpy==2.0.0",))
    argv = bootstrap_launcher(["python3", "-c", "import sys; print(sys.executable)"], release)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path)}

    def launch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)

    gone = launch()
    assert (gone.returncode, gone.stdout, gone.stderr.strip()) == (EXIT_NOT_INSTALLED, "", NOT_INSTALLED)
    venv = tmp_path / "batuta" / "venv" / "0.1.0-py3.12"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    other = wheels.Release(version="0.1.0", digest="e" * 64, pins=release.pins)
    (venv / MARKER).write_text(marker_text(other))  # built from other sources: not this release
    assert launch().returncode == EXIT_NOT_INSTALLED
    (venv / MARKER).write_text(marker_text(release))
    started = launch()
    assert (started.returncode, started.stdout.strip()) == (0, f"{venv}/bin/python")


class _SSHLikeStream:
    """What `DataLinks.offer` reads of an SSH stream: our address on the host's connection."""

    description = "ssh node1:22"
    local_address = "127.0.0.1"


class _SessionStub:
    """The parts of a HostSession that a data link offer uses."""

    def __init__(self, stream: object) -> None:
        from batuta.protocol.connection import Connection, Role
        from batuta.transport.datalink_setting import parse_data_link

        self.name = "node1"
        self.stream = stream
        self.connection = Connection(Role.COORDINATOR)
        self.spec = type("Spec", (), {"data_link": parse_data_link("ssh")})()
        self.sent: list[object] = []
        self.data_link: object = None

    def send(self, message: object) -> None:
        self.sent.append(message)


async def test_a_bootstrapped_hosts_stream_still_offers_the_data_link(caplog: pytest.LogCaptureFixture) -> None:
    """With `bootstrap = true` the session's stream is the launcher's FirstBytes around the SSH
    stream; it hid the stream's local address, so `data_link = "ssh"` never came up on such a
    host: "no data link: its SSH connection has no local address of ours (a jump host?)"."""
    from batuta.protocol import messages as m
    from batuta.runtime.datalink import DataLinks
    from batuta.runtime.install import FirstBytes

    session = _SessionStub(FirstBytes(_SSHLikeStream(), b"hello"))  # type: ignore[arg-type]
    links = DataLinks()
    try:
        links.offer(session)  # type: ignore[arg-type]
        offers = [message for message in session.sent if isinstance(message, m.DataLink)]
        assert [offer.host for offer in offers] == ["127.0.0.1"], caplog.text
        assert "no data link" not in caplog.text
    finally:
        await links.close()
