"""Typed dataclass loading: YAML and `--section.key=value` strings into declared types, every problem reported at once.

Kept apart from `config.py` so that the method modules can use the same machinery for their own config sections
without importing the experiment config (which imports them).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

log = logging.getLogger(__name__)


class YamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2's booleans: only true and false. YAML 1.1 also reads yes, no, on and off as
    booleans, which turned the label words `[Yes, No]` into "True" and "False"; here they stay strings, and a boolean
    key still accepts them (`convert`)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse YAML text the way configs are read (`YamlLoader`)."""
    loader = YamlLoader(text)  # what yaml.safe_load does, with our loader
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ConfigError(ValueError):
    """Every problem found in one configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def load_yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    """Return the YAML mapping and the line (1-based) of every dotted key, for error messages."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config file ({err.strerror}); check the path"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8"]) \
            from None
    try:
        node = yaml.compose(text)
        data = read_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: broken YAML ({getattr(err, 'problem', err)}); fix the syntax there"]) from None
    if data is None:  # an empty file, or comments only: most likely the wrong file
        raise ConfigError([f"{path}:1: the config file holds no settings (empty or comments only); give the "
                           "sections the run needs (model:, method:, data:, ...), e.g. copy one from configs/"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of sections (run:, model:, ...)"])
    lines: dict[str, int] = {}
    duplicates: list[str] = []

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                dotted = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if dotted in lines:  # YAML keeps the last value silently; which one was meant is unknowable
                    duplicates.append(f"{path}:{line}: duplicate key '{dotted}' (also set at line {lines[dotted]}); "
                                      "keep one of them")
                lines[dotted] = line
                walk(value_node, dotted + ".")

    walk(node, "")
    if duplicates:
        raise ConfigError(duplicates)
    return data, lines


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _parse_yaml_value(text: str) -> Any:
    """A list or mapping written inline in YAML, e.g. `--head.label_words=[no, yes]`."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        reason = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ValueError(f"{text!r} is not a readable YAML list or mapping ({reason})") from None


def convert(value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a CLI string) to the declared type `tp`; raise ValueError with a reason."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return convert(value, arm)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"expected null, got {value!r}")
    if origin is list:
        (item_type,) = get_args(tp)
        if isinstance(value, str):
            value = _parse_yaml_value(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [convert(v, item_type) for v in value]
    if origin is dict:
        key_type, value_type = get_args(tp)
        if isinstance(value, str):
            value = _parse_yaml_value(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return {convert(k, key_type): convert(v, value_type) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
            if number.is_integer():
                return int(number)
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise AssertionError(f"unsupported config field type {tp!r}")


def build(cls: type, values: dict, *, section: str, problems: list[str], where) -> Any:
    """Build dataclass `cls` from `values`; append problems (unknown keys, bad types, missing) instead of raising.

    `where(dotted_key)` returns a location prefix such as "cfg.yaml:12" or "--optim.lr" for messages.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = current_names(cls, values, section=section, problems=problems, where=where)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            valid = ", ".join(sorted(fields))
            problems.append(f"{where(dotted)}: unknown key '{dotted}'; valid keys in '{section}': {valid}")
            continue
        try:
            kwargs[key] = convert(value, hints[key])
        except ValueError as err:
            problems.append(f"{where(dotted)}: '{dotted}' {err} (declared type: {_type_name(hints[key])})")
    for name, field in fields.items():
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if missing and name not in kwargs and name not in values:
            problems.append(f"{where(section)}: '{section}.{name}' is required")
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # a required field is missing; already reported above
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problems.extend(f"{where(_key_named(p, section, fields))}: {p}" for p in validate())
    return obj


def current_names(cls: type, values: dict, *, section: str, problems: list[str] | None = None, where=str) -> dict:
    """`values` with the keys that `cls` renamed (its `renamed` table, old -> new) under their current names, with one
    deprecation warning each. Both names set in the same place (a file, or flags) is a problem; a flag (`where` gives
    "--...") wins over a file, as for any key. `problems=None`: rename quietly (configs saved by earlier versions)."""
    out = dict(values)
    for old, new in getattr(cls, "renamed", {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        if problems is None:
            out.setdefault(new, value)
            continue
        old_at, new_at = where(f"{section}.{old}"), where(f"{section}.{new}")
        from_flag = old_at.startswith("--")
        if new in out and from_flag == new_at.startswith("--"):
            problems.append(f"{old_at}: '{section}.{old}' and '{section}.{new}' are both set; '{old}' is the old "
                            f"name of '{new}': keep only '{section}.{new}'")
            continue
        if new not in out or from_flag:
            out[new] = value
        log.warning("%s: '%s.%s' is deprecated; rename it to '%s.%s'", old_at, section, old, section, new)
    return out


def _key_named(problem: str, section: str, fields: dict) -> str:
    """The first key of `section` that a validation problem names (`optim.lr must be > 0`), so that the problem is
    reported where that key was set (its flag or its line); the section itself when it names none."""
    for match in re.finditer(rf"\b{re.escape(section)}\.(\w+)", problem):
        if match.group(1) in fields:
            return f"{section}.{match.group(1)}"
    return section


def at_least(obj: Any, section: str, minimum: float, *names: str) -> list[str]:
    """A problem for each numeric field `names` of `obj` below `minimum` (NaN too), for `validate` methods."""
    return [f"{section}.{name} must be >= {minimum}, got {getattr(obj, name)}" for name in names
            if not getattr(obj, name) >= minimum]


def as_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and its bases), read from the source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(inspect.getsource(klass).strip())
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and documented:
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_text(f: dataclasses.Field) -> str:
    """A field's default as written in a config (its factory's value for lists and mappings), or `required`."""
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return "required" if f.default_factory is dataclasses.MISSING else repr(f.default_factory())


def reference_markdown(sections: dict[str, type]) -> str:
    """A markdown table per section: key, type, default, meaning."""
    out = []
    for section, cls in sections.items():
        out += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _type_name(hints[f.name]).replace("|", "\\|")  # a bare | would end the table cell
            out.append(f"| `{f.name}` | {kind} | `{default_text(f)}` | {docs.get(f.name, '')} |")
        renamed = getattr(cls, "renamed", {})
        if renamed:
            names = ", ".join(f"`{old}` (now `{new}`)" for old, new in renamed.items())
            out += ["", f"Old names still read, with a deprecation warning: {names}."]
        out.append("")
    return "\n".join(out)
