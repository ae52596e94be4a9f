"""The user's code on the wire: `Code`, `CodeStored` and `CodeLoaded`, and `Hello.modules`.

A part of `_wire.py` (whose docstring describes the format): a Code message is `[tag, digest,
modules, files]`, each file `[path, bytes]`, at most MAX_CODE_FILES files (each path once) and
MAX_CODE_MODULES modules, and its digest must be the one its files and modules give (checked
both ways, so a bundle that does not match what it claims is never written on a host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batuta.protocol._fields import (
    Invalid,
    bytes_,
    check_len,
    code_path,
    digest,
    expected,
    module_name,
    records,
    seq,
    str_map,
)
from batuta.protocol._tags import TAGS
from batuta.protocol._values import OobWriter
from batuta.protocol.messages import Code, CodeFile, CodeLoaded, CodeStored, code_digest

MAX_CODE_FILES = 10_000  # files in one Code message
MAX_CODE_MODULES = 1_000  # modules it names, and failures a CodeLoaded reports


def code_files(x: Any, field: str, record: Callable[[Any], Any]) -> list[Any]:
    """The files of a Code message: at most MAX_CODE_FILES, each path once."""
    count = len(seq(x, field))
    if count > MAX_CODE_FILES:
        raise Invalid(field, f"at most {MAX_CODE_FILES} files, got {count}")
    files = records(record, x, field)
    seen: set[str] = set()
    for i, entry in enumerate(files):
        path = entry[0] if type(entry) is list else entry.path
        if path in seen:
            raise Invalid(f"{field}[{i}]", f"path {path!r} appears twice")
        seen.add(path)
    return files


def code_modules(x: Any, field: str) -> list[str]:
    items = seq(x, field)
    if len(items) > MAX_CODE_MODULES:
        raise Invalid(field, f"at most {MAX_CODE_MODULES} modules, got {len(items)}")
    return [module_name(item, f"{field}[{i}]") for i, item in enumerate(items)]


def check_code_digest(sent: str, files: Any, modules: list[str]) -> str:
    actual = code_digest(files, modules)
    if sent != actual:
        raise Invalid(".digest", f"does not match the files and modules (they give {actual}, not {sent})")
    return sent


def enc_code_file(f: Any) -> list[Any]:
    if type(f) is not CodeFile:
        raise expected("", "a CodeFile", f)
    return [code_path(f.path, ".path"), bytes_(f.data, ".data")]


def enc_code(m: Code, oob: OobWriter) -> list[Any]:
    sent = digest(m.digest, ".digest")
    modules = code_modules(m.modules, ".modules")
    files = code_files(m.files, ".files", enc_code_file)
    check_code_digest(sent, m.files, modules)
    return [TAGS[Code], sent, modules, files]


def enc_code_stored(m: CodeStored, oob: OobWriter) -> list[Any]:
    return [TAGS[CodeStored], digest(m.digest, ".digest")]


def enc_code_loaded(m: CodeLoaded, oob: OobWriter) -> list[Any]:
    return [TAGS[CodeLoaded], digest(m.digest, ".digest"), code_errors(m.errors, ".errors")]


def module_digests(x: Any, field: str) -> dict[str, str]:
    """Hello.modules: at most MAX_CODE_MODULES module names, each to a sha256 digest or ""."""
    digests = str_map(x, field)
    if len(digests) > MAX_CODE_MODULES:
        raise Invalid(field, f"at most {MAX_CODE_MODULES} modules, got {len(digests)}")
    for key, value in digests.items():
        module_name(key, f"{field}[{key!r}]")
        digest(value, f"{field}[{key!r}]", empty=True)
    return digests


def code_errors(x: Any, field: str) -> dict[str, str]:
    errors = str_map(x, field)
    if len(errors) > MAX_CODE_MODULES:
        raise Invalid(field, f"at most {MAX_CODE_MODULES} modules, got {len(errors)}")
    for key in errors:
        module_name(key, f"{field}[{key!r}]")
    return errors


def dec_code_file(w: Any) -> CodeFile:
    path, data = check_len(w, 2, "CodeFile")
    return CodeFile(path=code_path(path, ".path"), data=bytes_(data, ".data"))


def dec_code(w: list[Any]) -> Code:
    _, sent, modules, files = w
    sent = digest(sent, ".digest")
    module_names = code_modules(modules, ".modules")
    bundle = code_files(files, ".files", dec_code_file)
    check_code_digest(sent, bundle, module_names)
    return Code(digest=sent, modules=tuple(module_names), files=tuple(bundle))


def dec_code_stored(w: list[Any]) -> CodeStored:
    return CodeStored(digest=digest(w[1], ".digest"))


def dec_code_loaded(w: list[Any]) -> CodeLoaded:
    return CodeLoaded(digest=digest(w[1], ".digest"), errors=code_errors(w[2], ".errors"))
