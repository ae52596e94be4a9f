"""The cluster file: parsing, defaults, the local host, and error messages that point home.

Every error is a `ConfigError` whose message names the file, the line (where one can be
found), the field and the fix. No SSH here: `ssh_host` is only built, never launched.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from batuta.core.task import CAP_CPU, CAP_GPU
from batuta.errors import ConfigError, UsageError
from batuta.runtime.cluster import (
    ClusterConfig,
    ClusterHost,
    build_pool,
    expected_capabilities,
    host_specs,
    load_cluster,
    parse_cluster,
    ssh_host,
)
from batuta.runtime.code import CodeSpec
from batuta.runtime.pool import Pool, PoolConfig
from batuta.transport.ssh import SSHSettings


def parse(text: str, **kwargs: object) -> ClusterConfig:
    return parse_cluster(textwrap.dedent(text), source="cluster.toml", base_dir=Path("/etc/batuta"), **kwargs)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# -- valid files ----------------------------------------------------------------------------


def test_minimal_file_one_host_everything_else_default() -> None:
    cluster = parse(
        """
        [[hosts]]
        address = "10.0.0.5"
        """
    )
    (host,) = cluster.hosts
    assert host == ClusterHost(name="10.0.0.5", address="10.0.0.5")
    assert host.python is None and host.gpus == "auto" and host.slots is None and not host.bootstrap
    assert cluster.local is None
    assert cluster.ssh == SSHSettings()
    # every default, and kernel_modules are also looked for beside the file (its folder)
    assert cluster.pool == PoolConfig(code=CodeSpec(search_folders=(Path("/etc/batuta"),)))
    assert cluster.source == "cluster.toml"


def test_defaults_merge_into_every_host_and_hosts_win() -> None:
    cluster = parse(
        """
        [defaults]
        user = "batuta"
        port = 2200
        python = "/opt/venv/bin/python"
        identity_file = "keys/id_ed25519"
        slots = 4
        gpus = "none"
        env = { OMP_NUM_THREADS = "1", LANG = "C.UTF-8" }
        tags = ["rack1"]
        kernel_modules = ["mykernels"]

        [[hosts]]
        name = "a"
        address = "10.0.0.1"

        [[hosts]]
        name = "b"
        address = "10.0.0.2"
        user = "other"
        port = 22
        slots = 8
        gpus = [1, 0]
        env = { OMP_NUM_THREADS = "4" }
        tags = ["gpu-box"]
        kernel_modules = ["more.kernels", "mykernels"]
        """
    )
    a, b = cluster.hosts
    assert (a.user, a.port, a.python, a.slots, a.gpus) == ("batuta", 2200, "/opt/venv/bin/python", 4, "none")
    assert a.identity_file == Path("/etc/batuta/keys/id_ed25519")  # relative to the file
    assert a.env == {"OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    assert a.tags == frozenset({"rack1"}) and a.kernel_modules == ("mykernels",)
    assert (b.user, b.port, b.slots, b.gpus) == ("other", 22, 8, "1,0")
    assert b.env == {"OMP_NUM_THREADS": "4", "LANG": "C.UTF-8"}  # merged key by key
    assert b.tags == frozenset({"rack1", "gpu-box"})
    assert b.kernel_modules == ("mykernels", "more.kernels")


def test_local_host_is_optional_and_inherits_only_what_runs() -> None:
    without = parse('[[hosts]]\naddress = "n1"\n')
    assert without.local is None
    assert parse('local = false\n[[hosts]]\naddress = "n1"\n').local is None
    assert parse('[local]\nenabled = false\n[[hosts]]\naddress = "n1"\n').local is None

    shortcut = parse("local = true\n")
    assert shortcut.local is not None and shortcut.local.name == "local" and shortcut.hosts == ()

    cluster = parse(
        """
        [defaults]
        python = "/remote/python"
        slots = 16
        env = { A = "1" }
        kernel_modules = ["k"]

        [local]
        name = "here"
        slots = 2
        gpus = "none"
        """
    )
    local = cluster.local
    assert local is not None
    assert (local.name, local.slots, local.gpus, local.python) == ("here", 2, "none", None)
    assert local.env == {"A": "1"} and local.kernel_modules == ("k",)
    assert cluster.host_names == ["here"]


def test_ssh_and_pool_tables() -> None:
    cluster = parse(
        """
        [[hosts]]
        address = "n1"

        [ssh]
        known_hosts = "/tmp/kh"
        config = ["/tmp/ssh_config", "extra_config"]
        connect_timeout = 3
        trust_on_first_use = true

        [pool]
        seed = 7
        heartbeat_interval = 0.5
        suspect_after = 2
        lost_after = 4.5
        max_relaunches = 2
        relaunch_backoff = 0.1
        start_timeout = 20
        """
    )
    assert cluster.ssh == SSHSettings(
        known_hosts=Path("/tmp/kh"),
        config_files=(Path("/tmp/ssh_config"), Path("/etc/batuta/extra_config")),
        connect_timeout=3.0,
        trust_on_first_use=True,
    )
    pool = cluster.pool
    assert (pool.seed, pool.heartbeat_interval, pool.suspect_after, pool.lost_after) == (7, 0.5, 2.0, 4.5)
    assert (pool.max_relaunches, pool.relaunch_backoff, pool.start_timeout) == (2, 0.1, 20.0)
    assert parse('[[hosts]]\naddress = "n1"\n[ssh]\nconfig = false\n').ssh.config_files == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"auto"', "auto"), ('"all"', "auto"), ('"none"', "none"), ("[]", "none"), ("[0, 2]", "0,2"), ('"1,0"', "1,0")],
)
def test_gpu_spellings(value: str, expected: str) -> None:
    assert parse(f'[[hosts]]\naddress = "n1"\ngpus = {value}\n').hosts[0].gpus == expected


def test_example_file_parses(repo_root: Path) -> None:
    cluster = load_cluster(repo_root / "examples" / "cluster.toml")
    assert [h.name for h in cluster.hosts] == ["cpu1", "cpu2", "gpu1"]
    assert cluster.local is not None
    assert cluster.ssh.trust_on_first_use is False
    gpu1 = cluster.hosts[2]
    assert gpu1.gpus == "0,1" and gpu1.env["OMP_NUM_THREADS"] == "1"
    assert len(host_specs(cluster)) == 4


# -- errors ---------------------------------------------------------------------------------


def test_toml_syntax_error_carries_line_and_column() -> None:
    message = error_of(
        """
        [[hosts]]
        address = "n1"
        slots = = 3
        """
    )
    assert message.startswith("cluster.toml:4:")
    assert "invalid TOML" in message and message.endswith(": 'slots = = 3'")  # the line, as written


def test_a_key_given_twice_is_named_with_its_line_and_the_fix() -> None:
    """tomllib says only 'Cannot overwrite a value (at line 3, column 9)'."""
    message = error_of("[local]\nslots = 1\nslots = 2\n")
    assert message == (
        "cluster.toml:3:10: invalid TOML: Cannot overwrite a value (a key or table given twice: 'slots = 2'); "
        "keep one of them"
    )


def test_a_folder_or_an_unreadable_file_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as folder:
        load_cluster(tmp_path)
    assert str(folder.value) == f"{tmp_path}: is a folder, not a cluster file; name the .toml file in it"

    def refused(self: Path, encoding: str | None = None) -> str:  # as a file of mode 000 is, but to root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(ConfigError) as unreadable:
        load_cluster(tmp_path / "cluster.toml")
    assert str(unreadable.value) == (
        f"{tmp_path / 'cluster.toml'}: cannot read it: permission denied; make it readable for this user"
    )


def test_unknown_key_suggests_the_right_one_with_its_line() -> None:
    message = error_of(
        """
        [[hosts]]
        address = "n1"

        [[hosts]]
        address = "n2"

        [[hosts]]
        address = "n3"
        slotz = 4
        """
    )
    assert message == "cluster.toml:10: hosts[2].slotz: unknown key; did you mean 'slots'?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('hostz = []\n[[hosts]]\naddress = "n"\n', "cluster.toml:1: hostz: unknown key; did you mean 'hosts'?"),
        ('[defaults]\nadress = "x"\n', "cluster.toml:2: defaults.adress: unknown key"),
        ('[[hosts]]\naddress = "n"\n[ssh]\ntofu = true\n', "cluster.toml:4: ssh.tofu: unknown key"),
        ('[[hosts]]\naddress = "n"\n[pool]\nheartbeat = 1\n', "did you mean 'heartbeat_interval'?"),
        ("[local]\nport = 22\n", "cluster.toml:2: local.port: unknown key"),
    ],
)
def test_unknown_keys_everywhere(text: str, expected: str) -> None:
    assert expected in error_of(text)


@pytest.mark.parametrize(
    ("line", "field", "fix"),
    [
        ('slots = "8"', "hosts[0].slots", "expected a whole number"),
        ("slots = -1", "hosts[0].slots", ">= 0"),
        ("slots = true", "hosts[0].slots", "expected a whole number"),
        ("port = 70000", "hosts[0].port", "1 to 65535"),
        ('port = "22"', "hosts[0].port", "expected a whole number"),
        ("user = 5", "hosts[0].user", 'write user = "..."'),
        ('python = ""', "hosts[0].python", "must not be empty"),
        ("gpus = 2", "hosts[0].gpus", "ambiguous"),
        ('gpus = "some"', "hosts[0].gpus", "list of GPU indices"),
        ("env = { N = 1 }", "hosts[0].env.N", 'write N = "1"'),
        ('env = { "BAD-NAME" = "1" }', "hosts[0].env.BAD-NAME", "environment variable name"),
        ('env = "A=1"', "hosts[0].env", "expected a table"),
        ('tags = "gpu"', "hosts[0].tags", "expected a list of strings"),
        ('kernel_modules = ["not a module"]', "hosts[0].kernel_modules[0]", "dotted module name"),
        ('name = "a/b"', "hosts[0].name", "no spaces or '/'"),
    ],
)
def test_wrong_types_name_the_field_and_fix(line: str, field: str, fix: str) -> None:
    message = error_of(f'[[hosts]]\naddress = "n1"\n{line}\n')
    assert message.startswith("cluster.toml:3: "), message
    assert f" {field}: " in message
    assert fix in message


@pytest.mark.parametrize("tag", ["gpu", "cpu", "gpu:3", "gpu:a100"])
@pytest.mark.parametrize(
    ("table", "field"),
    [
        ('[[hosts]]\naddress = "n1"\ntags = ["rack1", "{tag}"]', "hosts[0].tags[1]"),
        ('[defaults]\ntags = ["rack1", "{tag}"]\n[[hosts]]\naddress = "n1"', "defaults.tags[1]"),
        ('[local]\nslots = 1\ntags = ["rack1", "{tag}"]', "local.tags[1]"),
        ('[[allocations]]\nkind = "slurm"\nnodes = 1\ntime = "5"\ntags = ["rack1", "{tag}"]', "allocations[0].tags[1]"),
    ],
)
def test_a_tag_that_is_batutas_own_capability_is_refused(table: str, field: str, tag: str) -> None:
    """A tag goes to every slot of its host: "gpu" gave CPU slots GPU tasks (which failed
    there, no CUDA), "gpu:3" made a GPU slot name two GPUs, "cpu" gave GPU slots CPU tasks."""
    message = error_of(table.format(tag=tag) + "\n")
    assert f" {field}: tag {tag!r} is a capability batuta sets itself" in message, message
    assert "name yours otherwise" in message and "\n" not in message


@pytest.mark.parametrize("tag", ["gpu", "cpu", "gpu:3", "rack 1"])
def test_a_tag_given_through_the_api_is_refused_as_in_a_cluster_file(tag: str) -> None:
    """`HostSpec(tags=...)` (and `tls_host(tags=...)`, a `ClusterHost` built in Python) took
    "gpu" as it was: CPU slots offered it and took GPU tasks, which failed there."""
    from batuta.runtime.remote import tls_host
    from batuta.runtime.session import HostSpec
    from batuta.transport.base import ByteStream
    from batuta.transport.tls import TLSSettings

    in_file = error_of(f'[[hosts]]\naddress = "n1"\ntags = ["rack1", "{tag}"]\n')
    problem = in_file.split(" hosts[0].tags[1]: ", 1)[1]

    async def launch() -> ByteStream:
        raise AssertionError("never launched")

    with pytest.raises(UsageError) as given:
        HostSpec(name="n1", launch=launch, tags=frozenset({"rack1", tag}))
    assert str(given.value) == f"host 'n1': tags: {problem}"
    settings = TLSSettings(ca=Path("ca.pem"), cert=Path("c.pem"), key=Path("c.key"))
    with pytest.raises(UsageError) as given:
        tls_host("n1", "10.0.0.1", 9443, settings, tags=frozenset({tag}))
    assert str(given.value) == f"host 'n1': tags: {problem}" and "\n" not in problem
    with pytest.raises(UsageError, match=r"tags='avx512': pass a set of tags, e\.g\. tags=\{'avx512'\}"):
        HostSpec(name="n1", launch=launch, tags="avx512")  # type: ignore[arg-type]
    # tags of the user's own pass, and as a list too (the pool unites them with its slots' sets)
    assert HostSpec(name="n1", launch=launch, tags=["rack1", "avx512"]).tags == {"rack1", "avx512"}  # type: ignore[arg-type]


def test_missing_address_points_at_the_host_table() -> None:
    message = error_of(
        """
        [[hosts]]
        address = "n1"

        [[hosts]]
        name = "n2"
        """
    )
    assert message.startswith("cluster.toml:5: hosts[1]: missing address")
    assert 'address = "' in message


def test_address_with_user_or_port_is_refused_with_the_fix() -> None:
    message = error_of('[[hosts]]\naddress = "me@n1"\n')
    assert "hosts[0].address" in message and "user = " in message
    # "cannot resolve '127.0.0.1:29443'" at connect time said nothing of the port key
    message = error_of('[[hosts]]\naddress = "127.0.0.1:29443"\ntransport = "tls"\n')
    assert message.endswith(
        """hosts[0].address: '127.0.0.1:29443' names a port: write address = "127.0.0.1" and port = 29443 instead"""
    )
    v6 = parse('[[hosts]]\nname = "v6"\naddress = "fe80::1"\n')
    assert v6.hosts[0].address == "fe80::1"  # IPv6 has colons of its own


def test_duplicate_host_names() -> None:
    message = error_of(
        """
        [[hosts]]
        name = "node"
        address = "10.0.0.1"

        [[hosts]]
        name = "node"
        address = "10.0.0.2"
        """
    )
    assert message.startswith("cluster.toml:7: hosts[1].name: duplicate host name 'node' (also hosts[0])")
    # a host named after its address collides with the local host's name too
    assert "duplicate host name 'local'" in error_of('local = true\n[[hosts]]\naddress = "local"\n')


def test_no_hosts_at_all() -> None:
    assert "no hosts" in error_of("[ssh]\nconnect_timeout = 5\n")
    assert "no hosts" in error_of("")


def test_host_without_any_slot() -> None:
    assert "has no slots" in error_of('[[hosts]]\naddress = "n"\nslots = 0\ngpus = "none"\n')


def test_a_misspelt_array_of_tables_is_named_with_its_line() -> None:
    message = error_of('local = true\n\n[[host]]\naddress = "n"\n')
    assert message == "cluster.toml:3: host: unknown key; did you mean 'hosts'?"


def test_more_slots_than_an_agent_runs() -> None:
    message = error_of('[[hosts]]\naddress = "n"\nslots = 5000\n')
    assert message == "cluster.toml:3: hosts[0].slots: 5000 is more than the 1024 slots one agent runs; split the host"
    assert "local.slots: 2000 is more than" in error_of("[local]\nslots = 2000\n")


@pytest.mark.parametrize(
    ("table", "field", "fix"),
    [
        ("[ssh]\nconnect_timeout = 0", "ssh.connect_timeout", "positive number of seconds"),
        ('[ssh]\ntrust_on_first_use = "yes"', "ssh.trust_on_first_use", "expected true or false"),
        ("[ssh]\nknown_hosts = 1", "ssh.known_hosts", "expected a string"),
        ("[pool]\nsuspect_after = 9\nlost_after = 8", "pool.suspect_after", "before it is lost"),
        ("[pool]\nheartbeat_interval = 5", "pool.heartbeat_interval", "not below suspect_after"),
        ("[pool]\nseed = 1.5", "pool.seed", "whole number"),
        ("[pool]\nmax_code_mb = 0", "pool.max_code_mb", "expected a number of MiB in (0, 255], got 0"),
        ("[pool]\nmax_code_mb = 300", "pool.max_code_mb", "expected a number of MiB in (0, 255], got 300"),
        ('[pool]\nmax_code_mb = "16"', "pool.max_code_mb", "expected a number of MiB"),
        ("[pool]\nstart_wait = -1", "pool.start_wait", "expected a number of seconds >= 0 (or inf), got -1"),
        ('[pool]\nstart_wait = "all"', "pool.start_wait", "expected a number of seconds (or inf), got"),
        ('ssh = "x"', "ssh", "expected a table"),
        ('hosts = "n1"', "hosts", "[[hosts]]"),
    ],
)
def test_ssh_and_pool_errors(table: str, field: str, fix: str) -> None:
    message = error_of(f"local = true\n{table}\n")
    assert f" {field}: " in message and fix in message
    assert message.startswith("cluster.toml:")


def test_every_error_is_a_usage_error_for_exit_code_2() -> None:
    with pytest.raises(UsageError):
        parse("[[hosts]]\n")


def test_load_cluster_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_cluster(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[hosts]]\naddress = "n1"\nslotz = 1\n')
    with pytest.raises(ConfigError) as info:
        load_cluster(bad)
    assert str(info.value).startswith(f"{bad}:3: hosts[0].slotz: unknown key")
    good = tmp_path / "good.toml"
    good.write_text('[defaults]\nidentity_file = "id_test"\n[[hosts]]\naddress = "n1"\n')
    assert load_cluster(good).hosts[0].identity_file == tmp_path / "id_test"


# -- from the file to specs and a pool ------------------------------------------------------


def test_expected_capabilities_follow_declared_slots_and_gpus() -> None:
    cpu = frozenset({CAP_CPU})
    assert expected_capabilities(3, "none") == (cpu, cpu, cpu)
    # each GPU's slot also offers its own name, so a task can ask for GPU 2 of a host
    gpu0, gpu1, gpu2 = (frozenset({CAP_GPU, f"gpu:{i}"}) for i in range(3))
    assert expected_capabilities(1, "0,2") == (cpu, gpu0, gpu2)
    assert expected_capabilities(None, "auto") == (cpu,)  # unknown: at least a CPU slot
    assert expected_capabilities(0, "1") == (gpu1,)


def test_ssh_host_spec_and_pool(tmp_path: Path) -> None:
    cluster = parse(
        """
        local = true

        [[hosts]]
        name = "n1"
        address = "10.9.9.9"
        slots = 2
        gpus = "none"
        """
    )
    spec = ssh_host(cluster.hosts[0], cluster.ssh)
    assert spec.name == "n1"
    assert spec.expected_capabilities == (frozenset({CAP_CPU}),) * 2
    specs = host_specs(cluster)
    assert [s.name for s in specs] == ["local", "n1"]
    pool = build_pool(cluster)
    assert isinstance(pool, Pool) and pool.config == cluster.pool


def test_launch_of_an_unreachable_host_is_a_transport_error(tmp_path: Path) -> None:
    """A refused TCP connect becomes SSHConnectError naming the host and port (no sshd needed)."""
    from batuta.transport.ssh import SSHConnectError

    spec = ssh_host(
        ClusterHost(name="gone", address="127.0.0.1", port=1, user="nobody", slots=1),
        SSHSettings(known_hosts=tmp_path / "kh", config_files=(), connect_timeout=5),
    )
    with pytest.raises(SSHConnectError) as info:
        asyncio.run(asyncio.wait_for(spec.launch(), 10))
    assert "host gone (nobody@127.0.0.1:1)" in str(info.value)
    assert "connection refused" in str(info.value)


def test_bootstrap_is_read_from_defaults_and_hosts_and_refused_on_tls_hosts() -> None:
    cluster = parse(
        """
        [defaults]
        bootstrap = true

        [[hosts]]
        address = "a"

        [[hosts]]
        address = "b"
        bootstrap = false

        [[hosts]]
        address = "w"
        transport = "tls"

        [tls]
        ca = "ca.pem"
        cert = "c.pem"
        key = "c.key"
        """
    )
    assert [h.bootstrap for h in cluster.hosts] == [True, False, False]  # [defaults] never reach a tls host
    assert "hosts[0].bootstrap: expected true or false" in error_of('[[hosts]]\naddress = "a"\nbootstrap = "yes"\n')
    refused = error_of('[[hosts]]\naddress = "w"\ntransport = "tls"\nbootstrap = true\n')
    assert "hosts[0].bootstrap: a tls worker is installed by its owner" in refused
    both = error_of('[[hosts]]\naddress = "a"\nbootstrap = true\npython = "/opt/py/bin/python"\n')
    assert "hosts[0].bootstrap: bootstrap = true starts the agent from the environment it installs" in both
    assert both.endswith("keep one of them")  # it was ignored for such a host, silently
    overridden = parse('[defaults]\nbootstrap = true\n[[hosts]]\naddress = "a"\npython = "/opt/py/bin/python"\n')
    assert overridden.hosts[0].python == "/opt/py/bin/python"  # a host's own python overrides [defaults]


def test_a_host_without_python_starts_the_installed_environment_else_python3(tmp_path: Path) -> None:
    """The launcher picks `<cache>/batuta/venv/<version>-py3.X/bin/python` once its marker is
    written (an unfinished environment has none), else python3."""
    import subprocess

    from batuta._version import __version__
    from batuta.runtime.install import MARKER, agent_launcher

    argv = agent_launcher(["python3", "-m", "batuta.agent", "--stdio"], __version__)
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["batuta-agent", "-m", "batuta.agent", "--stdio"]
    shown = [*argv[:3], "batuta-agent", "-c", "import sys; print(sys.executable, sys.argv[1:])", "x"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path)}

    def started() -> str:
        return subprocess.run(shown, env=env, capture_output=True, text=True, timeout=30, check=True).stdout.strip()

    assert started() == "python3 -c import sys; print(sys.executable, sys.argv[1:]) x"
    venv = tmp_path / "batuta" / "venv" / f"{__version__}-py3.99"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert started().startswith("python3 ")  # no marker yet: an unfinished install is not used
    (venv / MARKER).write_text("{}")
    assert started() == f"{venv}/bin/python ['x']"


def test_backend_thresholds_come_from_the_pool_table() -> None:
    cluster = parse_cluster('[pool]\nscalar_below = 10\ngpu_above = 500\n\n[[hosts]]\naddress = "a"\n')
    assert cluster.pool.thresholds.scalar_below == 10 and cluster.pool.thresholds.gpu_above == 500


def test_the_code_size_limit_comes_from_the_pool_table() -> None:
    cluster = parse_cluster('[pool]\nmax_code_mb = 2.5\n\n[[hosts]]\naddress = "a"\n')
    assert cluster.pool.code.max_bytes == int(2.5 * 2**20)
    assert parse_cluster('[[hosts]]\naddress = "a"\n').pool.code.max_bytes == 16 * 2**20
