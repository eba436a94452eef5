"""End-to-end latency: dense timm, our compact model, the padded-heads model and a
Torch-Pruning model of the same MACs, timed by one harness.

    models = build_variants("deit_small_patch16_224", target=0.5)
    report = bench(models, batches=(1, 8, 64, 256), dtype="bf16", device="cuda", graphs=True)
    write_json(report, "bench.json"); print(format_report(report))

Timing comes from the one harness, :mod:`pyengine.measure.timing`: on CUDA every sample is a
pair of CUDA events around one or more calls (a captured CUDA graph's replay with
``graphs=True``, else eager forward); on the CPU a ``perf_counter`` pair. Each variant gets
warm-up calls first, then samples are taken round-robin over the variants (a few samples of
each, in turn) so drift of clocks and other load hits all of them alike. Reported: median and
interquartile range of the per-call time (the harness's one definition), images/s, MACs from
:func:`pyengine.cost`, speedup over dense (the ratio of medians) with its spread (p25, p75 and
IQR of the paired per-pass ratios) and speedup x (variant MACs / dense MACs): 1.0 means the
MAC reduction was fully realised as speed. ``realized`` is speedup x (pruned structure's MACs /
dense MACs): the compact model's head layout (``pyengine.compile(layout=...)``) may pad heads
and compute more MACs than its structure, the padded peer computes the same structure padded,
so both are measured against what pruning kept. ``env`` is
:func:`pyengine.measure.timing.environment`.

Variants: ``compact`` (our model, in the head layout ``layout`` picks: "auto" plans it with the
device's latency table), ``exact`` (the same model in the exact layout: one run per head
shape), ``padded`` (:func:`pyengine.models.vit.padded.pad_heads`: one SDPA call per layer at
the layer's largest widths), ``torch-pruning`` (uniform heads, the structure's MACs) and
``dense``. Several modes (eager, torch.compile, CUDA graphs) can be timed in one run; each
mode's samples are interleaved over every variant.

The report (``bench()``, ``pyengine bench --json``)::

    {"env": {"gpu", "driver", "torch", "triton", "cuda", "cpu", "timm", "torch_pruning", ...},
     "config": {...}, "checks": {"padded_vs_compact_rel_diff"}, "skipped": [{variant, reason}],
     "results": [{"variant": "dense"|"compact"|"exact"|"padded"|"torch-pruning", "model", "batch",
                  "dtype", "median_ms", "iqr_ms", "min_ms", "mean_ms", "repeats", "inner",
                  "macs" (whole batch), "macs_per_image", "params", "images_per_s", "mode",
                  "graphs", "compile", "device", "input_shape", "macs_ratio", "speedup",
                  "speedup_p25", "speedup_p75", "speedup_iqr", "speedup_per_mac_reduction",
                  "structure_macs_ratio", "realized" (the last eight when dense was timed),
                  "layout" (compact and exact: mode and buckets per layer)}, ...]}
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from pyengine.io.atomic import write_json  # noqa: F401 - part of this module's API
from pyengine.measure.timing import environment, measure, summarize  # noqa: F401 - API

VARIANTS = ("dense", "compact", "exact", "padded", "torch-pruning")
DEFAULT_COMPARE = ("dense", "padded", "torch-pruning")
MODES = ("eager", "compile", "graphs", "compile+graphs")


# --------------------------------------------------------------------------------------
# Parsing helpers shared by the commands
# --------------------------------------------------------------------------------------

def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    from pyengine.cost.dtypes import as_dtype as _as_dtype
    return _as_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_batches(text: str | Iterable[int]) -> list[int]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for b in items:
        try:
            v = int(b)
        except (TypeError, ValueError):
            raise ValueError(f"batch sizes must be positive integers, got {b!r}") from None
        if v < 1:
            raise ValueError(f"batch sizes must be positive integers, got {v}")
        out.append(v)
    if not out:
        raise ValueError("give at least one batch size")
    return out


def parse_compare(text: str | Iterable[str]) -> list[str]:
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    for s in items:
        if s not in VARIANTS:
            raise ValueError(f"unknown variant {s!r} in --compare; choose from {VARIANTS}")
    return items


def parse_modes(text: str | Iterable[str]) -> list[str]:
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    items = [m for m in items if m]
    for m in items:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} in --modes; choose from {', '.join(MODES)}")
    if not items:
        raise ValueError("give at least one mode")
    return list(dict.fromkeys(items))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return dev


# --------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------

@dataclass
class Variants:
    """The models to time, by variant name, plus what could not be built and why."""

    model: str                                   # the dense timm architecture
    models: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    img_size: tuple[int, int, int] = (3, 224, 224)


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input: a ViT's patch embedding, a CNN's
    geometry (its input size as the cost model takes it; 224 if unknown)."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        return (pe.proj.in_channels, *pe.img_size)
    from pyengine.models import geometry
    g = geometry(model)
    size = getattr(g, "img_size", 0) or 224
    return (g.in_chans, size, size)


def _is_vit(model: nn.Module) -> bool:
    from pyengine.structure.spec import Spec
    return isinstance(getattr(model, "pyengine_spec", None), Spec) or hasattr(model, "patch_embed")


def load_models(model: str, spec: str | None = None, target: float | None = None,
                seed: int = 0, model_kwargs: dict | None = None, layout: str | None = None,
                device: str | torch.device | None = None, also_exact: bool = False,
                dtype=None) -> tuple[str, nn.Module, nn.Module | None]:
    """(architecture, dense, compact or None) from a timm name or a ``pyengine.save`` DIR.

    A DIR gives the compact model (in the layout it was saved with) and names its dense
    architecture (rebuilt with random weights: timing does not depend on them). A name gives
    the dense model; ``spec`` (a spec.json) or ``target`` (a MAC fraction: the family
    adapter's ``synthetic_spec``, random heterogeneous heads for a ViT, random scores through
    the solver for other families) builds the compact one, compiled in ``layout`` (default
    "auto", planned for ``device`` and ``dtype``). With ``also_exact`` the result is
    ``(name, dense, compact, exact)``: the exact layout as well.
    """
    from pyengine import api
    from pyengine.models import adapter_for
    from pyengine.models.factory import create_model

    path = Path(model)
    if path.is_dir():
        if spec is not None or target is not None:
            raise ValueError(f"{model} is a saved compact model; --spec/--target apply only to "
                             "a timm model name")
        if model_kwargs:
            raise ValueError("--model-kwargs applies only to a timm model name; a saved model "
                             "rebuilds from its own config.json")
        from pyengine.io.model_dir import CONFIG, load
        from pyengine.models.vit.layout import layout_of
        compact = load(path).eval()
        lay = layout_of(compact.pyengine_spec)
        saved = lay.mode if lay is not None else "exact"
        if layout is not None and layout != saved:
            raise ValueError(f"{model} was saved in layout {saved!r}; --layout applies to a "
                             "timm model name with --spec/--target")
        cfg = json.loads((path / CONFIG).read_text())
        dense = create_model(cfg["architecture"], **cfg["kwargs"]).eval()
        size = getattr(getattr(compact.pyengine_spec, "dense", None), "img_size", 0)
        if size and not hasattr(dense, "patch_embed"):  # a CNN: time both at the spec's size
            dense.pyengine_img_size = size
        if also_exact:
            return cfg["architecture"], dense, compact, None
        return cfg["architecture"], dense, compact
    if os.sep in model or path.suffix in (".json", ".safetensors"):
        raise FileNotFoundError(f"{model} is neither a directory nor a timm model name")
    try:
        dense = create_model(model, **(model_kwargs or {})).eval()
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"{model!r} is neither a pyengine.save directory nor a timm model "
                             "name") from None
        raise
    name = model.split(".")[0]
    if spec is None and target is None:
        return (name, dense, None, None) if also_exact else (name, dense, None)
    if spec is not None and target is not None:
        raise ValueError("give --spec or --target, not both")
    gated = api.gate(copy.deepcopy(dense))
    if spec is not None:
        from pyengine.structure.spec import Spec
        s = Spec.load(spec)
    else:  # the family's made-to-order structure (ViT: random heterogeneous heads)
        s = adapter_for(gated).synthetic_spec(gated, float(target), seed=seed, name=name)
    api.apply(gated, s)
    compact = api.compile(gated, layout=layout or "auto", device=device, dtype=dtype).eval()
    if also_exact:
        return name, dense, compact, api.compile(gated, layout="exact").eval()
    return name, dense, compact


def build_variants(model: str, compare: Sequence[str] = DEFAULT_COMPARE,
                   spec: str | None = None, target: float | None = None, seed: int = 0,
                   model_kwargs: dict | None = None, multiple: int = 8,
                   show: Callable[[str], None] = lambda s: None, layout: str | None = None,
                   device: str | torch.device | None = None, dtype=None) -> Variants:
    """Build every variant named in ``compare`` (plus ``compact`` whenever there is one).

    ``padded``, ``exact`` and ``torch-pruning`` need the compact model (its structure and its
    MACs); a variant that cannot be built here (Torch-Pruning not installed, the exact layout
    of a saved model) is recorded in ``skipped`` with the reason instead of failing the whole
    bench. ``layout``/``device``/``dtype``: the compact model's head layout and the device and
    dtype it is planned for (``pyengine.compile``).
    """
    from pyengine.measure.baselines import (torch_pruning_available, torch_pruning_cnn_model,
                                            torch_pruning_model)
    from pyengine.cost import cost
    from pyengine.models import adapter_for
    from pyengine.models.vit.cost import total_macs
    from pyengine.models.vit.layout import layout_of, strip_layout
    from pyengine.models.vit.padded import pad_heads

    compare = parse_compare(compare)
    if layout is not None:
        from pyengine.api import LAYOUTS
        if layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if device is not None:
        device = resolve_device(device)
    name, dense, compact, exact = load_models(model, spec, target, seed, model_kwargs,
                                              layout=layout, device=device, also_exact=True,
                                              dtype=parse_dtype(dtype) if dtype else None)
    v = Variants(model=name, img_size=_image_shape(dense))
    needs_compact = [c for c in compare if c in ("compact", "exact", "padded",
                                                 "torch-pruning")]
    if compact is None and needs_compact:
        raise ValueError(f"variants {needs_compact} need a pruned model: give --target FRACTION "
                         "or --spec FILE with a timm name, or a pyengine.save DIR as --model")
    if "dense" in compare:
        v.models["dense"] = dense
    if compact is not None:
        v.models["compact"] = compact
        s = compact.pyengine_spec
        vit = _is_vit(compact)
        v.info["spec_shapes"] = [{"heads": [[len(h.qk), len(h.v)] for h in b.heads],
                                  "mlp": len(b.mlp)} if vit else
                                 {"keep": b.keep, **{n: len(i) for n, i in b.channels}}
                                 for b in s.blocks]
        dense_macs = cost(dense).macs
        v.info["spec_meta"] = {k: x for k, x in s.meta.items() if k != "layout"}
        if adapter_for(dense).name == "vit":
            # the pruned structure's MACs (what Torch-Pruning's peer gets); the compact
            # model's layout may compute more (padded buckets), which its own "macs" show
            structure = strip_layout(s)
            v.info["compact_macs_ratio"] = total_macs(structure) / dense_macs
            v.info["structure_macs"] = total_macs(structure)
            lay = layout_of(s)
            v.info["layout"] = lay.to_dict() if lay is not None else None
        else:  # no layout choice: the compact model is the structure
            v.info["compact_macs_ratio"] = cost(compact).macs / dense_macs
            v.info["structure_macs"] = cost(compact).macs
            v.info["layout"] = None
        if "exact" in compare:
            if exact is None:
                v.skipped["exact"] = ("a saved model keeps its layout; give a timm name with "
                                      "--spec or --target")
            else:
                v.models["exact"] = exact
    if "padded" in compare and adapter_for(dense).name != "vit":
        v.skipped["padded"] = f"padded heads exist for ViT models only ({model})"
    elif "padded" in compare:
        show("building padded-heads model")
        # from the exact layout: the peer pads to the layer maxima whatever our layout did
        v.models["padded"] = pad_heads(exact if exact is not None else compact, multiple=1)
    if "torch-pruning" in compare:
        ok, why = torch_pruning_available()
        if not ok:
            v.skipped["torch-pruning"] = why
        else:
            show("building Torch-Pruning model")
            try:
                make = torch_pruning_model if _is_vit(dense) else torch_pruning_cnn_model
                peer = make(dense, v.info["compact_macs_ratio"], multiple=multiple)
                v.models["torch-pruning"] = peer
                v.info["torch_pruning"] = dict(peer.pyengine_baseline)
            except Exception as e:  # a peer's failure is a result, not a crash of ours
                v.skipped["torch-pruning"] = f"Torch-Pruning failed: {type(e).__name__}: {e}"
    # keep the bench's order stable: dense, compact, exact, padded, torch-pruning
    v.models = {k: v.models[k] for k in VARIANTS if k in v.models}
    return v


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Run the compact attention layers of ``model`` on ``backend`` ("auto", "torch",
    "triton", "cuda", "cpu"; see :func:`pyengine.ops.varlen_attention`); returns how many."""
    from pyengine.models.transformer.compact import CompactAttention as TCompactAttention
    from pyengine.models.vit.compact import CompactAttention
    from pyengine.ops import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    n = 0
    for m in model.modules():
        if isinstance(m, (CompactAttention, TCompactAttention)):
            m.backend = backend
            n += 1
    return n


