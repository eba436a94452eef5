"""The whole GPU comparison in one command (about 2-5 minutes on an H100; hard budget 10):

    python bench/gpu_end_to_end.py                      # deit_small, 50% MACs, bf16, cuda

1. builds dense deit_small (timm), our compact model at 50% MACs with heterogeneous head
   dims (pyengine.synthetic, seeded), the padded-heads model (every head at its layer's
   widest, one SDPA call) and a Torch-Pruning model of the same MACs with uniform heads
   (skipped, with the reason recorded, where torch_pruning is not installed);
2. times all four at batch 1, 8, 64, 256 in eager mode and with CUDA graphs (and with
   torch.compile if --compile), CUDA events, warm-up, median and IQR;
   then the compact model alone on each attention backend (torch, triton, cuda) vs dense;
3. profiles dense vs compact per layer at batch 64 under a roof measured interleaved
   with them (pyengine.measure.roofline) and draws the roofline;
4. writes <out>/<gpu>-<date>.json (env, every result, profile, summary against the issue's
   targets), <gpu>-<date>.log (everything printed) and the plots <gpu>-<date>-speedup.png,
   <gpu>-<date>-roofline.png.

Targets (issue 9), measured speedup x (pruned MACs / dense MACs), bf16, compact at 50% MACs:
>= 0.90 at batch 256, and compact at least as fast as the padded and Torch-Pruning models
at every batch (they do the same useful work: padded computes the compact model's function,
Torch-Pruning has the same MACs).

On a bare GPU machine run it from the repository root; it imports pyengine from the checkout
if it is not installed (the CUDA C++ kernels then need ``pip install --no-build-isolation
--no-deps -e .`` first, a separate step; without them that backend is recorded as failed).

Torch-Pruning on a machine without internet: carry its wheel (pure Python), e.g.
``pip download --no-deps torch-pruning==1.6.0 -d .whl`` here, then there
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site``.
A CPU dry run (no graphs) checks the script end to end on a tiny model:
``python bench/gpu_end_to_end.py --device cpu --model vit_tiny_patch16_224
--model-kwargs '{"depth": 2, "img_size": 32}' --dtype fp32 --batches 1,2 --out /tmp/e2e``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_pyengine() -> str:
    """Import pyengine from this checkout when it is not installed (a bare GPU machine):
    the package from the repository root, and its Triton kernels (kernels/, installed as
    pyengine.kernels by setup.py) registered under that name. Returns how it was found."""
    import importlib.util
    try:
        import pyengine  # noqa: F401
        how = "installed"
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import pyengine  # noqa: F401
        how = f"from {ROOT} (not installed)"
    if importlib.util.find_spec("pyengine.kernels") is None and (ROOT / "kernels").is_dir():
        spec = importlib.util.spec_from_file_location(
            "pyengine.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pyengine.kernels"] = mod
        spec.loader.exec_module(mod)
        pyengine.kernels = mod
        how += "; kernels/ registered as pyengine.kernels"
    return how


class _Tee:
    """Write to the console and the raw log at once (the log is committed with the JSON)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s):
        self.stream.write(s)
        self.log.write(s)
        self.log.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _paths(out: Path, device_name: str) -> dict[str, Path]:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{_slug(device_name)}-{date}"
    if (out / f"{stem}.json").exists():  # a second run the same day keeps the first
        stem += _dt.datetime.now(_dt.timezone.utc).strftime("-%H%M%S")
    return {"json": out / f"{stem}.json", "log": out / f"{stem}.log",
            "speedup_png": out / f"{stem}-speedup.png",
            "roofline_png": out / f"{stem}-roofline.png"}


def _useful_ratio(results, variant, batch):
    """MAC ratio of the work a variant does usefully: padded does compact's work."""
    by = {r["variant"]: r for r in results if r["batch"] == batch}
    ref = "compact" if variant == "padded" else variant
    return by[ref]["macs"] / by["dense"]["macs"] if ref in by and "dense" in by else None


