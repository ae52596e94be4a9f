"""Certificates for TLS workers: a private CA, a server certificate, a client certificate.

`batuta certs init DIR` writes, with `cryptography`:

    ca.pem      the private CA (basicConstraints CA:TRUE pathlen 0; keyCertSign, cRLSign)
    ca.key      its key (0600): keep it off the workers; it signs new certificates
    server.pem  the worker's certificate: serverAuth, SAN = the --host names and addresses
    server.key  its key (0600)
    client.pem  the coordinator's certificate: clientAuth
    client.key  its key (0600)

`batuta certs reissue DIR --host NAME` writes a new server.pem and server.key (or NAME.pem and
NAME.key with --name) signed by DIR's CA, for one worker whose names changed: the
coordinators' files stay as they are. It revokes nothing: the old certificate stays valid
until it expires (no CRL is checked), so a leaked worker key is shut out only by a new CA.

Keys are ECDSA P-256. Key files are created with mode 0600 from the first byte (O_EXCL,
never chmod after the fact), and existing files are never overwritten unless asked. The
library functions (`new_ca`, `issue`) are what the tests use to make certificates from
another CA, expired ones and ones naming the wrong host.

`cryptography` is imported here only; nothing else in batuta needs it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from batuta.errors import UsageError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825  # what browsers still accept for a leaf; the CA gets ten years
CA_DAYS = 3650
SERVER = "server"
CLIENT = "client"

KeyType = ec.EllipticCurvePrivateKey
_USAGE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: KeyType

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where `init_certs` wrote everything."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "batuta"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> KeyType:
    return ec.generate_private_key(ec.SECP256R1())


def new_ca(
    common_name: str = "batuta private CA",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=CA_DAYS)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue(
    ca: Issued,
    kind: str,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by `ca`: `kind` "server" (serverAuth, SAN = `hosts`) or
    "client" (clientAuth). `not_before`/`not_after` override the validity (tests use them)."""
    if kind not in (SERVER, CLIENT):
        raise ValueError(f"kind must be {SERVER!r} or {CLIENT!r}, not {kind!r}")
    if kind == SERVER and not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    key = _new_key()
    public = key.public_key()
    start = not_before or _now() - dt.timedelta(minutes=5)
    # no later than the CA's own end: a chain is not valid beyond it, whatever the leaf says
    end = not_after or min(start + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


# -- files --------------------------------------------------------------------------------


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write `data` to a new file created with mode 0600 (never readable by others, even
    briefly). An existing file is refused unless `overwrite`, then replaced atomically."""
    path = Path(path)
    if overwrite:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _write_new(tmp, data, 0o600)
        os.replace(tmp, path)
    else:
        _write_new(path, data, 0o600)


def write_public(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Like `write_private`, mode 0644 (certificates are public)."""
    path = Path(path)
    if overwrite:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _write_new(tmp, data, 0o644)
        os.replace(tmp, path)
    else:
        _write_new(path, data, 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any beyond `mode`
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def init_certs(
    directory: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    client_name: str = "batuta-coordinator",
    server_name: str = "batuta-worker",
    force: bool = False,
) -> CertPaths:
    """Create a CA, a server and a client certificate in `directory` (created 0700).

    Raises UsageError if any of the six files exists (unless `force`), if `hosts` is empty
    or holds something that is neither a DNS name nor an IP address, or if `days` is not
    1 to `CA_DAYS`.
    """
    folder = Path(directory).expanduser()
    names = _host_names(hosts, days, "init")
    paths = CertPaths(
        directory=folder,
        ca_cert=folder / "ca.pem",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    files = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.client_cert, paths.client_key]
    existing = [p.name for p in files if p.exists() or p.is_symlink()]
    if existing and not force:
        raise UsageError(
            f"certs init: {folder} already holds {', '.join(existing)}; pass --force to replace them "
            "(every worker and coordinator then needs the new files)"
        )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"certs init: cannot create {folder}: {exc.strerror or exc}") from None
    ca = new_ca()
    server = issue(ca, SERVER, server_name, hosts=names, days=days)
    client = issue(ca, CLIENT, client_name, days=days)
    try:
        for issued, cert_path, key_path in (
            (ca, paths.ca_cert, paths.ca_key),
            (server, paths.server_cert, paths.server_key),
            (client, paths.client_cert, paths.client_key),
        ):
            write_private(key_path, issued.key_pem(), overwrite=force)
            write_public(cert_path, issued.cert_pem(), overwrite=force)
    except OSError as exc:
        raise UsageError(f"certs init: cannot write into {folder}: {exc.strerror or exc}") from None
    return paths


def reissue_server(
    directory: str | Path, *, hosts: Sequence[str], name: str = "server", days: int = DEFAULT_DAYS
) -> tuple[Path, Path]:
    """A new server certificate and key for `hosts`, signed by the CA of a `init_certs` folder,
    written over `name`.pem and `name`.key there (each replaced in one step); returns their
    paths. Raises UsageError for a folder without the CA's files, a bad name, host or days."""
    folder = Path(directory).expanduser()
    names = _host_names(hosts, days, "reissue")
    if not name or name != Path(name).name or name.startswith(".") or name in ("ca", "client"):
        raise UsageError(
            f"certs reissue: --name {name!r}: give a plain file name, not ca or client "
            "(it writes NAME.pem and NAME.key)"
        )
    ca_cert, ca_key = folder / "ca.pem", folder / "ca.key"
    missing = [p.name for p in (ca_cert, ca_key) if not p.is_file()]
    if missing:
        raise UsageError(
            f"certs reissue: {folder} has no {' or '.join(missing)}; run it on the folder 'batuta certs init' made "
            "(ca.key stays there, off the workers)"
        )
    try:
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"certs reissue: cannot read the CA in {folder}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key() or not _is_ca(cert):
        raise UsageError(
            f"certs reissue: {ca_key} is not the key of the CA {ca_cert}; give the folder 'batuta certs init' made"
        )
    ca = Issued(cert, key)
    server = issue(ca, SERVER, "batuta-worker", hosts=names, days=days)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    try:
        write_private(key_path, server.key_pem(), overwrite=key_path.exists())
        write_public(cert_path, server.cert_pem(), overwrite=cert_path.exists())
    except OSError as exc:
        raise UsageError(f"certs reissue: cannot write into {folder}: {exc.strerror or exc}") from None
    return cert_path, key_path


def _host_names(hosts: Sequence[str], days: int, action: str) -> list[str]:
    """`hosts` as a server certificate names them, checked; and `days` checked."""
    # `[::1]`, as an address is written with a port, is the address ::1
    names = [unbracketed(h.strip()) for h in hosts if h.strip()]
    if not names:
        raise UsageError(f"certs {action}: give at least one --host (a name or address the coordinator dials)")
    for name in names:
        _check_host(name, action)
    if days < 1:
        raise UsageError(f"certs {action}: --days {days}: expected 1 or more")
    if days > CA_DAYS:
        raise UsageError(
            f"certs {action}: --days {days}: at most {CA_DAYS}, the lifetime of the CA that signs them; "
            "the certificates would not be valid beyond it"
        )
    return names


def unbracketed(name: str) -> str:
    """`[::1]`, as an address is written beside a port, as the address ::1."""
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def _check_host(name: str, action: str) -> None:
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):  # 10.0.0.300 would be taken as a DNS name, and never match
        raise UsageError(f"certs {action}: --host {name!r} is not an IP address (each of its four numbers is 0-255)")
    ok = all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and label.isascii()
        for label in labels
    )
    if not ok or name.startswith("*") or len(name) > 253:
        raise UsageError(f"certs {action}: --host {name!r} is neither a DNS name nor an IP address")