def attention_backend(model: nn.Module) -> str | None:
    from pyengine.models.transformer.compact import CompactAttention as TCompactAttention
    from pyengine.models.vit.compact import CompactAttention
    return next((m.backend for m in model.modules()
                 if isinstance(m, (CompactAttention, TCompactAttention))), None)


@torch.no_grad()
def check_outputs(v: Variants, device: torch.device, batch: int = 2) -> dict[str, float]:
    """Relative output differences in float32 on ``device``: padded and exact vs compact must
    be ~0 (the same function in other layouts)."""
    out: dict[str, float] = {}
    if "compact" not in v.models:
        return out
    x = torch.randn(batch, *v.img_size, device=device)
    a = v.models["compact"].to(device=device, dtype=torch.float32)(x)
    for k in ("padded", "exact"):
        if k in v.models:
            b = v.models[k].to(device=device, dtype=torch.float32)(x)
            out[f"{k}_vs_compact_rel_diff"] = float((a - b).norm() / a.norm().clamp_min(1e-30))
    return out


# --------------------------------------------------------------------------------------
# Timing and environment: the one harness (pyengine.measure.timing)
# --------------------------------------------------------------------------------------

def _call(model: nn.Module, x: torch.Tensor, compiled: bool) -> Callable[[], object]:
    """One variant at one batch, ready to be timed (eager or torch.compile'd)."""
    fn = torch.compile(model, dynamic=False) if compiled else model
    return lambda: fn(x)


