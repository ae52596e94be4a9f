"""The cluster file: which machines form the pool, how to reach them, and pool knobs.

A cluster file is TOML (see `examples/cluster.toml` for every key, documented):

    [defaults]                 # applies to every [[hosts]] entry
    user = "batuta"
    python = "~/venv/bin/python"

    [[hosts]]
    name = "gpu1"
    address = "10.0.0.11"      # a host name, an address or a ~/.ssh/config alias
    gpus = [0, 1]

    [local]                    # optional: this machine joins as a host too
    slots = 2

    [ssh]
    trust_on_first_use = false

    [pool]
    heartbeat_interval = 1.0
    max_code_mb = 16           # the most of the user's code sent to a host (runtime/code.py)

    [policy]                   # what `batuta stack gate` holds every node to
    batuta = "exact"           # exact, minor (same x.y), major (same x) or any
    numba = "minor"
    min_free_disk_gb = 2.0

`load_cluster(path)` reads and checks it; every problem is a `ConfigError` naming the file,
the line where it can be found, the field and the fix:
`cluster.toml:12: hosts[2].slotz: unknown key; did you mean 'slots'?`. `build_pool` turns
it into a `Pool`; `ssh_host` turns one host into a `HostSpec` whose `launch()` connects
over SSH and starts the agent there.

A host with `transport = "tls"` is a `batuta worker` daemon reached over mutual TLS instead
of SSH: `address` and `port` (default 9443) say where it listens, the `[tls]` table names
the CA and this coordinator's certificate and key (paths; `batuta certs init` makes them),
and the worker's own command line sets its slots, GPUs and kernel modules:

    [[hosts]]
    name = "gpu2"
    address = "10.0.0.12"
    transport = "tls"

    [tls]
    ca = "certs/ca.pem"
    cert = "certs/client.pem"
    key = "certs/client.key"

`[[allocations]]` tables ask a batch scheduler (Slurm) for nodes that join the pool as they
start (batuta/runtime/allocation_config.py documents the keys; a file may have only those).

Environment values (`env`) reach the remote agent through the remote command line, so they
are for settings such as `OMP_NUM_THREADS`, never for secrets.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batuta._version import __version__
from batuta.core.backend import BackendThresholds
from batuta.core.task import CAP_CPU, CAP_GPU, gpu_capability
from batuta.errors import ConfigError
from batuta.runtime.allocation_config import AllocationConfig, read_allocations
from batuta.runtime.code import MAX_CODE_MB, CodeSpec
from batuta.runtime.install import Installer, InstallTarget, agent_launcher, index_url_problem, launch_bootstrapped
from batuta.runtime.policy import POLICY_COMPONENTS, POLICY_LEVELS, POLICY_THRESHOLDS, PolicyConfig
from batuta.runtime.pool import Pool, PoolConfig, local_host
from batuta.runtime.session import HostSpec
from batuta.runtime.toml_fields import HOST_NAME, FieldPath, FieldReader, field_name, shown
from batuta.transport.base import ByteStream
from batuta.transport.datalink_setting import parse_data_link, parse_data_link_encryption
from batuta.transport.local import agent_command
from batuta.transport.ssh_settings import SSHSettings, SSHTarget
from batuta.transport.tls import DEFAULT_PORT as TLS_DEFAULT_PORT
from batuta.transport.tls import TLSSettings

DEFAULT_PYTHON = "python3"


# -- the model ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterHost:
    """One SSH host, with the file's `[defaults]` already merged in."""

    name: str
    address: str  # host name, IP address or ssh config alias
    port: int | None = None  # None: the ssh config's Port, else 22
    user: str | None = None  # None: the ssh config's User, else the local user name
    identity_file: Path | None = None  # None: the ssh config's IdentityFile, else the defaults
    # the remote interpreter that has batuta installed; None: the environment that
    # `batuta cluster install` made there if there is one, else python3
    python: str | None = None
    slots: int | None = None  # CPU worker slots; None: one per remote CPU
    gpus: str = "auto"  # "auto", "none" or NVML indices "0,1"
    env: Mapping[str, str] = field(default_factory=dict)  # not for secrets: see module doc
    tags: frozenset[str] = frozenset()
    kernel_modules: tuple[str, ...] = ()
    transport: str = "ssh"  # "ssh", or "tls" for a `batuta worker` daemon (see the module doc)
    bootstrap: bool = False  # install batuta on connect when needed (batuta.runtime.install)
    index_url: str | None = None  # the package index `cluster install` and bootstrap use there


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalHostConfig:
    """This machine as a host: an agent started as a subprocess of the coordinator."""

    name: str = "local"
    python: str | None = None  # None: the coordinator's own interpreter
    slots: int | None = None
    gpus: str = "auto"
    env: Mapping[str, str] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    kernel_modules: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """A whole cluster file, checked."""

    hosts: tuple[ClusterHost, ...] = ()
    local: LocalHostConfig | None = None
    ssh: SSHSettings = field(default_factory=SSHSettings)
    pool: PoolConfig = field(default_factory=PoolConfig)
    source: str = "<cluster>"
    path: str = ""  # the file it was read from, as given to load_cluster (named in the hosts' fixes)
    tls: TLSSettings | None = None  # the [tls] table, for hosts with transport = "tls"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    allocations: tuple[AllocationConfig, ...] = ()  # [[allocations]]: nodes from a batch scheduler

    @property
    def host_names(self) -> list[str]:
        local = [self.local.name] if self.local is not None else []
        allocated = [name for allocation in self.allocations for name in allocation.host_names]
        return local + [h.name for h in self.hosts] + allocated