def validity_problem(path: str | Path, *, now: dt.datetime | None = None) -> str | None:
    """Why the PEM certificate at `path` is not valid now ("expired on 2026-01-31 12:00 UTC"),
    or None; None too for a file that does not parse (loading it says why)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    now = now or _now()
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this machine's clock right?)"
    return None


def server_use_problem(path: str | Path) -> str | None:
    """Why the PEM certificate at `path` cannot be a listener's (a worker's, a served
    coordinator's): a CA, or an extended key usage without serverAuth (a client.pem). None
    when it can, or when the file does not parse (loading it says why)."""
    return _use_problem(path, ExtendedKeyUsageOID.SERVER_AUTH, "a server's", "serverAuth")


def client_use_problem(path: str | Path) -> str | None:
    """Why the PEM certificate at `path` cannot be a coordinator's ([tls] cert): a CA, or an
    extended key usage without clientAuth (a server.pem), which every worker would refuse at
    its handshake with OpenSSL's words only."""
    return _use_problem(path, ExtendedKeyUsageOID.CLIENT_AUTH, "a client's", "clientAuth")


def _use_problem(path: str | Path, usage: x509.ObjectIdentifier, whose: str, usage_name: str) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if _is_ca(cert):
        return f"is a CA certificate, not {whose}"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None  # no extended key usage: any use
    if usage in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return None
    usages = ", ".join(_USAGE_NAMES.get(u, u.dotted_string) for u in eku)
    return f"is not {whose}: its extended key usage allows {usages}, not {usage_name}"


