"""Stage code versions derived from the code a stage runs, never kept by hand.

A stage's version hashes the source of its entry modules and of every `vlmtune` module they reach
by import (the closure over every `import` statement, lazy ones inside functions included, read
with `ast` and never executed), plus the installed versions of the libraries whose upgrade can
change the stage's output. Comments and blank lines do not count, so rewording a comment rebuilds
nothing; any other edit to a module a stage can reach rebuilds that stage, and through the
fingerprints that chain the stages, everything downstream of it.

`vlmtune.config` is left out on purpose: it holds the configs' defaults and validation, and every
stage hashes the resolved config values themselves into its fingerprint, so a changed training
default rebuilds training (through its values) without also rebuilding the cleaning.
"""

from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding vlmtune/, assets/, pipelines/
FOLLOWED_PACKAGE = "vlmtune"
VALUES_ONLY = frozenset({"vlmtune.config"})


def stage_code_version(entry_modules: Iterable[str], libraries: Iterable[str] = (), root: Path = ROOT) -> str:
    """A short hash of the entry modules, the `vlmtune` modules they import, and the libraries' versions."""
    digest = hashlib.sha256()
    for name, path in sorted(module_closure(entry_modules, root).items()):
        digest.update(f"{name}\0{source_digest(path)}\0".encode())
    for library in sorted(libraries):
        digest.update(f"{library}=={library_version(library)}\0".encode())
    return digest.hexdigest()[:16]


def module_closure(entry_modules: Iterable[str], root: Path = ROOT) -> dict[str, Path]:
    """{module name: source file} for the entry modules and every `vlmtune` module they reach."""
    entry_modules = list(entry_modules)
    found: dict[str, Path] = {}
    waiting = list(entry_modules)
    while waiting:
        name = waiting.pop()
        if name in found or name in VALUES_ONLY:
            continue
        path = module_file(name, root)
        if path is None:
            if name in entry_modules:
                raise ModuleNotFoundError(f"no source for entry module {name!r} under {root}")
            continue  # `from vlmtune.x import y`: y is a name in x, not a module of its own
        found[name] = path
        for imported in imported_modules(path, name):
            if imported == FOLLOWED_PACKAGE or imported.startswith(FOLLOWED_PACKAGE + "."):
                parts = imported.split(".")
                # a module's parent packages run their __init__ when it is imported
                waiting.extend(".".join(parts[:index]) for index in range(1, len(parts) + 1))
    return found


def module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module_name: str) -> set[str]:
    """Every module `path` imports, and for `from m import n` also `m.n` (which may be a module)."""
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def source_digest(path: Path) -> str:
    """A hash of the module's tokens without comments and blank lines (formatting-only edits still count)."""
    skipped = {tokenize.COMMENT, tokenize.NL}
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    text = "\0".join(f"{token.type}:{token.string}" for token in tokens if token.type not in skipped)
    return hashlib.sha256(text.encode()).hexdigest()


def library_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"
