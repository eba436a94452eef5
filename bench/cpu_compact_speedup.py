"""CPU benchmark for the spine: deit_small compact at ~50% MACs with heterogeneous head dims,
batch 8, float32, against dense timm on this machine.

    python bench/cpu_compact_speedup.py --out bench/results/cpu

Timing: pyengine's one harness (pyengine.measure.timing, through
pyengine.experiments.demo.compact_vs_dense: dense and compact interleaved, median, IQR, the
speedup with its paired spread). Writes <out>/compact_speedup_<model>_b<batch>.json (every
measurement, the specs' shapes and the environment record) and prints a log; run it with
`| tee <out>/...log` to keep the raw log.
Target (issue #2): measured speedup / (dense MACs / compact MACs) >= 0.75.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from pyengine.experiments.demo import compact_vs_dense, format_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--specs", type=int, default=3, help="number of random heterogeneous specs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results/cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = []
    for seed in range(a.specs):
        r = compact_vs_dense(a.model, a.target, a.batch, a.repeats, warmup=3, spec_seed=seed)
        print(f"--- spec seed {seed}")
        print(format_table(r), flush=True)
        # per block: (qk dim, v dim) of each kept head, and the kept FFN width
        r["spec_shapes"] = [{"heads": [(len(h["qk"]), len(h["v"])) for h in b["heads"]],
                             "mlp": len(b["mlp"])} for b in r.pop("spec")["blocks"]]
        runs.append(r)
    ratios = [r["speedup_per_mac_reduction"] for r in runs]
    summary = {"model": a.model, "batch": a.batch, "dtype": "float32", "target": a.target,
               "speedup_per_mac_reduction_median": statistics.median(ratios),
               "speedup_per_mac_reduction_min": min(ratios),
               "speedups": [r["speedup"] for r in runs],
               "speedups_paired_p25_p75": [[r["speedup_p25"], r["speedup_p75"]] for r in runs],
               "macs_ratios": [r["macs_ratio"] for r in runs],
               "threshold": 0.75, "passes": min(ratios) >= 0.75}
    print("--- summary")
    print(json.dumps(summary, indent=2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compact_speedup_{a.model}_b{a.batch}.json"
    path.write_text(json.dumps({"summary": summary, "runs": runs, "env": runs[0]["env"]},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