def ca_problem(path: str | Path) -> str | None:
    """Why the PEM file at `path` cannot be the CA that peers are checked against: it holds a
    certificate that is not a CA (basicConstraints CA:TRUE), such as a server.pem. None when
    every certificate in it is a CA, or when it does not parse (loading it says why)."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    for cert in certs:
        if not _is_ca(cert):
            common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            named = f" ({common_name[0].value!s})" if common_name else ""
            return f"holds a certificate that is not a CA{named}: a leaf such as server.pem or client.pem"
    return None


def issuer_problem(cert_path: str | Path, ca_path: str | Path) -> str | None:
    """Why the certificate at `cert_path` looks mismatched with the CA file at `ca_path`: no
    CA in it issued the certificate (the ca.pem of one `batuta certs init` folder beside the
    server.pem of another). None when one did, or when a file does not parse (loading it says
    why). Two CAs, one for each direction, are a valid setup: this is for a warning only."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        authorities = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
    except (OSError, ValueError):
        return None
    for authority in authorities:
        try:
            cert.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return None
    return (
        f"certificate {cert_path} was not issued by the CA in {ca_path}; a peer that trusts only that "
        "CA refuses it (the files of two `batuta certs init` folders mixed?)"
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def describe(path: str | Path) -> str:
    """One line about a certificate file: subject, usages, names, validity (for `certs init`)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = ",".join(_USAGE_NAMES.get(u, u.dotted_string) for u in eku)
    except x509.ExtensionNotFound:
        usages = "CA"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        names = []
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    subject = common_name.decode() if isinstance(common_name, bytes) else common_name
    shown = f" for {', '.join(names)}" if names else ""
    return f"{Path(path).name}: {subject} ({usages}){shown}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def check_key_file(path: str | Path) -> str | None:
    """A warning if the private key file can be read by group or others (as ssh warns), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"key file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
    return None


_warned: set[str] = set()


def _warn_once(log: logging.Logger, message: str) -> None:
    """Certificates and keys are loaded again at every connection (each relaunch of a host,
    each viewer): what is wrong with them is said once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def warn_loose_key(path: str | Path, log: logging.Logger, who: str) -> None:
    """Log `check_key_file`'s warning, once."""
    warning = check_key_file(path)
    if warning is not None:
        _warn_once(log, f"{who}: {warning}")


def warn_foreign_issuer(cert: str | Path, ca: str | Path, log: logging.Logger, who: str) -> None:
    """Log `issuer_problem`'s warning, once."""
    problem = issuer_problem(cert, ca)
    if problem is not None:
        _warn_once(log, f"{who}: {problem}")
