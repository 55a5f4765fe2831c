"""Reading specs and suites: YAML (safe_load only), --set overrides, validation into problems.

Every check that can reject a spec runs here, before anything starts or is written, and reports every
problem it finds as `FILE: field.path: what is wrong (line N)`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from labfleet.errors import Problem, SpecError
from labfleet.spec.models import ExperimentSpec, SuiteEntry, SuiteSpec

# --------------------------------------------------------------------------------------------------
# YAML with line numbers


class SpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no tags beyond plain data) with two changes for specs and `--set` values:
    - floats as YAML 1.2 and every config tool read them: `3e-4` and `1e5` are numbers, not strings
      (YAML 1.1's resolver wants a dot and a signed exponent);
    - a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, list | dict):
                    continue  # unhashable: SafeLoader says so itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


SpecLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    SpecLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in SpecLoader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"]
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))

MAX_SPEC_BYTES = 1 << 20  # a spec or suite is a page of YAML; anything larger is not one
# Values a document may hold once its aliases are expanded: a spec or suite is a page of YAML, and an
# alias bomb ("billion laughs": nine aliases of nine aliases of ...) is a few lines that expand past memory.
MAX_YAML_NODES = 20_000


def parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document, with SpecLoader. Raises yaml.YAMLError or RecursionError;
    a document whose aliases expand past `MAX_YAML_NODES` values, or refer to themselves, is refused
    before any of it is built."""
    loader = SpecLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expanded_size(root)
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of the document as its aliases expand them (each node once, memoised: linear in
    the file's size); raise yaml.YAMLError past `MAX_YAML_NODES` or on an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: an alias refers to the anchor it is inside "
                                 "(a value that contains itself)")
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values once its aliases are expanded; a spec or "
                                     "suite is a page of YAML (an alias bomb?)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


@dataclass
class YamlDocument:
    source: str
    data: Any
    root: yaml.Node | None
    overridden: frozenset[str] = frozenset()  # dotted keys whose values came from --set, not the file

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        """1-based line of the deepest node along `path` that exists in the file."""
        node, line = self.root, None
        for part in path:
            if node is None:
                break
            line = node.start_mark.line + 1
            node = _child(node, part)
        if node is not None:
            line = node.start_mark.line + 1
        return line

    def where(self, path: tuple[str | int, ...]) -> str:
        """" (line N)", " (from --set)" when a --set override gave the value at `path`, or ""."""
        dotted = ".".join(str(p) for p in path)
        if any(dotted == key or dotted.startswith(key + ".") for key in self.overridden):
            return " (from --set)"
        line = self.line_of(path)
        return f" (line {line})" if line else ""


def _where(doc: YamlDocument | None, path: tuple[str | int, ...]) -> str:
    return doc.where(path) if doc is not None else ""


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def read_yaml(path: str | Path) -> YamlDocument:
    source = str(path)
    try:
        if Path(path).exists() and not Path(path).is_file():  # a device (/dev/zero), a FIFO or a directory
            raise SpecError([Problem(source, "", "not a regular file")])
        with open(path, "rb") as handle:  # at most one byte past the limit, however large the file is
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([Problem(source, "", f"cannot read file: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([Problem(source, "", f"the file has more than {MAX_SPEC_BYTES} bytes; a spec has at most "
                                 f"{MAX_SPEC_BYTES}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError([Problem(source, "", f"not UTF-8 text: byte {exc.start} (line {line}) is "
                                 f"0x{raw[exc.start]:02x}; save the spec as UTF-8")]) from None
    try:
        data, root = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(source, "", f"{where}invalid YAML: {what}")]) from None
    except RecursionError:
        raise SpecError([Problem(source, "", "invalid YAML: nested too deeply for a spec")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(source, "", f"expected a mapping of fields at the top, got {type(data).__name__}")])
    return YamlDocument(source, data, root)


# --------------------------------------------------------------------------------------------------
# --set KEY=VALUE