# -- turning it into a pool ---------------------------------------------------------------


def expected_capabilities(slots: int | None, gpus: str) -> tuple[frozenset[str], ...]:
    """What a host's slots will offer, as far as the file says (unknown counts: one CPU slot)."""
    cpu = (frozenset({CAP_CPU}),) * (1 if slots is None else slots)
    if gpus in ("auto", "none"):
        return cpu
    return cpu + tuple(frozenset({CAP_GPU, gpu_capability(int(i))}) for i in gpus.split(","))


def ssh_host(
    host: ClusterHost,
    ssh: SSHSettings | None = None,
    *,
    check_versions: bool = True,
    installer: Installer | None = None,
) -> HostSpec:
    """A `HostSpec` whose `launch()` connects over SSH and starts the agent on `host`.

    Each launch (and relaunch) opens a fresh connection with one channel running
    `<python> -m batuta.agent --stdio --gpus G [--slots N] [--kernel-module M] --name NAME`.
    Without an explicit `python`, that is the environment `batuta cluster install` made on the
    host if there is one, else python3 (`install.agent_launcher`). With `bootstrap = true` (and
    no explicit `python`) it is this release's environment, and when the host has none the
    launch installs it and starts again (`install.launch_bootstrapped`; `installer` is shared
    by a cluster's hosts so that the coordinator builds wheels once).
    """
    settings = ssh or SSHSettings()

    def argv_for(python: str | None) -> list[str]:
        return agent_command(
            slots=host.slots, gpus=host.gpus, kernel_modules=host.kernel_modules, name=host.name, python=python
        )

    argv = argv_for(host.python) if host.python else agent_launcher(argv_for(DEFAULT_PYTHON), __version__)
    target = SSHTarget(
        host=host.address, port=host.port, user=host.user, identity_file=host.identity_file, name=host.name
    )
    env = dict(host.env) or None
    bootstrap = host.bootstrap and host.python is None
    shared = installer or (Installer(settings) if bootstrap else None)
    install_target = InstallTarget(name=host.name, target=target, env=dict(host.env), index_url=host.index_url)

    async def launch() -> ByteStream:
        if not bootstrap or shared is None:
            from batuta.transport.ssh import open_ssh_stream  # asyncssh: only once a host is reached

            return await open_ssh_stream(target, argv, settings, env=env)
        return await launch_bootstrapped(shared, install_target, argv_for(DEFAULT_PYTHON), env)

    return HostSpec(
        name=host.name,
        launch=launch,
        expected_capabilities=expected_capabilities(host.slots, host.gpus),
        tags=host.tags,
        check_versions=check_versions,
        kernel_modules=host.kernel_modules,
        data_link=settings.data_link,
        python=f"{host.python} on {host.name}" if host.python else "",  # else picked on the host
        installing=functools.partial(shared.installing, host.name) if bootstrap and shared else None,
    )


