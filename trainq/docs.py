"""Generates the README's spec and settings reference from the pydantic models, so it cannot drift.

``python -m trainq.docs`` rewrites the README sections between the ``<!-- generated:NAME -->``
markers; ``tests/test_docs.py`` fails when the README is stale.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shared.settings import Settings
from shared.spec import JobSpec

README = Path(__file__).resolve().parent.parent / "README.md"


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0])
    if origin is Literal:
        text = " \\| ".join(f"`{json.dumps(arg)}`" for arg in args)
        return text if len(args) <= 4 else "one of the choices below"
    if origin in (Union, UnionType):
        return " \\| ".join(_type_text(arg) for arg in args)
    if origin is tuple:
        return "[" + ", ".join(_type_text(arg) for arg in args) + "]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, Path):
        return f"`{value}`".replace(str(Path.home()), "~")
    return f"`{json.dumps(value)}`"


def _constraints(metadata: list[Any]) -> list[str]:
    parts = []
    for meta in metadata:
        for name, text in (("gt", "> {}"), ("ge", "≥ {}"), ("lt", "< {}"), ("le", "≤ {}"),
                           ("min_length", "at least {} characters"), ("max_length", "at most {} characters")):
            if getattr(meta, name, None) is not None:
                parts.append(text.format(getattr(meta, name)))
        if getattr(meta, "pattern", None):
            parts.append(f"pattern `{meta.pattern}`")
        if isinstance(meta, FieldInfo):
            parts += _constraints(meta.metadata)
    return parts


def _limits(info: FieldInfo) -> str:
    parts = _constraints(info.metadata)
    annotation = info.annotation
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]  # `X | None`: the limits of X
    if get_origin(annotation) is Annotated:
        parts += _constraints(list(get_args(annotation)[1:]))
    if get_origin(annotation) is tuple:
        items = {", ".join(_constraints(list(get_args(arg)[1:]))) for arg in get_args(annotation) if get_origin(arg) is Annotated}
        parts += [f"each {text}" for text in items if text]
    return ", ".join(dict.fromkeys(parts))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Annotated, unions and lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _tag(model: type[BaseModel]) -> str:
    for name in ("type", "name"):
        field = model.model_fields.get(name)
        if field is not None and get_origin(field.annotation) is Literal:
            return f"{name}: {json.dumps(get_args(field.annotation)[0])}"
    return ""


def _sections(model: type[BaseModel], path: str, seen: set | None = None) -> list[tuple[str, str, type[BaseModel]]]:
    """``(path, tag, model)`` for ``model`` and every model below it, each model once."""
    seen = set() if seen is None else seen
    found = []
    for name, info in model.model_fields.items():
        members = [member for member in _models_in(info.annotation) if member not in seen]
        child = f"{path}.{name}" if path else name
        if get_origin(info.annotation) is list or any(get_origin(a) is list for a in get_args(info.annotation)):
            child += "[]"
        for member in members:
            seen.add(member)
            found.append((child, _tag(member) if len(members) > 1 else "", member))
            found += _sections(member, child, seen)
    return found


def spec_reference() -> str:
    """Markdown tables of every :class:`JobSpec` section: field, type, default, limits, meaning."""
    out = []
    for path, tag, model in [("", "", JobSpec), *_sections(JobSpec, "")]:
        title = (f"`{path}`" + (f" with `{tag}`" if tag else "")) if path else "top level"
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")
        out += [f"#### {title}", "", doc, "", "| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
        for name, info in model.model_fields.items():
            description = (info.description or "").replace("\n", " ")
            if not description and _models_in(info.annotation):
                description = f"See `{path + '.' if path else ''}{name}` below."
            if name == "arch":
                description += " Choices: " + ", ".join(f"`{a}`" for a in info.annotation.__args__) + "."
            out.append(f"| `{name}` | {_type_text(info.annotation)} | {_default(info)} | {_limits(info)} | {description} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def settings_reference() -> str:
    """Markdown table of the environment variables read by :class:`Settings`."""
    out = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        out.append(f"| `{name.upper()}` | {_default(info)} | {info.description or ''} |")
    return "\n".join(out) + "\n"


GENERATED = {"spec-reference": spec_reference, "settings-reference": settings_reference}


def render(text: str) -> str:
    """``text`` with every generated section replaced by its current content."""
    for name, make in GENERATED.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- generated:{name} --> section")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + m.group(2), text)
    return text


def main() -> int:
    """Rewrite the README's generated sections in place."""
    README.write_text(render(README.read_text()))
    print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
