"""A spec from text: YAML files read strictly, and `a.b=c` overrides typed by the field they set.

Generic over pydantic models (a job spec, a sweep spec); `orchestrator.spec` re-exports what it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from orchestrator.errors import BadInput


def _field_annotation(model: type[BaseModel], parts: list[str]) -> Any:
    """The annotation of the field a dotted path (list indices allowed) sets, or None if unknown."""
    annotation: Any = model
    for part in parts:
        annotation = _unwrap_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is list and part.lstrip("-").isdigit():
            annotation = get_args(annotation)[0]
        else:
            return None
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) is Union and len(args) == 1 else annotation


def _string_only(annotation: Any) -> bool:
    """True when a field accepts only strings (str, a Literal of strings, or either of those Optional)."""
    annotation = _unwrap_optional(annotation)
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(isinstance(v, str) for v in get_args(annotation))


def parse_override_value(raw: str, annotation: Any) -> Any:
    """A value typed by the field it sets: YAML for numbers, booleans, lists and sections; a string field
    keeps `off`, `yes` or `2024-01-01` as the string typed (YAML 1.1 would turn them into bool/date)."""
    optional = get_origin(annotation) is Union and type(None) in get_args(annotation)
    if _string_only(annotation):
        return None if optional and raw in ("null", "~", "") else raw
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if annotation is not None and str in get_args(annotation) and not isinstance(value, (list, dict)) and value is not None:
        return raw  # e.g. data.features: a column name, or a list of them
    return value


def set_dotted(tree: dict, key: str, value: Any, what: str | None = None) -> dict:
    """Set `a.b.c` in a nested dict, making sections on the way. A number indexes a list (`faults.0.at_step`);
    the index equal to the list's length appends. `what` names the change in errors (default: the key)."""
    parts, what = key.split("."), what or key
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise BadInput(f"override {what!r}: {'.'.join(parts[:depth]) or part} has {len(node)} item(s); "
                               f"use an index from 0 to {len(node)} ({len(node)} appends)")
            index = int(part)
            if index == len(node):
                node.append(value if last else {})
            elif last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = [] if parts[depth + 1].isdigit() else {}
                if not isinstance(child, (dict, list)):
                    raise BadInput(f"override {what!r}: {'.'.join(parts[:depth + 1])} is not a section or list")
                node = child
    return tree


def apply_overrides(tree: dict, overrides: list[str], model: type[BaseModel] | None = None) -> dict:
    """Apply `a.b=c` overrides. Each value is parsed by the type of the field it sets (see
    `parse_override_value`); lists are indexed and appended as in `set_dotted`. Unknown keys are left for
    validation to refuse in one line."""
    if model is None:
        from orchestrator.spec import JobSpec

        model = JobSpec
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise BadInput(f"override {item!r}: expected dotted.key=value")
        set_dotted(tree, key, parse_override_value(raw, _field_annotation(model, key.split("."))), item)
    return tree


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text (byte {exc.start}); expected a YAML file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    if "\x00" in text:
        raise BadInput(f"{path}: a binary file (NUL bytes); expected a YAML file")
    try:
        tree = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"{path}:{where} malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(tree, dict):
        raise BadInput(f"{path}: expected a mapping of sections at the top level")
    return tree


def field_reference(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every leaf field of `model` (the job spec): the spec reference."""
    if model is None:
        from orchestrator.spec import JobSpec  # spec.py imports this module

        model = JobSpec
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((prefix + name, "", field.description or ""))
            rows.extend(field_reference(annotation, prefix + name + "."))
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((prefix + name, default, field.description or ""))
    return rows
