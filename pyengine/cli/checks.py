"""Every flag of every command checked before the command starts any work.

``check(command, args)`` applies the rules of :data:`RULES` (flag dest -> check) to the parsed
flags; a bad value is a :class:`pyengine.errors.SettingError` naming the flag and the value.
A command's own library checks (``PruneJob.check`` for ``prune``) run first thing in its
``run``; these cover what the commands hand on unchecked. A rule whose flag a command does not
have is skipped, so commands can grow flags without touching this table.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from pyengine.errors import SettingError

__all__ = ["check", "RULES", "flag"]


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _bad(dest: str, value: Any, want: str) -> SettingError:
    return SettingError(dest, f"{flag(dest)} must be {want}, got {value!r}")


# ---- checks: (dest, value, args) -> None, raising a SettingError -----------------------------
def _int_at_least(lo: int, optional: bool = False) -> Callable:
    def rule(dest, v, a):
        if v is None and optional:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise _bad(dest, v, "an integer >= 0" if lo == 0 else f"an integer >= {lo}")
    return rule


POS, NONNEG = _int_at_least(1), _int_at_least(0)
OPT_POS, OPT_NONNEG = _int_at_least(1, True), _int_at_least(0, True)


def _number(lo: float, lo_open: bool, hi: float | None = None, hi_open: bool = False,
            optional: bool = False) -> Callable:
    def rule(dest, v, a):
        if v is None and optional:
            return
        ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            lo_txt = f"{'>' if lo_open else '>='} {lo:g}"
            want = (f"a finite number {lo_txt}" if hi is None else
                    f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
            raise _bad(dest, v, want)
    return rule


FINITE_POS, FINITE_NONNEG = _number(0, True), _number(0, False)
FRACTION = _number(0, True, 1)                      # (0, 1]: a kept fraction of MACs
OPT_FRACTION = _number(0, True, 1, optional=True)


def _each(rule: Callable) -> Callable:
    def each(dest, v, a):
        for x in v or ():
            rule(dest, x, a)
    return each


def DEVICE(dest, v, a):  # noqa: N802 - a rule, like the constants above
    """A torch device this machine has (None: the command's default)."""
    if v is not None:
        from pyengine.train.device import check_device
        check_device(v, flag(dest))


def PEAKS(dest, v, a):  # noqa: N802
    """A device whose peak figures the cost model knows (cpu, h100, ..., cuda)."""
    if v is None:
        return
    import warnings

    from pyengine.cost.peaks import PEAKS as table
    from pyengine.cost.peaks import peaks_for
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peaks_for(v)
    except (KeyError, ValueError, TypeError, RuntimeError):
        raise SettingError(dest, f"{flag(dest)} {v!r}: no peak figures for that device; "
                                 f"known: {', '.join(sorted(table))}") from None


def _dtype(allowed: tuple[str, ...] | None = None) -> Callable:
    def rule(dest, v, a):
        from pyengine.cost.dtypes import as_dtype
        if v is None:  # not given: the command picks the device's usual dtype
            return
        try:
            dt = as_dtype(v)
        except TypeError:
            dt = None
        ok = dt is not None and dt.is_floating_point
        if ok and allowed is not None:
            ok = str(dt).replace("torch.", "") in allowed
        if not ok:
            names = allowed or ("float32", "bf16", "fp16", "float64")
            raise SettingError(dest, f"{flag(dest)} {v!r} is not a dtype pyengine runs in; use "
                                     f"one of {', '.join(names)}")
    return rule


GPU_DTYPE = _dtype(("float32", "bfloat16", "float16"))
ANY_FLOAT = _dtype()


def _is_saved_model(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _model(builtin: tuple[str, ...] = (), saved: bool = True) -> Callable:
    """A timm model name, one of ``builtin``, or (with ``saved``) a pyengine.save directory."""
    def rule(dest, v, a):
        from pyengine.models.factory import check_model_name
        if v in builtin:
            return
        p = Path(v)
        if p.is_dir():
            if not _is_saved_model(p):
                raise SettingError(dest, f"{flag(dest)} {v}: this directory is not a "
                                         "pyengine.save model directory (it has no config.json)")
            if not saved:
                try:
                    arch = json.loads((p / "config.json").read_text()).get("architecture")
                except (ValueError, OSError, AttributeError):
                    arch = None
                raise SettingError(dest, f"{flag(dest)} {v} is a saved compact model; this "
                                         "command takes the dense model's timm name"
                                         + (f" ({arch})" if arch else "") + " and a --spec")
            return
        if p.exists():
            raise SettingError(dest, f"{flag(dest)} {v} is a file; give a timm model name"
                                     + (" or a pyengine.save directory" if saved else ""))
        if os.sep in v or p.suffix in (".json", ".safetensors", ".pt", ".pth"):
            raise SettingError(dest, f"{flag(dest)} {v}: no such directory")
        try:
            check_model_name(v, flag(dest))
        except ValueError as e:
            raise SettingError(dest, str(e)) from None
    return rule


MODEL, TIMM_NAME = _model(), _model(saved=False)


def INPUT_FILE(dest, v, a):  # noqa: N802
    if v is None:
        return
    p = Path(v)
    if not p.exists():
        raise SettingError(dest, f"{flag(dest)} {v} does not exist")
    if not p.is_file():
        raise SettingError(dest, f"{flag(dest)} {v} is a directory; give a file")


def OUT_FILE(dest, v, a):  # noqa: N802
    """A file to write: not an existing directory, not below a file."""
    if v is None:
        return
    from pyengine.io.atomic import output_file
    try:
        output_file(v, flag(dest))
    except OSError as e:
        raise SettingError(dest, str(e)) from None


def OUT_DIR(dest, v, a):  # noqa: N802
    """A directory to write into: not an existing file, not below a file."""
    if v is None:
        return
    p = Path(v)
    if p.exists() and not p.is_dir():
        raise SettingError(dest, f"{flag(dest)} {v} is a file; give a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SettingError(dest, f"{flag(dest)} {v}: {parent} is a file")
            break


def FILE_STEM(dest, v, a):  # noqa: N802
    if v is not None and (not v or Path(v).name != v or v.startswith(".")):
        raise SettingError(dest, f"{flag(dest)} must be a plain file name stem, got {v!r}")


def MODEL_KWARGS(dest, v, a):  # noqa: N802
    if v is None:
        return
    from pyengine.models.factory import check_model_kwargs
    try:
        check_model_kwargs(v, flag(dest))
    except ValueError as e:
        raise SettingError(dest, str(e)) from None


def DATA(dest, v, a):  # noqa: N802
    from pyengine.train.data import check_data
    try:
        check_data(v)
    except (ValueError, OSError) as e:
        raise SettingError(dest, f"{flag(dest)}: {e}") from None


def BATCHES(dest, v, a):  # noqa: N802
    from pyengine.measure.bench import parse_batches
    try:
        parse_batches(v)
    except ValueError as e:
        raise SettingError(dest, f"{flag(dest)} {v!r}: {e}") from None


def parse_sizes(text, name: str) -> list[int] | None:
    """A comma list of integers >= 1 (None: the command's default), for flag ``name``."""
    if text is None:
        return None
    try:
        out = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be a comma list of positive integers, got {text!r}")
    return out


def SIZES(dest, v, a):  # noqa: N802
    """The same parse the command runs (parse_sizes), before any work."""
    try:
        parse_sizes(v, flag(dest))
    except ValueError as e:
        raise SettingError(dest, str(e)) from None


def COMPARE(dest, v, a):  # noqa: N802
    from pyengine.measure.bench import parse_compare
    try:
        parse_compare(v)
    except ValueError as e:
        raise SettingError(dest, f"{flag(dest)} {v!r}: {e}") from None


def OP_BACKEND(dest, v, a):  # noqa: N802
    from pyengine.ops import BACKENDS
    if v not in BACKENDS:
        raise SettingError(dest, f"{flag(dest)} {v!r}: unknown attention backend; choose one of "
                                 f"{', '.join(BACKENDS)}")


def CUDA_ONLY(dest, v, a):  # noqa: N802
    """A switch that needs --device cuda."""
    if v:
        import torch
        dev = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        if not str(dev).startswith("cuda"):
            raise SettingError(dest, f"{flag(dest)} needs --device cuda (CUDA graphs; here: "
                                     f"{dev})")


def SPEC_OR_TARGET(dest, v, a):  # noqa: N802
    """--target (a MAC fraction) and --spec (a structure) both say what to build: one only."""
    OPT_FRACTION(dest, v, a)
    if v is not None and getattr(a, "spec", None):
        raise SettingError(dest, "give --spec or --target, not both")


SEED = NONNEG
_MODEL_ARGS = {"model": MODEL, "target": SPEC_OR_TARGET, "spec": INPUT_FILE, "seed": SEED,
               "model_kwargs": MODEL_KWARGS}

# command -> {flag dest: rule}
RULES: dict[str, dict[str, Callable]] = {
    "demo": {"out": OUT_DIR, "seed": SEED, "threads": OPT_POS, "target": OPT_FRACTION,
             "epochs": OPT_NONNEG, "dense_epochs": OPT_POS, "finetune": OPT_NONNEG,
             "batch": OPT_POS, "repeats": OPT_POS, "model": TIMM_NAME},
    "prune": {"seed": SEED, "out": OUT_DIR, "checkpoint": INPUT_FILE, "data": DATA},
    "spec": {"model": MODEL},
    "compile": {"model": TIMM_NAME, "spec": INPUT_FILE, "out": OUT_DIR},
    "cost": {"model": MODEL, "spec": INPUT_FILE, "batch": POS, "dtype": ANY_FLOAT,
             "device": PEAKS, "json": OUT_FILE, "latency_device": DEVICE},
    "bench": {**_MODEL_ARGS, "compare": COMPARE, "batch": BATCHES, "dtype": GPU_DTYPE,
              "device": DEVICE, "graphs": CUDA_ONLY, "warmup": NONNEG, "repeats": POS,
              "rounds": POS, "min_sample_ms": FINITE_NONNEG, "backend": OP_BACKEND,
              "multiple": POS, "threads": OPT_POS, "json": OUT_FILE},
    "profile": {**_MODEL_ARGS, "batch": POS, "dtype": GPU_DTYPE, "device": DEVICE,
                "repeats": POS, "warmup": NONNEG, "copy_mib": OPT_POS, "gemm_n": SIZES,
                "threads": OPT_POS, "rows": OPT_NONNEG, "json": OUT_FILE, "plot": OUT_FILE},
    "sweep": {"removed": _each(_number(0, False, 1, hi_open=True)), "seeds": POS,
              "calib_batches": POS, "calib_batch_size": POS, "min_heads": NONNEG,
              "round_to": POS, "cache_dir": OUT_DIR, "out": OUT_FILE, "plot": OUT_FILE,
              "device": DEVICE},
    "route": {"light_target": _number(0, True, 1, hi_open=True), "calib_batches": POS,
              "finetune": NONNEG, "finetune_lr": FINITE_POS, "seed": SEED,
              "cache_dir": OUT_DIR, "out": OUT_FILE, "plot": OUT_FILE, "device": DEVICE},
    "limit": {"model": _model(builtin=("digits_mlp",)), "data": DATA, "img_size": OPT_POS,
              "batch_size": POS, "epochs": OPT_NONNEG, "lr": FINITE_POS,
              "weight_decay": FINITE_NONNEG, "l1": FINITE_NONNEG, "iters": POS, "probes": POS,
              "hessian_samples": NONNEG, "flat_rows": NONNEG, "flat_tol": FINITE_NONNEG,
              "steps": POS, "tolerance": FINITE_NONNEG, "device": DEVICE, "seed": SEED,
              "out": OUT_DIR, "name": FILE_STEM},
}


def check(command: str, args) -> None:
    """Apply ``command``'s rules to the parsed ``args`` (SettingError on the first bad flag)."""
    for dest, rule in RULES.get(command, {}).items():
        if hasattr(args, dest):
            rule(dest, getattr(args, dest), args)