def time_callables(fns: dict[str, Callable[[], None]], device: torch.device,
                   warmup: int = 10, repeats: int = 50, rounds: int = 5,
                   min_sample_ms: float = 0.0, graphs: bool = False
                   ) -> dict[str, dict[str, float]]:
    """:func:`pyengine.measure.timing.compare` with the bench's defaults: ``warmup`` calls
    each, one calibration call, then ``repeats`` samples each taken in ``rounds`` round-robin
    passes; a sample covers enough calls for ``min_sample_ms`` (1 when 0)."""
    return measure(fns, warmup, repeats, device, rounds=rounds, min_sample_ms=min_sample_ms,
                   graphs=graphs).stats()


# --------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------

def _mode(graphs: bool, compiled: bool) -> str:
    return ("compile+graphs" if graphs else "compile") if compiled else \
        ("graphs" if graphs else "eager")


def bench(v: Variants, batches: Sequence[int] = (1, 8, 64, 256), dtype="bfloat16",
          device: str | torch.device | None = None, graphs: bool = False, compiled: bool = False,
          warmup: int = 10, repeats: int = 50, rounds: int = 5, min_sample_ms: float = 0.0,
          show: Callable[[str], None] = print, deadline: float | None = None,
          modes: Sequence[str] | None = None) -> dict[str, Any]:
    """Time every model of ``v`` at every batch size; returns ``{"env", "config", "checks",
    "skipped", "results"}`` (see the module docstring for the fields of each result).

    ``modes``: several of "eager", "compile", "graphs", "compile+graphs" timed in this run (one
    interleaved measurement per mode and batch); default: the one ``graphs``/``compiled`` say.
    ``deadline``: a ``time.perf_counter()`` value; batches not started by then are skipped
    and listed in ``config["skipped_batches"]`` (keeps a scripted run inside its time limit).
    """
    from pyengine.cost import cost

    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    modes = parse_modes(modes) if modes is not None else [_mode(graphs, compiled)]
    if any("graphs" in m for m in modes) and dev.type != "cuda":
        raise ValueError("--graphs needs --device cuda (CUDA graphs)")
    batches = parse_batches(batches)
    checks = check_outputs(v, dev)
    models = {k: m.to(device=dev, dtype=dt).eval() for k, m in v.models.items()}
    macs1 = {k: cost(m).macs for k, m in models.items()}
    # what pruning kept, per variant: compact, exact and padded compute the same structure
    structure = {k: macs1[k] for k in models}
    for k in ("compact", "exact", "padded"):
        if k in models and "structure_macs" in v.info:
            structure[k] = v.info["structure_macs"]
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    layouts = {k: _layout_summary(m) for k, m in models.items() if k in ("compact", "exact")}
    # predicted ms beside the measured (pyengine.latency from the cached latency table; null
    # where there is none or the variant is no pyengine ViT)
    from pyengine.measure.latency_report import predict
    predicted, predicted_note = predict(models, batches, dev, dt)
    results: list[dict[str, Any]] = []
    late: list[tuple[str, int]] = []
    for mode in modes:
        mgraphs, mcompiled = "graphs" in mode, mode.startswith("compile")
        for b in batches:
            if deadline is not None and time.perf_counter() > deadline:
                late.append((mode, b))
                show(f"batch {b} ({mode}): skipped, past the deadline")
                continue
            show(f"batch {b}: preparing {', '.join(models)} ({mode})")
            if mcompiled:
                torch._dynamo.reset()  # every variant compiles afresh for this batch
            x = torch.randn(b, *v.img_size, device=dev, dtype=dt)
            samples = measure({k: _call(m, x, mcompiled) for k, m in models.items()}, warmup,
                              repeats, dev, graphs=mgraphs, rounds=rounds,
                              min_sample_ms=min_sample_ms)
            stats = samples.stats()
            base = stats.get("dense")
            for k, st in stats.items():
                macs = cost(models[k], batch=b).macs
                r = {"variant": k, "model": v.model, "batch": b, "dtype": dtype_name(dt),
                     **st, "macs": macs, "macs_per_image": macs1[k], "params": params[k],
                     "images_per_s": b / st["median_ms"] * 1e3, "mode": mode,
                     "graphs": mgraphs, "compile": mcompiled, "device": str(dev),
                     "input_shape": [b, *v.img_size],
                     "predicted_ms": predicted.get(k, {}).get(str(b))}
                if r["predicted_ms"] is not None:
                    r["predicted_error"] = r["predicted_ms"] / st["median_ms"] - 1.0
                if k in ("compact", "exact"):
                    r["attention_backend"] = attention_backend(models[k])
                    r["layout"] = layouts[k]
                if base is not None:
                    r["macs_ratio"] = macs1[k] / macs1["dense"]
                    r["speedup"] = base["median_ms"] / st["median_ms"]
                    sp = samples.ratio("dense", k)  # its spread, from the paired samples
                    r["speedup_p25"], r["speedup_p75"] = sp["p25"], sp["p75"]
                    r["speedup_iqr"] = sp["iqr"]
                    r["speedup_per_mac_reduction"] = r["speedup"] * r["macs_ratio"]
                    r["structure_macs_ratio"] = structure[k] / macs1["dense"]
                    r["realized"] = r["speedup"] * r["structure_macs_ratio"]
                results.append(r)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"env": environment(dev),
            "config": {"model": v.model, "batches": batches, "dtype": dtype_name(dt),
                       "device": str(dev), "mode": modes[0] if len(modes) == 1 else
                       ",".join(modes), "modes": modes, "warmup": warmup,
                       "repeats": repeats, "rounds": rounds, "min_sample_ms": min_sample_ms,
                       "variants": list(models),
                       "skipped_batches": [b for m, b in late] if len(modes) == 1 else
                       [[m, b] for m, b in late], "predicted_note": predicted_note,
                       **v.info},
            "checks": checks,
            "skipped": [{"variant": k, "reason": r} for k, r in v.skipped.items()],
            "results": results}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _layout_summary(model: nn.Module) -> dict[str, Any]:
    """The head layout a compact model runs: its mode and buckets per attention layer."""
    from pyengine.models.vit.layout import layout_of
    lay = layout_of(model.pyengine_spec)
    if lay is None:
        return {"mode": "exact"}
    return {"mode": lay.mode, "device": lay.device,
            "buckets": [None if b is None else b.describe() for b in lay.blocks],
            "backends": [None if b is None else b.backend for b in lay.blocks]}


