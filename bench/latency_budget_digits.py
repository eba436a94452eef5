"""Latency budgets on the embedded digits (issue 15): for each seed and method (HiAP, AGF
one-shot), `pyengine prune` with ``--budget latency`` at the latency targets and with
``--budget macs`` at the MAC targets (the MAC front the latency-budgeted structure is compared
with at equal measured latency). Every run records the predicted and measured latency
(pyengine.measure.timing, dense and pruned interleaved) at batch 1 and 64 in its metrics.json.

    python bench/latency_budget_digits.py --seeds 0,1,2 --methods hiap,agf \\
        --latency-targets 0.4,0.5,0.6 --mac-targets 0.3,0.4,0.5,0.6,0.7 \\
        --out bench/results/cpu/latency_budget_digits

``--demo`` runs the `pyengine demo` model and recipe (a digits ViT of width 128, depth 4, at
16 px: a dense model in under a minute on 2 cores) instead of the --model/--epochs flags.

writes OUT.json (every run's metrics, the checks, the equal-latency comparison), OUT.log and
OUT.png (top-1 vs measured latency: the latency-budget and MAC-budget fronts per method);
the runs' model directories go to OUT.runs/.

Checks reported (not asserted): at ``--check-target`` the measured latency of the
latency-budgeted model is within +-7% of that fraction of the dense model's measured latency
(each of --latency-batches); at equal measured latency (batch --compare-batch) the
latency-budgeted model's top-1 minus the MAC front's (linear interpolation between the MAC
runs of that seed and method), mean and spread over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pyengine.io.atomic import write_json, write_text
from pyengine.measure.timing import environment


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    from pyengine.methods.base import Budget, Training, get_method
    from pyengine.methods.pipeline import PruneJob, run

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits_vit")
    p.add_argument("--model-kwargs", type=json.loads, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="hiap,agf")
    p.add_argument("--latency-targets", default="0.4,0.5,0.6")
    p.add_argument("--mac-targets", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--check-target", type=float, default=0.5)
    p.add_argument("--latency-batch", type=int, default=1,
                   help="batch the latency budget is predicted at")
    p.add_argument("--latency-batches", default="1,64", help="measured in every run")
    p.add_argument("--compare-batch", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10, help="HiAP epochs")
    p.add_argument("--dense-epochs", type=int, default=None, help="default: the digits recipe")
    p.add_argument("--finetune", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--demo", action="store_true",
                   help="the `pyengine demo` model, data settings and recipe (digits ViT of "
                        "width 128 and depth 4 at 16 px, its dense and HiAP schedules) instead "
                        "of the flags above")
    p.add_argument("--min-heads", type=int, default=None,
                   help="minimum heads per layer (0 lets a whole attention block go)")
    p.add_argument("--out", required=True, help="path prefix: OUT.json, OUT.log, OUT.png, "
                                                "OUT.runs/")
    p.add_argument("--resummarize", action="store_true",
                   help="read OUT.json and write its summary and OUT.png again (no runs)")
    p.add_argument("--remeasure", type=int, default=0, metavar="N",
                   help="time every run's pruned model in OUT.json against the dense model "
                        "again: N samples each, alternating sample by sample (the in-run "
                        "timing: 10 each in 5 passes); the in-run figures are kept as "
                        "*_in_run")
    a = p.parse_args(argv)
    if a.remeasure:
        _remeasure(a)
        return _resummarize(a)
    if a.resummarize:
        return _resummarize(a)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    runs_dir = out.with_name(out.name + ".runs")
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    lat_batches = tuple(_ints(a.latency_batches))
    runs = []
    for seed in _ints(a.seeds):
        dense_ckpt = None
        for method in a.methods.split(","):
            get_method(method)
            plans = [("latency", t) for t in _floats(a.latency_targets)] + \
                    [("macs", t) for t in _floats(a.mac_targets)]
            for unit, target in plans:
                d = runs_dir / f"seed{seed}" / f"{method}_{unit}{target:g}"
                if a.demo:
                    job = _demo_job(d, seed, method, unit, target, a, dense_ckpt, lat_batches)
                else:
                    job = PruneJob(model=a.model, out=str(d), method=method,
                                   model_kwargs=a.model_kwargs, img_size=a.img_size,
                                   checkpoint=dense_ckpt, batch_size=a.batch_size,
                                   dense_epochs=a.dense_epochs if dense_ckpt is None else None,
                                   finetune=a.finetune,
                                   budget=Budget(target=target, budget=unit,
                                                 latency_batch=a.latency_batch,
                                                 **({} if a.min_heads is None
                                                    else {"min_heads": a.min_heads})),
                                   training=Training(epochs=a.epochs, seed=seed, progress=False,
                                                     device="cpu"),
                                   overwrite=True, latency_batches=lat_batches)
                say(f"== seed {seed} {method} --budget {unit} --target {target:g}")
                res = run(job, log=say)
                if dense_ckpt is None:  # every later run of this seed starts from these weights
                    dense_ckpt = str(d / "checkpoints" / "dense.safetensors")
                m = res["metrics"]
                lat = m.get("latency", {})
                row = {"seed": seed, "method": method, "budget": unit, "target": target,
                       "dense_top1": m["dense_top1"], "pruned_top1": m["pruned_top1"],
                       "macs_ratio": m["macs_ratio"], "latency": lat,
                       "predicted_ratio": m.get("latency_ratio"), "dir": str(d)}
                for b in lat_batches:
                    pm = lat["measured_ms"]["pruned"][str(b)]["median_ms"]
                    dm = lat["measured_ms"]["dense"][str(b)]["median_ms"]
                    row[f"measured_ms_b{b}"], row[f"dense_ms_b{b}"] = pm, dm
                    row[f"measured_ratio_b{b}"] = pm / dm
                runs.append(row)
                say("   top-1 {:.2f} (dense {:.2f}), MAC ratio {:.3f}, ".format(
                    row["pruned_top1"], row["dense_top1"], row["macs_ratio"])
                    + ", ".join(f"b{b} {row[f'measured_ms_b{b}']:.3f} ms = "
                                f"{row[f'measured_ratio_b{b}']:.3f} of dense"
                                for b in lat_batches))
    summary = _summary(runs, a, lat_batches, say)
    say(f"total {time.perf_counter() - t0:.0f} s")
    doc = {"env": environment("cpu"), "config": vars(a), "runs": runs, "summary": summary,
           "argv": sys.argv}
    write_json(doc, out.with_name(out.name + ".json"))
    write_text(out.with_name(out.name + ".log"), "\n".join(lines) + "\n")
    _plot(runs, a, out.with_name(out.name + ".png"))
    return 0


def _resummarize(a) -> int:
    """The summary and figure of the runs in OUT.json again (this version's comparison),
    appended to OUT.log."""
    import json as _json
    out = Path(a.out)
    path = out.with_name(out.name + ".json")
    doc = _json.loads(path.read_text())
    cfg = argparse.Namespace(**{**doc["config"], "compare_batch": a.compare_batch,
                                "check_target": a.check_target})
    lat_batches = tuple(_ints(cfg.latency_batches))
    lines = [f"== summarized again ({' '.join(sys.argv)}): equal latency as the fraction of "
             "the dense model's measured latency"]

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    doc["summary"] = _summary(doc["runs"], cfg, lat_batches, say)
    write_json(doc, path)
    log = out.with_name(out.name + ".log")
    write_text(log, (log.read_text() if log.is_file() else "") + "\n".join(lines) + "\n")
    _plot(doc["runs"], cfg, out.with_name(out.name + ".png"))
    return 0


def _remeasure(a) -> None:
    """Time each run of OUT.json again: its saved pruned model and the dense architecture
    (random weights: the time does not depend on them), interleaved, longer than in the run
    (this VM's speed drifts over seconds; a longer window averages more of it)."""
    import json as _json

    import pyengine
    from pyengine.measure.latency_report import latency_report
    from pyengine.experiments.demo import DEMO, DEMO_MODEL
    out = Path(a.out)
    path = out.with_name(out.name + ".json")
    doc = _json.loads(path.read_text())
    cfg = doc["config"]
    torch.set_num_threads(int(cfg["threads"]))
    lat_batches = tuple(_ints(cfg["latency_batches"]))
    lines = [f"== measured again ({' '.join(sys.argv)}): {a.remeasure} samples per model, "
             f"dense and pruned alternating, {torch.get_num_threads()} threads"]
    if cfg.get("demo"):
        dense = pyengine.create_model("digits_vit", img_size=DEMO["img_size"], num_classes=10,
                                      **DEMO_MODEL).eval()
    else:
        dense = pyengine.create_model(cfg["model"], img_size=cfg["img_size"],
                                      **(cfg["model_kwargs"] or {})).eval()
    for r in doc["runs"]:
        pruned = pyengine.load(r["dir"]).eval()
        rep = latency_report({"dense": dense, "pruned": pruned}, "cpu", lat_batches,
                             repeats=a.remeasure, rounds=a.remeasure)
        r["latency"]["measured_ms_in_run"] = r["latency"]["measured_ms"]
        r["latency"]["measured_ms"] = rep["measured_ms"]
        for b in lat_batches:
            for k in ("measured_ms", "dense_ms", "measured_ratio"):
                r.setdefault(f"{k}_b{b}_in_run", r[f"{k}_b{b}"])
            pm = rep["measured_ms"]["pruned"][str(b)]["median_ms"]
            dm = rep["measured_ms"]["dense"][str(b)]["median_ms"]
            r[f"measured_ms_b{b}"], r[f"dense_ms_b{b}"], r[f"measured_ratio_b{b}"] = \
                pm, dm, pm / dm
        text = (f"seed {r['seed']} {r['method']} {r['budget']} {r['target']:g}: " + ", ".join(
            f"b{b} {r[f'measured_ratio_b{b}']:.3f} of dense (in the run "
            f"{r[f'measured_ratio_b{b}_in_run']:.3f})" for b in lat_batches))
        print(text, flush=True)
        lines.append(text)
    doc.setdefault("remeasured", []).append({"argv": sys.argv, "rounds": a.remeasure,
                                             "env": environment("cpu")})
    write_json(doc, path)
    log = out.with_name(out.name + ".log")
    write_text(log, (log.read_text() if log.is_file() else "") + "\n".join(lines) + "\n")


def _demo_job(d: Path, seed: int, method: str, unit: str, target: float, a, dense_ckpt,
              lat_batches):
    """The demo's prune job (pyengine.experiments.demo.prune_job) with this run's method,
    budget, seed and dense checkpoint; HiAP keeps the demo's gate settings, other methods
    their defaults."""
    import dataclasses

    from pyengine.experiments.demo import DEMO, DEMO_MODEL, prune_job
    job = prune_job(d, DEMO, dict(DEMO_MODEL), seed=seed, progress=False, overwrite=True)
    budget = dataclasses.replace(job.budget, target=target, budget=unit,
                                 latency_batch=a.latency_batch,
                                 **({} if a.min_heads is None else {"min_heads": a.min_heads}))
    return dataclasses.replace(
        job, method=method, budget=budget, checkpoint=dense_ckpt,
        dense_epochs=job.dense_epochs if dense_ckpt is None else None,
        method_config=job.method_config if method == "hiap" else None,
        latency_batches=lat_batches)


def _interp(front: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (ms, top-1) points at ``x`` (None outside the front)."""
    pts = sorted(front)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _summary(runs, a, lat_batches, say) -> dict:
    cb = a.compare_batch
    out = {"budget_check": [], "equal_latency": {}}
    for r in runs:
        if r["budget"] == "latency" and abs(r["target"] - a.check_target) < 1e-9:
            c = {"seed": r["seed"], "method": r["method"]}
            for b in lat_batches:
                dev = r[f"measured_ratio_b{b}"] / a.check_target - 1.0
                c[f"b{b}_rel_to_target"] = dev
                c[f"b{b}_within_7pct"] = abs(dev) <= 0.07
            out["budget_check"].append(c)
            say(f"check seed {r['seed']} {r['method']}: " + ", ".join(
                f"b{b} {c[f'b{b}_rel_to_target']:+.1%} of the target" for b in lat_batches))
    for method in dict.fromkeys(r["method"] for r in runs):
        diffs = []
        for seed in dict.fromkeys(r["seed"] for r in runs):
            mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
            lat = next((r for r in mine if r["budget"] == "latency"
                        and abs(r["target"] - a.check_target) < 1e-9), None)
            # latency as the fraction of the dense model's, both timed in the same interleaved
            # set: the machine's speed drifts between runs, the ratio much less
            front = [(r[f"measured_ratio_b{cb}"], r["pruned_top1"]) for r in mine
                     if r["budget"] == "macs"]
            if lat is None or f"measured_ratio_b{cb}" not in lat:
                continue
            y = _interp(front, lat[f"measured_ratio_b{cb}"])
            diffs.append(None if y is None else lat["pruned_top1"] - y)
        got = [d for d in diffs if d is not None]
        out["equal_latency"][method] = {
            "top1_latency_minus_macs": diffs, "batch": cb,
            "mean": statistics.mean(got) if got else None,
            "stdev": statistics.stdev(got) if len(got) > 1 else None,
            "outside_mac_front": sum(d is None for d in diffs)}
        if got:
            say(f"{method}: at equal measured latency (b{cb}) top-1 latency-budget minus "
                f"MAC-budget {statistics.mean(got):+.2f} points (n={len(got)}"
                + (f", stdev {statistics.stdev(got):.2f}" if len(got) > 1 else "") + ")")
    return out


def _plot(runs, a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cb = a.compare_batch
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for unit, style in (("latency", "o-"), ("macs", "s--")):
            pts = [r for r in runs if r["method"] == method and r["budget"] == unit]
            for seed in dict.fromkeys(r["seed"] for r in pts):
                s = sorted((r[f"measured_ratio_b{cb}"], r["pruned_top1"]) for r in pts
                           if r["seed"] == seed)
                ax.plot([x for x, _ in s], [y for _, y in s], style, alpha=0.7,
                        label=f"--budget {unit}" if seed == pts[0]["seed"] else None,
                        color="C0" if unit == "latency" else "C1")
        ax.axvline(a.check_target, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel(f"measured latency / dense model's, batch {cb}")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(method)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