def parse_set_options(items: list[str], source: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` strings -> {dotted key: YAML-parsed value}."""
    overrides: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(source, item, "expected KEY=VALUE with KEY a dotted path, e.g. hparams.gamma=0.98"))
            continue
        try:
            overrides[key] = parse_yaml(raw)[0] if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as exc:
            problems.append(Problem(source, key, f"the value is not valid YAML: {getattr(exc, 'problem', exc)}"))
    if problems:
        raise SpecError(problems)
    return overrides


def from_set(doc: YamlDocument, overrides: dict[str, Any]) -> YamlDocument:
    """The document with `overrides` marked as given by --set, so that problems with them say so."""
    return dataclasses.replace(doc, overridden=doc.overridden | frozenset(overrides))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str = "--set") -> dict[str, Any]:
    """A copy of `data` with each dotted key set to its value (a mapping replaces the mapping at KEY)."""
    result = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = result
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise SpecError([Problem(source, key, f"{'.'.join(parts[:i]) or 'the spec'} is not a mapping")])
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                raise SpecError([Problem(source, key, f"index {last} is out of range (length {len(node)})")])
            node[int(last)] = copy.deepcopy(value)
        elif isinstance(node, dict):
            node[last] = copy.deepcopy(value)
        else:
            raise SpecError([Problem(source, key, f"{'.'.join(parts[:-1])} is not a mapping")])
    return result


# --------------------------------------------------------------------------------------------------
# pydantic errors -> problems


def _loc_path(loc: tuple[Any, ...]) -> str:
    # Tagged unions add the tag to the location (`lr_schedule.step.gamma`); users never wrote it.
    return ".".join(str(p) for p in loc)


def _unwrap(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None), typing.Annotated):
        found: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap(arg))
        return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc` (raw pydantic location, union tags included)."""
    models = [model]
    for part in loc:
        tagged = [m for m in models if getattr(m.model_fields.get("type"), "default", None) == part]
        if len(models) > 1 and tagged:  # the tag of a tagged union picks its member
            models = tagged
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            field = m.model_fields.get(str(part))
            # No such field: `part` is a key into a dict-valued field; the next part names a field again.
            nxt.extend(_unwrap(field.annotation) if field is not None else [m])
        models = nxt
    names: list[str] = []
    for m in models:
        names.extend(n for n in m.model_fields if n not in names)
    return names


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop what pydantic puts into locations that users never wrote: the tag of a tagged union
    (`lr_schedule.step.gamma` -> `lr_schedule.gamma`) and the member names of plain unions."""
    out: list[Any] = []
    previous: Any = None
    for part in loc:
        is_tag = previous in _TAGGED_FIELDS and part in _TAGGED_FIELDS[previous]
        if not (is_tag or (isinstance(part, str) and _UNION_MEMBER.match(part))):
            out.append(part)
        previous = part
    return tuple(out)


_UNION_MEMBER = re.compile(r"^[\w-]+\[.*\]$")  # pydantic's names of union members: `function-after[...]`
_TAGGED_FIELDS = {"lr_schedule": {"constant", "linear", "step", "exponential", "inverse_time"}}


def validation_problems(
    exc: ValidationError, model: type[BaseModel], doc: YamlDocument | None, source: str, prefix: tuple = ()
) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        raw_loc = tuple(err["loc"])
        loc = _strip_union_tags(raw_loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, raw_loc[:-1])
            close = difflib.get_close_matches(str(raw_loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            message = f"unknown field (allowed: {', '.join(allowed)}){hint}"
        elif err["type"] == "missing":
            message = "required field is missing"
        full = prefix + loc
        problems.append(Problem(source, _loc_path(full), message + _where(doc, full)))
    return problems


# --------------------------------------------------------------------------------------------------
# specs


def resolve_spec_data(
    data: dict[str, Any], source: str, doc: YamlDocument | None = None, check_env: bool = True
) -> ExperimentSpec:
    """Validate raw spec data (overrides already applied) into a resolved spec, or raise SpecError."""
    from labfleet.algorithms import registry
    from labfleet.spec.envcheck import check_algorithm_fits, check_env_id

    hparams_raw = data.get("hparams", {})
    spec_dir = Path(source).parent if doc is not None else None
    try:
        spec = ExperimentSpec.model_validate({**data, "hparams": {}})
    except ValidationError as exc:
        problems = validation_problems(exc, ExperimentSpec, doc, source)
        problems += _hparams_problems(data, hparams_raw, source, doc)
        env = data.get("env")
        if check_env and isinstance(env, str) and not any(p.path == "env" for p in problems):
            problem = check_env_id(env, spec_dir)  # listed with the rest, though the spec cannot be built yet
            if problem:
                problems.append(Problem(source, "env", problem + _where(doc, ("env",))))
        raise SpecError(problems) from None
    problems = _hparams_problems(data, hparams_raw, source, doc)
    if problems:
        raise SpecError(problems)
    info = registry.get(spec.algorithm, str(spec_dir) if spec_dir is not None else None)
    spec.hparams = info.hparams.model_validate(hparams_raw).model_dump(mode="json")

    def at(path: str, message: str) -> Problem:
        return Problem(source, path, message + _where(doc, tuple(path.split("."))))

    problems = [at(path, msg) for path, msg in check_algorithm_fits(spec, info, check_env=check_env,
                                                                       spec_dir=spec_dir)]
    if problems:
        raise SpecError(problems)
    return spec


def _hparams_problems(data: dict, hparams_raw: Any, source: str, doc: YamlDocument | None) -> list[Problem]:
    from labfleet.algorithms import registry

    algorithm = data.get("algorithm")
    if not isinstance(algorithm, str):
        return []
    try:
        info = registry.get(algorithm, str(Path(source).parent) if doc is not None else None)
    except KeyError:
        return [Problem(source, "algorithm", f"unknown algorithm {algorithm!r} "
                        f"(available: {', '.join(registry.names())}, or package.module:Name for your own "
                        f"code)" + _where(doc, ("algorithm",)))]
    except (ImportError, TypeError) as exc:
        return [Problem(source, "algorithm", str(exc) + _where(doc, ("algorithm",)))]
    if not isinstance(hparams_raw, dict):
        return [Problem(source, "hparams", f"expected a mapping, got {type(hparams_raw).__name__}")]
    try:
        info.hparams.model_validate(hparams_raw)
    except ValidationError as exc:
        return validation_problems(exc, info.hparams, doc, source, prefix=("hparams",))
    return []


def resolve_document(doc: YamlDocument, overrides: dict[str, Any] | None = None, check_env: bool = True,
                     set_source: str = "--set") -> tuple[dict[str, Any], ExperimentSpec]:
    """A read spec file with its overrides: (the data with the overrides applied, the resolved spec). The one
    way from a file to a spec (`load_spec`, the commands, the Python API, submissions); problems with an
    override say that it came from `set_source`."""
    doc = from_set(doc, overrides or {})
    data = apply_overrides(doc.data, overrides or {}, source=set_source)
    return data, resolve_spec_data(data, doc.source, doc, check_env=check_env)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None, check_env: bool = True) -> ExperimentSpec:
    return resolve_document(read_yaml(path), overrides, check_env)[1]


# --------------------------------------------------------------------------------------------------
# suites


@dataclass
class ResolvedEntry:
    entry: SuiteEntry
    spec_path: Path
    spec: ExperimentSpec
    data: dict[str, Any] = field(default_factory=dict)  # the spec's data with every override applied


def is_suite(data: dict[str, Any]) -> bool:
    return "experiments" in data and "algorithm" not in data


def load_suite(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SuiteSpec, list[ResolvedEntry]]:
    """Validate a suite and every spec it names; report the problems of all of them together."""
    doc = read_yaml(path)
    try:
        suite = SuiteSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, SuiteSpec, doc, doc.source)) from None
    base = Path(path).parent
    problems: list[Problem] = []
    entries: list[ResolvedEntry] = []
    for i, entry in enumerate(suite.experiments):
        spec_path = base / entry.spec
        if not spec_path.is_file():
            problems.append(Problem(doc.source, f"experiments.{i}.spec",
                                    f"no such file: {spec_path}" + doc.where(("experiments", i, "spec"))))
            continue
        try:
            spec_doc = read_yaml(spec_path)
            spec_doc = dataclasses.replace(spec_doc, data=apply_overrides(
                spec_doc.data, entry.set, source=f"{doc.source}: experiments.{i}.set"))  # the entry's own, first
            data, resolved = resolve_document(spec_doc, overrides)
            if entry.sweep and resolved.sweep is None:
                problems.append(Problem(doc.source, f"experiments.{i}.sweep",
                                        f"{spec_path.name} has no `sweep:` section to run as a sweep"))
                continue
            entries.append(ResolvedEntry(entry, spec_path, resolved, data))
        except SpecError as exc:
            problems.extend(exc.problems)
    from labfleet.usercode import code_dirs

    problems += [Problem(doc.source, "experiments", clash)
                 for clash in code_dirs((e.spec, e.spec_path.parent) for e in entries)[1]]
    if problems:
        raise SpecError(problems)
    counts = collections.Counter(e.spec.name for e in entries)
    duplicates = sorted(n for n, count in counts.items() if count > 1)
    if duplicates:
        raise SpecError([Problem(doc.source, "experiments", f"entries must have distinct names (repeated: "
                                 f"{', '.join(duplicates)}); give each a `set: {{name: ...}}`")])
    return suite, entries
