"""Command-line flags from config dataclasses, and the dataclasses back from the parsed flags.

A field ``min_head_dims: float = 0.0`` becomes ``--min-head-dims FLOAT``; field metadata may
give ``help``, ``choices``, ``metavar``, and for booleans ``flag``/``action`` (e.g.
``--sss-signed`` storing False into ``sss_nonneg``). Library code never sees argparse: commands
turn flags into these dataclasses and hand those on.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

__all__ = ["add_dataclass_flags", "dataclass_from_flags"]

_TYPES = {"int": int, "float": float, "str": str}


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return v


_NAMED_TYPES = {"fraction": _fraction}  # metadata {"type": name}: a checked flag type


def _base_type(annotation: Any) -> tuple[type | None, bool]:
    """(type, optional) from an annotation string like "float | None"."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [p.strip() for p in str(text).split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    return (_TYPES.get(names[0]) if len(names) == 1 else None), optional


def add_dataclass_flags(group, cls, skip: Iterable[str] = ()) -> None:
    """One flag per field of dataclass ``cls`` (not the ones in ``skip``)."""
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": f.name, "help": meta.pop("help", None)}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            kw["action"] = meta.pop("action", "store_false" if default else "store_true")
            kw["default"] = default
        else:
            typ, _ = _base_type(f.type)
            if "type" in meta:
                typ = _NAMED_TYPES[meta.pop("type")]
            if typ is None:
                raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {f.type!r}")
            kw.update(type=typ, default=default)
            for k in ("choices", "metavar"):
                if k in meta:
                    kw[k] = meta.pop(k)
        group.add_argument(flag, **kw)


def dataclass_from_flags(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed flags (its fields' dests), with ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