def summarize(results: list[dict], big_batch: int, goal: float = 0.90) -> dict:
    """Speedup x useful-MAC ratio per mode, variant and batch, and the issue's pass/fail."""
    out: dict = {"goal_speedup_per_mac_reduction": goal, "big_batch": big_batch, "modes": {}}
    for mode in sorted({r["mode"] for r in results}):
        rs = [r for r in results if r["mode"] == mode]
        table: dict = {}
        for r in rs:
            if "speedup" not in r:
                continue
            ratio = _useful_ratio(rs, r["variant"], r["batch"])
            table.setdefault(r["variant"], {})[r["batch"]] = {
                "speedup": r["speedup"], "useful_macs_ratio": ratio,
                "speedup_per_mac_reduction": r["speedup"] * ratio if ratio else None,
                "median_ms": r["median_ms"], "images_per_s": r["images_per_s"]}
        checks = {}
        comp = table.get("compact", {})
        if big_batch in comp:
            checks[f"compact_at_batch_{big_batch}_>=_{goal}"] = \
                comp[big_batch]["speedup_per_mac_reduction"] >= goal
        for peer in ("padded", "torch-pruning"):
            if peer in table:
                key = "speedup_per_mac_reduction"
                checks[f"compact_>=_{peer}_every_batch"] = all(
                    comp[b][key] >= table[peer][b][key] for b in comp if b in table[peer])
        out["modes"][mode] = {"table": table, "checks": checks}
    return out


