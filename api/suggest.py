""""Did you mean …?" for an unknown key: the closest field name the model has at that place.

A 422 for ``{"optimizer": {"learning_rate": 0.1}}`` says where the unknown key is; this adds
which key was probably meant (``lr``), from the names the model has at that location only (an
``adam`` optimizer's fields, not the whole spec's). Close spellings come from :mod:`difflib`;
names other libraries use for the same thing (``learning_rate``, ``num_epochs``) from
:data:`KNOWN_SYNONYMS`.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

#: Names PyTorch Lightning, Hugging Face, Keras or scikit-learn use for a field trainq names otherwise.
KNOWN_SYNONYMS = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "max_epochs": "epochs",
    "num_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "batchsize": "batch_size",
    "n_workers": "num_workers",
    "dataloader_num_workers": "num_workers",
    "scheduler": "lr_schedule",
    "lr_scheduler": "lr_schedule",
    "path": "uri",
    "url": "uri",
}


def _options(annotation: Any) -> list[tuple[str | None, Any]]:
    """The types an annotation may hold, each with its union tag (``Annotated[X, Tag("adam")]``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        tag = next((getattr(item, "tag") for item in extra if hasattr(item, "tag")), None)
        return [(tag or found_tag, found) for found_tag, found in _options(inner)]
    if origin in (typing.Union, types.UnionType):
        return [option for arg in typing.get_args(annotation) for option in _options(arg)]
    return [(None, annotation)]


def _step(annotation: Any, part: str | int) -> Any | None:
    """The annotation reached from ``annotation`` by one element of a pydantic error's ``loc``."""
    for tag, option in _options(annotation):
        if tag is not None and tag == part:
            return option
        if isinstance(option, type) and issubclass(option, BaseModel):
            if option.__name__ == part:
                return option
            if isinstance(part, str) and part in option.model_fields:
                return option.model_fields[part].annotation
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin in (list, set, frozenset, Sequence) and args and isinstance(part, int):
            return args[0]
        if origin is tuple and args and isinstance(part, int):
            return args[0] if len(args) == 2 and args[1] is Ellipsis else args[min(part, len(args) - 1)]
        if origin is dict and len(args) == 2 and isinstance(part, str):
            return args[1]
    return None


def field_names_at(model: type[BaseModel], loc: Sequence[str | int]) -> set[str]:
    """Field names (and aliases) of the model(s) at pydantic's ``loc`` inside ``model``; empty when
    the place cannot be followed."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return set()
    names: set[str] = set()
    for _, option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            for name, field in option.model_fields.items():
                names.add(field.alias or name)
    return names


def suggestion(unknown: str, known: set[str]) -> str | None:
    """The known name ``unknown`` was probably meant to be, or None."""
    # A known name, or another library's name for one (also misspelt: `learnig_rate` → `lr`).
    candidates = {name: name for name in known} | {other: ours for other, ours in KNOWN_SYNONYMS.items() if ours in known}
    word = unknown.lower()
    if word in candidates:
        return candidates[word]
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.75)
    return candidates[close[0]] if close else None


def did_you_mean(model: type[BaseModel] | None, loc: Sequence[str | int], names: set[str] | None = None) -> str:
    """``"; did you mean `lr`?"`` for the unknown key at the end of ``loc`` (inside ``model``, or
    among ``names``), else ``""``."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    known = names if names is not None else field_names_at(model, loc[:-1]) if model is not None else set()
    found = suggestion(loc[-1], known - {loc[-1]})
    return f"; did you mean `{found}`?" if found else ""