def worker_host(host: ClusterHost, tls: TLSSettings, *, check_versions: bool = True) -> HostSpec:
    """A `HostSpec` whose `launch()` connects to the `batuta worker` daemon on `host` over TLS."""
    from batuta.runtime.remote import tls_host

    port = host.port if host.port is not None else TLS_DEFAULT_PORT
    spec = tls_host(host.name, host.address, port, tls, tags=host.tags, check_versions=check_versions)
    return replace(spec, kernel_modules=host.kernel_modules)


def host_specs(cluster: ClusterConfig) -> list[HostSpec]:
    """Every host of the cluster as a `HostSpec`, the local one (if any) first, each naming
    the file (`batuta cluster install --cluster cluster.toml` in its fixes, not `FILE`)."""
    return [replace(spec, cluster_file=cluster.path) for spec in _host_specs(cluster)]


def _host_specs(cluster: ClusterConfig) -> list[HostSpec]:
    specs: list[HostSpec] = []
    if cluster.local is not None:
        local = cluster.local
        spec = local_host(
            local.slots,
            gpus=local.gpus,
            kernel_modules=local.kernel_modules,
            python=local.python,
            name=local.name,
            env=dict(local.env) or None,
            python_from="python in the cluster file's [local] table",
        )
        expected = expected_capabilities(local.slots, local.gpus) if local.slots is not None else None
        specs.append(replace(spec, expected_capabilities=expected or spec.expected_capabilities, tags=local.tags))
    installer = Installer(cluster.ssh) if any(h.bootstrap for h in cluster.hosts) else None
    for host in cluster.hosts:
        if host.transport == "tls":
            assert cluster.tls is not None  # the reader refuses tls hosts without [tls]
            specs.append(worker_host(host, cluster.tls))
        else:
            specs.append(ssh_host(host, cluster.ssh, installer=installer))
    return specs


def build_pool(cluster: ClusterConfig) -> Pool:
    """A (not yet started) `Pool` over every host in the cluster file, with its `[pool]` knobs.
    Its allocations are submitted when the pool starts and cancelled when it closes."""
    if not cluster.allocations:
        return Pool(host_specs(cluster), cluster.pool)
    from batuta.runtime.allocation import Allocation

    allocations = [Allocation(config) for config in cluster.allocations]
    specs = host_specs(cluster) + [spec for allocation in allocations for spec in allocation.host_specs()]
    pool = Pool(specs, cluster.pool)
    for allocation in allocations:
        pool.add_closer(allocation.close)
        # its nodes not up yet are "starting", saying why (a queued job): the summary said of them
        # "never came up; the log has its start errors", and the log had none
        allocation.on_waiting = functools.partial(pool.host_state_changed, state="starting")
    return pool