def format_report(report: dict[str, Any]) -> str:
    """One table per mode: latency, images/s, GMACs, speedup, speedup x MAC ratio and realized
    (speedup x the pruned structure's MAC ratio)."""
    res = report["results"]
    cfg = report["config"]
    lines = [f"{cfg['model']}  {cfg['dtype']}  {cfg['device']}  mode={cfg['mode']}  "
             f"({report['env'].get('gpu') or report['env'].get('cpu')})"]
    hdr = (f"{'batch':>5} {'variant':<14} {'median ms':>10} {'IQR ms':>8} {'images/s':>10} "
           f"{'GMACs/img':>10} {'speedup':>8} {'x MACs':>7} {'realized':>8} {'pred ms':>9}")
    modes = list(dict.fromkeys(r.get("mode", cfg["mode"]) for r in res)) or [cfg["mode"]]
    for mode in modes:
        if len(modes) > 1:
            lines.append(f"-- {mode}")
        lines += [hdr, "-" * len(hdr)]
        for r in res:
            if r.get("mode", cfg["mode"]) != mode:
                continue
            sp = f"{r['speedup']:.2f}" if "speedup" in r else "-"
            eff = f"{r['speedup_per_mac_reduction']:.2f}" if "speedup" in r else "-"
            real = f"{r['realized']:.2f}" if "realized" in r else "-"
            lines.append(f"{r['batch']:>5} {r['variant']:<14} {r['median_ms']:>10.3f} "
                         f"{r['iqr_ms']:>8.3f} {r['images_per_s']:>10.1f} "
                         f"{r['macs_per_image'] / 1e9:>10.3f} {sp:>8} {eff:>7} {real:>8} "
                         f"{_ms(r.get('predicted_ms')):>9}")
    lay = cfg.get("layout")
    if lay:
        lines.append(f"compact layout: {lay['mode']}"
                     + (f" (planned for {lay['device']})" if lay.get("device") else "")
                     + (f"; {lay['note']}" if lay.get("note") else ""))
    if cfg.get("predicted_note"):
        lines.append(f"pred ms (latency table): {cfg['predicted_note']}")
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['variant']}: {s['reason']}")
    for k, val in report.get("checks", {}).items():
        lines.append(f"check {k}: {val:.2e}")
    return "\n".join(lines)


__all__ = ["VARIANTS", "Variants", "load_models", "build_variants", "check_outputs",
           "summarize", "time_callables", "set_attention_backend", "attention_backend",
           "environment", "bench", "format_report", "write_json",
           "parse_batches", "parse_compare", "parse_dtype", "parse_modes", "resolve_device",
           "MODES"]
