"""Where users' own modules come from: the "package.module:Name" import paths a spec names (its
`algorithm`, `env` and `env_wrappers`).

A module is looked up as `python -m` would find it from the spec: in the spec's directory, then in the
working directory, then among installed packages. Python knows a module by its name alone, so one command
can hold only one file per module name: two specs whose `myenvs` are different files (common names such as
`envs.py` or `train.py` make this likely), or a user's file named like a module that labfleet, Ray or torch
already imported (`typing_extensions.py`), would silently train one file's code for both. `code_dirs` (a
command's specs together) refuses two files of one name, naming both; `import_path` refuses a user's file
that would stand in for a module that is not a user's; and Ray's processes get only the directories the
specs' import paths were found in, never every spec's directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ModuleClash(ImportError):
    """One module name, two files."""


def import_paths(spec: Any) -> list[str]:
    """The import paths ("package.module:Name") a spec names (`hparams.encoder` included)."""
    encoder = spec.hparams.get("encoder") if isinstance(spec.hparams, dict) else None
    names = [spec.algorithm, spec.env or "", *(w.type for w in spec.env_wrappers), str(encoder or "")]
    return [name for name in names if ":" in name]


def user_module_file(module_name: str, spec_dir: str | Path | None = None) -> Path | None:
    """The file the top-level name of `module_name` is in when it is a user's module (a `NAME.py` or a
    package `NAME/__init__.py` in the spec's directory or the working directory), else None."""
    top = module_name.partition(".")[0]
    for directory in _search_dirs(spec_dir):
        for candidate in (directory / f"{top}.py", directory / top / "__init__.py"):
            if candidate.is_file():
                return candidate.resolve()
    return None


CODE_DIRS_ENV = "LABFLEET_CODE_DIRS"  # set for a local Ray instance's processes: see `code_dirs`


def _search_dirs(spec_dir: str | Path | None) -> list[Path]:
    """The spec's directory, then the working directory; where no spec directory is known (a Ray worker
    building an env), the directories the driver chose (`CODE_DIRS_ENV`), else the working directory."""
    if spec_dir is not None:
        return [Path(spec_dir).resolve(), Path(os.getcwd()).resolve()]
    chosen = [Path(d) for d in os.environ.get(CODE_DIRS_ENV, "").split(os.pathsep) if d]
    return chosen or [Path(os.getcwd()).resolve()]


def _root(file: Path) -> Path:
    """The directory that goes on the path for a module file (a package's parent)."""
    return file.parent.parent if file.name == "__init__.py" else file.parent


def _loaded_from(module: Any) -> str:
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else "built into Python"


_LOADED: dict[str, str] = {}  # top-level module name -> the user's file `import_path` loaded it from


def check_clash(module_name: str, file: Path) -> None:
    """Make room for the user's `file` as the top-level module of `module_name`: a module of that name
    that an earlier command in this process loaded from another user's file is forgotten (with its
    submodules); one that is not a user's file (installed, or part of Python) raises `ModuleClash`, as the
    user's file would stand in for it. Two files of one name in one command are refused by `code_dirs`."""
    top = module_name.partition(".")[0]
    loaded = sys.modules.get(top)
    if loaded is None or _loaded_from(loaded) == str(file):
        return
    if _LOADED.get(top) != _loaded_from(loaded):
        raise ModuleClash(f"module {top!r} is {_loaded_from(loaded)} already, and {file} has the same name: one "
                          f"command holds one module per name, so rename one of the two files")
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def import_path(path: str, spec_dir: str | Path | None = None) -> Any:
    """The object that "package.module:Name" names, imported as `python -m` would find it: from the spec's
    directory, then the working directory. Only the module's import runs; nothing it names is called. A
    user's file whose module name is taken by another file in this process is refused (`ModuleClash`)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not of the form package.module:Name")
    file = user_module_file(module_name, spec_dir)
    if file is not None:
        check_clash(module_name, file)
        root = str(_root(file))
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        _LOADED[module_name.partition(".")[0]] = str(file)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module's own import-time code failed: the user's to see, as one line
        raise ImportError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def code_dirs(specs: Iterable[tuple[Any, str | Path]]) -> tuple[list[str], list[str]]:
    """The directories Ray's processes need on their path for these (spec, spec directory) pairs: those the
    specs' user modules are in, and nothing else. Returns them and the clashes found between specs (one
    module name, two files), each a sentence naming both files."""
    chosen: dict[str, Path] = {}  # top-level module name -> its file
    clashes: list[str] = []
    for spec, spec_dir in specs:
        for path in import_paths(spec):
            module_name = path.partition(":")[0]
            file = user_module_file(module_name, spec_dir)
            if file is None:
                continue
            top = module_name.partition(".")[0]
            if top in chosen and chosen[top] != file:
                clashes.append(f"module {top!r} is {chosen[top]} for one spec and {file} for another: one command "
                               f"holds one module per name, so rename one of the two files")
            chosen.setdefault(top, file)
    return list(dict.fromkeys(str(_root(file)) for file in chosen.values())), clashes