# -- reading the file ---------------------------------------------------------------------


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read and check a cluster file. Raises `ConfigError` naming the file, line and field."""
    source = str(path)
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file; see examples/cluster.toml for a start") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a folder, not a cluster file; name the .toml file in it") from None
    except PermissionError:
        raise ConfigError(f"{source}: cannot read it: permission denied; make it readable for this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    config = parse_cluster(text, source=source, base_dir=Path(path).expanduser().resolve().parent)
    return replace(config, path=source)


def parse_cluster(text: str, *, source: str = "cluster.toml", base_dir: Path | None = None) -> ClusterConfig:
    """Check cluster-file text. Relative paths in it are relative to `base_dir` (the file's folder)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        if where:
            line = int(where[1])
            lines = text.splitlines()
            shown = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            if reason.startswith(("Cannot overwrite a value", "Cannot declare")):
                # tomllib names neither the key nor the line: both, and what it means
                reason = f"{reason} (a key or table given twice: {shown!r}); keep one of them"
            elif shown:
                reason = f"{reason}: {shown!r}"
            raise ConfigError(f"{source}:{where[1]}:{where[2]}: invalid TOML: {reason}") from None
        raise ConfigError(f"{source}: invalid TOML: {reason}") from None
    return _Reader(text, source, base_dir or Path.cwd()).cluster(data)


_HOST_KEYS = (
    "name",
    "address",
    "port",
    "user",
    "identity_file",
    "python",
    "slots",
    "gpus",
    "env",
    "tags",
    "kernel_modules",
    "transport",
    "bootstrap",
    "index_url",
)
_TLS_HOST_KEYS = ("name", "address", "port", "tags", "transport")  # the worker's command line sets the rest
_WORKER_FLAGS = {"slots": "--slots N", "gpus": "--gpus 0,1", "kernel_modules": "--kernel-module M"}
_TLS_KEYS = ("ca", "cert", "key", "server_name", "connect_timeout", "hello_timeout", "busy_timeout")
_DEFAULT_KEYS = tuple(k for k in _HOST_KEYS if k not in ("name", "address"))
_LOCAL_KEYS = ("enabled", "name", "python", "slots", "gpus", "env", "tags", "kernel_modules")
_LOCAL_INHERITS = ("env", "tags", "kernel_modules")  # from [defaults]: what runs, not where
_SSH_KEYS = ("known_hosts", "config", "connect_timeout", "trust_on_first_use", "data_link", "data_link_encryption")
_POOL_KEYS = (
    "seed",
    "heartbeat_interval",
    "suspect_after",
    "lost_after",
    "max_relaunches",
    "relaunch_backoff",
    "start_timeout",
    "start_wait",
    "max_parallel_starts",
    "scalar_below",
    "gpu_above",
    "max_code_mb",
)
_TOP_KEYS = ("hosts", "defaults", "local", "ssh", "pool", "policy", "tls", "allocations")


class _Reader(FieldReader):
    """The cluster file's tables, each value checked by `FieldReader`'s checks."""

    def cluster(self, data: dict[str, Any]) -> ClusterConfig:
        self._known_keys(data, (), _TOP_KEYS)
        defaults = self._table(data, ("defaults",))
        self._known_keys(defaults, ("defaults",), _DEFAULT_KEYS)
        merged_defaults = self._host_fields(defaults, ("defaults",))

        hosts_value = data.get("hosts", [])
        if not isinstance(hosts_value, list):
            raise self.error(("hosts",), "expected an array of tables: write each host as a [[hosts]] table")
        hosts: list[ClusterHost] = []
        seen: dict[str, FieldPath] = {}
        workers: dict[tuple[str, int], str] = {}  # a tls worker's address: the host that names it
        for index, entry in enumerate(hosts_value):
            path: FieldPath = ("hosts", index)
            if not isinstance(entry, dict):
                raise self.error(path, "expected a table with name and address; write it as a [[hosts]] table")
            host = self._host(entry, path, merged_defaults)
            self._unique(host.name, (*path, "name"), seen)
            if host.transport == "tls":
                self._one_entry_per_worker(host, path, workers)
            hosts.append(host)

        local = self._local(data.get("local"), merged_defaults)
        if local is not None:
            self._unique(local.name, ("local", "name"), seen)
        allocations = read_allocations(data["allocations"], self) if "allocations" in data else ()
        for index, allocation in enumerate(allocations):
            for name in allocation.host_names:
                self._unique(name, ("allocations", index, "name"), seen)
        if not hosts and local is None and not allocations:
            raise ConfigError(
                f"{self._source}: no hosts: add a [[hosts]] table with an address, local = true, or [[allocations]]"
            )
        tls = self._tls(self._table(data, ("tls",))) if "tls" in data else None
        if tls is None:
            for index, host in enumerate(hosts):
                if host.transport == "tls":
                    raise self.error(
                        ("hosts", index, "transport"),
                        "a tls host needs a [tls] table with ca, cert and key (make them with `batuta certs init DIR`)",
                    )
        return ClusterConfig(
            hosts=tuple(hosts),
            local=local,
            ssh=self._ssh(self._table(data, ("ssh",))),
            pool=self._pool(self._table(data, ("pool",))),
            source=self._source,
            tls=tls,
            policy=self._policy(self._table(data, ("policy",))),
            allocations=allocations,
        )

    def _host(self, entry: dict[str, Any], path: FieldPath, defaults: dict[str, Any]) -> ClusterHost:
        self._known_keys(entry, path, _HOST_KEYS)
        if "address" not in entry:
            raise self.error(path, 'missing address; add address = "<host name, IP or ~/.ssh/config alias>"')
        address = self._string((*path, "address"), entry["address"])
        host_part, colon, port_part = address.rpartition(":")
        if colon and host_part and ":" not in host_part and port_part.isdigit():  # not IPv6: two or more
            raise self.error(
                (*path, "address"),
                f'{address!r} names a port: write address = "{host_part}" and port = {port_part} instead',
            )
        if "@" in address or any(c.isspace() for c in address):
            raise self.error(
                (*path, "address"),
                f"{address!r} is not a host name or address; put a user in user = ... and a port in port = ...",
            )
        name = self._host_name((*path, "name"), entry["name"]) if "name" in entry else address
        if "name" not in entry and not HOST_NAME.match(name):
            raise self.error((*path, "address"), f'cannot use {address!r} as the host name; add name = "..."')
        fields = dict(defaults)
        own = self._host_fields(entry, path)
        fields["env"] = {**defaults.get("env", {}), **own.pop("env", {})}
        fields["tags"] = defaults.get("tags", frozenset()) | own.pop("tags", frozenset())
        fields["kernel_modules"] = _merge_unique(defaults.get("kernel_modules", ()), own.pop("kernel_modules", ()))
        fields.update(own)
        if fields.get("transport") == "tls":
            for key in entry:
                if key == "bootstrap":
                    raise self.error(
                        (*path, key),
                        "a tls worker is installed by its owner (batuta cluster install and bootstrap work over SSH)",
                    )
                if key not in _TLS_HOST_KEYS:
                    flag = _WORKER_FLAGS.get(key)
                    raise self.error(
                        (*path, key),
                        f"has no effect on a tls host: set it on the worker's command line (batuta worker {flag})"
                        if flag is not None
                        else "has no effect on a tls host: an SSH setting; a worker runs as the user who started "
                        "it, with that user's python and environment",
                    )
            # [defaults] speak of SSH hosts (user, python, an sshd port): none of it applies here.
            fields = {k: v for k, v in fields.items() if k in ("tags", "transport")}
            if "port" in own:
                fields["port"] = own["port"]
        host = ClusterHost(name=name, address=address, **fields)
        if host.slots == 0 and host.gpus == "none":
            raise self.error((*path, "slots"), 'the host has no slots (slots = 0 and gpus = "none"); give it some')
        return host

    def _host_fields(self, table: dict[str, Any], path: FieldPath) -> dict[str, Any]:
        """The checked values of the keys a host and [defaults] share, only those present."""
        checkers: dict[str, Callable[[FieldPath, Any], Any]] = {
            "port": self._port,
            "user": self._string,
            "identity_file": self._path,
            "python": self._string,
            "slots": self._slots,
            "gpus": self._gpus,
            "env": self._env,
            "tags": self._tags,
            "kernel_modules": self._modules,
            "transport": self._transport,
            "bootstrap": self._bool,
            "index_url": self._index_url,
        }
        fields = {key: check((*path, key), table[key]) for key, check in checkers.items() if key in table}
        if fields.get("bootstrap") and "python" in fields:  # bootstrap was ignored for such a host
            raise self.error(
                (*path, "bootstrap"),
                "bootstrap = true starts the agent from the environment it installs, and python = "
                f"{fields['python']!r} names another; keep one of them",
            )
        return fields

    def _local(self, value: Any, defaults: dict[str, Any]) -> LocalHostConfig | None:
        path: FieldPath = ("local",)
        if value is None or value is False:
            return None
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise self.error(path, f"expected true, false or a [local] table, got {shown(value)}")
        self._known_keys(value, path, _LOCAL_KEYS)
        if "enabled" in value and not self._bool((*path, "enabled"), value["enabled"]):
            return None
        fields: dict[str, Any] = {key: defaults[key] for key in _LOCAL_INHERITS if key in defaults}
        own = self._host_fields({k: v for k, v in value.items() if k not in ("name", "enabled")}, path)
        fields["env"] = {**fields.get("env", {}), **own.pop("env", {})}
        fields["tags"] = fields.get("tags", frozenset()) | own.pop("tags", frozenset())
        fields["kernel_modules"] = _merge_unique(fields.get("kernel_modules", ()), own.pop("kernel_modules", ()))
        fields.update(own)
        if "name" in value:
            fields["name"] = self._host_name((*path, "name"), value["name"])
        local = LocalHostConfig(**fields)
        if local.slots == 0 and local.gpus == "none":
            raise self.error((*path, "slots"), 'the local host has no slots (slots = 0 and gpus = "none")')
        return local

    def _ssh(self, table: dict[str, Any]) -> SSHSettings:
        path: FieldPath = ("ssh",)
        self._known_keys(table, path, _SSH_KEYS)
        fields: dict[str, Any] = {}
        if "known_hosts" in table:
            fields["known_hosts"] = self._path((*path, "known_hosts"), table["known_hosts"])
        if "config" in table:
            value = table["config"]
            if value is False or (isinstance(value, str) and value.lower() == "none"):
                fields["config_files"] = ()
            elif isinstance(value, list):
                fields["config_files"] = tuple(self._path((*path, "config", i), item) for i, item in enumerate(value))
            else:
                fields["config_files"] = (self._path((*path, "config"), value),)
        if "connect_timeout" in table:
            fields["connect_timeout"] = self._seconds((*path, "connect_timeout"), table["connect_timeout"])
        if "trust_on_first_use" in table:
            fields["trust_on_first_use"] = self._bool((*path, "trust_on_first_use"), table["trust_on_first_use"])
        for key, parse in (("data_link", parse_data_link), ("data_link_encryption", parse_data_link_encryption)):
            try:  # off, "ssh" or an address; "tls" or "none" (plain TCP): transport/bulk.py
                fields[key] = parse(self._string((*path, key), table[key])) if key in table else fields.get(key)
            except ValueError as exc:
                raise self.error((*path, key), str(exc)) from None
        if fields.pop("data_link_encryption") is False:
            if fields["data_link"] is None:  # plain links asked for, but no link: a mistake, not a no-op
                raise self.error(
                    (*path, "data_link_encryption"),
                    '"none" applies to data links, and data_link is off: set data_link = "ssh" '
                    "(or an address) as well, or remove data_link_encryption",
                )
            fields["data_link"] = replace(fields["data_link"], encrypted=False)
        return SSHSettings(**fields)

    def _wait_seconds(self, path: FieldPath, value: Any) -> float:
        """Seconds >= 0, or inf (TOML's `inf`): for as long as it takes."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(path, f"expected a number of seconds (or inf), got {shown(value)}")
        if not value >= 0:
            raise self.error(path, f"expected a number of seconds >= 0 (or inf), got {value}")
        return float(value)

    def _pool(self, table: dict[str, Any]) -> PoolConfig:
        path: FieldPath = ("pool",)
        self._known_keys(table, path, _POOL_KEYS)
        fields: dict[str, Any] = {}
        for key in ("heartbeat_interval", "suspect_after", "lost_after", "start_timeout", "relaunch_backoff"):
            if key in table:
                fields[key] = self._seconds((*path, key), table[key])
        if "start_wait" in table:  # 0 is allowed: tasks start as soon as one host is up
            fields["start_wait"] = self._wait_seconds((*path, "start_wait"), table["start_wait"])
        if "seed" in table:
            fields["seed"] = self._int((*path, "seed"), table["seed"])
        if "max_relaunches" in table:
            fields["max_relaunches"] = self._count((*path, "max_relaunches"), table["max_relaunches"])
        if "max_parallel_starts" in table:
            parallel = self._count((*path, "max_parallel_starts"), table["max_parallel_starts"])
            fields["max_parallel_starts"] = max(1, parallel)
        # Backend.AUTO's size thresholds (the seed's table), in elements
        sizes = {key: self._count((*path, key), table[key]) for key in ("scalar_below", "gpu_above") if key in table}
        if sizes:
            fields["thresholds"] = BackendThresholds(**sizes)
        if "max_code_mb" in table:  # the most of the user's code shipped to one host
            value = table["max_code_mb"]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_CODE_MB:
                raise self.error(
                    (*path, "max_code_mb"), f"expected a number of MiB in (0, {MAX_CODE_MB}], got {shown(value)}"
                )
            fields["code"] = CodeSpec(max_bytes=int(value * 2**20))
        fields["code"] = replace(fields.get("code", CodeSpec()), search_folders=(self._base_dir,))
        config = PoolConfig(**fields)
        if config.suspect_after > config.lost_after:
            raise self.error(
                (*path, "suspect_after"),
                f"{config.suspect_after:g}s is after lost_after ({config.lost_after:g}s); "
                "a host is suspected before it is lost",
            )
        if config.heartbeat_interval >= config.suspect_after:
            raise self.error(
                (*path, "heartbeat_interval"),
                f"{config.heartbeat_interval:g}s is not below suspect_after ({config.suspect_after:g}s); "
                "every host would be suspected between heartbeats",
            )
        return config

    def _policy(self, table: dict[str, Any]) -> PolicyConfig:
        path: FieldPath = ("policy",)
        self._known_keys(table, path, POLICY_COMPONENTS + POLICY_THRESHOLDS)
        versions: dict[str, str] = {}
        for key in POLICY_COMPONENTS:
            if key not in table:
                continue
            value = table[key]
            level = value.strip().lower() if isinstance(value, str) else value
            if level not in POLICY_LEVELS:
                raise self.error(
                    (*path, key),
                    f"expected one of {', '.join(repr(v) for v in POLICY_LEVELS)}, got {shown(value)}; "
                    f'for example {key} = "minor"',
                )
            versions[key] = level
        fields: dict[str, Any] = {"versions": versions}
        for key in POLICY_THRESHOLDS:
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                    raise self.error((*path, key), f"expected a number of GiB >= 0, got {shown(value)}")
                fields[key] = float(value)
        return PolicyConfig(**fields)

    def _tls(self, table: dict[str, Any]) -> TLSSettings:
        path: FieldPath = ("tls",)
        self._known_keys(table, path, _TLS_KEYS)
        for key in ("ca", "cert", "key"):
            if key not in table:
                raise self.error(path, f'missing {key}; add {key} = "<path>" (files from `batuta certs init DIR`)')
        fields: dict[str, Any] = {key: self._path((*path, key), table[key]) for key in ("ca", "cert", "key")}
        if "server_name" in table:
            fields["server_name"] = self._string((*path, "server_name"), table["server_name"])
        for key in ("connect_timeout", "hello_timeout"):
            if key in table:
                fields[key] = self._seconds((*path, key), table[key])
        if "busy_timeout" in table:  # 0 is allowed: try a busy or full worker once
            fields["busy_timeout"] = self._seconds(
                (*path, "busy_timeout"), table["busy_timeout"], zero_means="try a busy or full worker once"
            )
        return TLSSettings(**fields)

    def _transport(self, path: FieldPath, value: Any) -> str:
        if value not in ("ssh", "tls"):
            raise self.error(path, f'expected "ssh" or "tls", got {shown(value)}')
        return str(value)

    # -- structure checks --

    def _index_url(self, path: FieldPath, value: Any) -> str:
        url = self._string(path, value)
        problem = index_url_problem(url)
        if problem:
            raise self.error(path, problem)
        return url

    def _one_entry_per_worker(self, host: ClusterHost, path: FieldPath, workers: dict[tuple[str, int], str]) -> None:
        """A worker serves one coordinator session at a time: listed twice, the run's second
        session to it was refused as "busy with another coordinator", which was the run itself."""
        address = host.address.strip("[]").lower()
        where = ("127.0.0.1" if address == "localhost" else address, host.port or TLS_DEFAULT_PORT)
        if where in workers:
            raise self.error(
                (*path, "address"),
                f"{host.name} is the worker {workers[where]} is ({host.address}:{where[1]}); a worker serves "
                "one coordinator session at a time: list it once (its --slots give it more work at once)",
            )
        workers[where] = host.name

    def _unique(self, name: str, path: FieldPath, seen: dict[str, FieldPath]) -> None:
        if name in seen:
            raise self.error(
                path,
                f"duplicate host name {name!r} (also {field_name(seen[name][:-1])}); "
                'host names must be unique: set name = "..."',
            )
        seen[name] = path


def _merge_unique(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*first, *second)))