def plot_speedups(results: list[dict], path: Path, title: str, goal: float = 0.90) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "k", "compact": "tab:red", "padded": "tab:blue",
              "torch-pruning": "tab:green"}
    styles = {"eager": "-", "graphs": "--", "compile": ":", "compile+graphs": "-."}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for mode in sorted({r["mode"] for r in results}):
        rs = [r for r in results if r["mode"] == mode]
        for v in colors:
            pts = sorted((r["batch"], r) for r in rs if r["variant"] == v)
            if not pts:
                continue
            bs = [b for b, _ in pts]
            ax.plot(bs, [r["images_per_s"] for _, r in pts], styles.get(mode, "-"), marker="o",
                    color=colors[v], label=f"{v} ({mode})")
            if v != "dense":
                eff = [r["speedup"] * (_useful_ratio(rs, v, b) or float("nan")) for b, r in pts]
                bx.plot(bs, eff, styles.get(mode, "-"), marker="o", color=colors[v],
                        label=f"{v} ({mode})")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size")
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("images / s (median)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    bx.axhline(goal, color="gray", lw=1, ls=":", label=f"goal {goal}")
    bx.axhline(1.0, color="gray", lw=0.6)
    bx.set_ylabel("speedup x (useful MACs / dense MACs)")
    bx.set_title("how much of the MAC reduction becomes speed", fontsize=10)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=json.loads, default=None)
    p.add_argument("--target", type=float, default=0.5, help="compact MAC fraction")
    p.add_argument("--seed", type=int, default=0, help="seed of the heterogeneous structure")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--graph-batches", default=None, help="batches also timed with CUDA graphs "
                                                          "(default: all)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile every variant (+ CUDA graphs): minutes more")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-sample-ms", type=float, default=0.5,
                   help="repeat short calls within one pair of events up to this long")
    p.add_argument("--backend", default="auto",
                   help="attention backend of the compact model in the main comparison")
    p.add_argument("--backends", default="torch,triton,cuda",
                   help="attention backends also timed for the compact model alone (vs dense); "
                        "empty to skip")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--copy-mib", type=int, default=None,
                   help="source MiB of the roof's DRAM stream (default: twice the L2)")
    p.add_argument("--gemm-n", type=int, default=None,
                   help="one square GEMM size for the roof (default 2048,4096,8192; the "
                        "models' layer shapes are always added)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="skip (and record) stages that would start after this many seconds")
    p.add_argument("--out", default="bench/results/gpu")
    a = p.parse_args(argv)

    how = _import_pyengine()
    from pyengine.measure.bench import (Variants, bench, build_variants, format_report, parse_batches,
                                set_attention_backend, write_json)
    from pyengine.measure.roofline import format_profile, plot, profile

    t_start = time.perf_counter()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: this script measures GPUs (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out, device_name)
    log = open(paths["log"], "w")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old[0], log), _Tee(old[1], log)
    doc: dict = {"script": "bench/gpu_end_to_end.py", "argv": sys.argv[1:] if argv is None
                 else list(argv), "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                 "results": [], "stages": {}, "files": {k: v.name for k, v in paths.items()}}
    try:
        print(f"pyengine imported {how}; extension: ", end="")
        from pyengine.ops import _ext
        print("loaded" if _ext.available() else _ext.load_error(), flush=True)
        doc["pyengine_import"] = how
        torch.manual_seed(a.seed)
        batches = parse_batches(a.batches)
        gbatches = parse_batches(a.graph_batches) if a.graph_batches else batches

        def left() -> float:
            return a.budget_s - (time.perf_counter() - t_start)

        def stage(name, fn):
            if left() <= 0:
                doc["stages"][name] = {"skipped": f"time budget of {a.budget_s} s used up"}
                print(f"=== {name}: skipped (budget)", flush=True)
                return None
            print(f"=== {name} ({left():.0f} s of budget left)", flush=True)
            t0 = time.perf_counter()
            try:
                r = fn()
                doc["stages"][name] = {"seconds": time.perf_counter() - t0}
                return r
            except Exception as e:  # record and go on: the other stages still count
                traceback.print_exc()
                doc["stages"][name] = {"error": f"{type(e).__name__}: {e}",
                                       "seconds": time.perf_counter() - t0}
                return None

        v = stage("build", lambda: build_variants(
            a.model, ["dense", "padded", "torch-pruning"], target=a.target, seed=a.seed,
            model_kwargs=a.model_kwargs, show=print))
        if v is None:
            raise RuntimeError("could not build the models; see the log")
        set_attention_backend(v.models["compact"], a.backend)
        doc["config"] = {"model": v.model, "attention_backend": a.backend, "target": a.target,
                         "seed": a.seed,
                         "batches": batches, "graph_batches": gbatches, "dtype": a.dtype,
                         **v.info}
        doc["skipped"] = [{"variant": k, "reason": r} for k, r in v.skipped.items()]
        common = dict(dtype=a.dtype, device=dev, warmup=a.warmup, repeats=a.repeats,
                      rounds=a.rounds, min_sample_ms=a.min_sample_ms, show=print,
                      deadline=t_start + a.budget_s)
        modes = [("eager", batches, False, False)]
        if dev.type == "cuda":
            modes.append(("graphs", gbatches, True, False))
            if a.compile:
                modes.append(("compile+graphs", gbatches, True, True))
        else:
            doc["stages"]["graphs"] = {"skipped": "CUDA graphs need a CUDA device"}
        for name, bs, graphs, compiled in modes:
            rep = stage(f"bench {name}", lambda bs=bs, graphs=graphs, compiled=compiled: bench(
                v, bs, graphs=graphs, compiled=compiled, **common))
            if rep is not None:
                print(format_report(rep), flush=True)
                doc["env"] = rep["env"]
                doc.setdefault("checks", {}).update(rep["checks"])
                doc["results"] += rep["results"]
            write_json(doc, paths["json"])  # keep what is done if a later stage dies
        # the compact model on each attention backend (torch reference, Triton, CUDA C++):
        # which kernel the "auto" table should pick on this GPU
        backends = [b.strip() for b in a.backends.split(",") if b.strip()]

        def by_backend():
            out = {}
            for b in backends:
                vb = Variants(model=v.model, img_size=v.img_size,
                              models={"dense": v.models["dense"],
                                      "compact": v.models["compact"]})
                try:
                    set_attention_backend(vb.models["compact"], b)
                    out[b] = []
                    for name, bs, graphs, compiled in modes[:2]:  # eager, graphs
                        rep = bench(vb, bs, graphs=graphs, compiled=compiled, **common)
                        print(f"--- compact attention backend {b}")
                        print(format_report(rep), flush=True)
                        out[b] += rep["results"]
                except Exception as e:
                    print(f"--- compact attention backend {b}: {type(e).__name__}: {e}")
                    out[b] = {"error": f"{type(e).__name__}: {e}"}
            set_attention_backend(v.models["compact"], a.backend)
            return out

        if backends:
            doc["backend_results"] = stage("compact backends", by_backend)
            write_json(doc, paths["json"])
        models = {k: v.models[k] for k in ("dense", "compact") if k in v.models}
        prof = stage("profile", lambda: profile(models, batch=a.profile_batch, dtype=a.dtype,
                                                device=dev, model_name=v.model,
                                                copy_mib=a.copy_mib,
                                                gemm_sizes=[a.gemm_n] if a.gemm_n else None))
        if prof is not None:
            print(format_profile(prof, max_rows=30), flush=True)
            plot(prof, paths["roofline_png"])
            doc["profile"] = prof
            doc.setdefault("env", prof["env"])
        big = max(batches)
        doc["summary"] = summarize(doc["results"], big)
        if doc["results"]:
            plot_speedups(doc["results"], paths["speedup_png"],
                          f"{v.model} at {a.target:.0%} MACs, {a.dtype}, {device_name}")
        doc["wall_s"] = time.perf_counter() - t_start
        write_json(doc, paths["json"])
        print("=== summary")
        print(json.dumps(doc["summary"]["modes"], indent=1, default=str)[:6000])
        print(f"wall {doc['wall_s']:.1f} s; wrote " + ", ".join(
            str(x) for x in paths.values() if x.exists()))
        return 0
    finally:
        sys.stdout, sys.stderr = old
        log.close()


if __name__ == "__main__":
    sys.exit(main())
