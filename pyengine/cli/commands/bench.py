"""``pyengine bench``: latency of dense timm, our compact model, the padded-heads model and a
Torch-Pruning model of the same MACs, at several batch sizes."""
from __future__ import annotations

import json

HELP = "GPU/CPU latency of dense, compact, padded and Torch-Pruning variants"
DESCRIPTION = (
    "Time a pruned ViT against dense timm (and the padded-heads and Torch-Pruning peers) with "
    "one harness: CUDA events around eager calls or CUDA-graph replays (perf_counter on the "
    "CPU), warm-up, many samples taken round-robin, median and interquartile range. --model is "
    "a pyengine.save directory, or a timm name with --target (a random heterogeneous structure "
    "at that MAC fraction) or --spec FILE.")


def add_model_arguments(p) -> None:
    """--model/--spec/--target/--seed/--model-kwargs, shared with ``pyengine profile``."""
    p.add_argument("--model", required=True, help="timm model name or pyengine.save directory")
    p.add_argument("--spec", help="spec.json giving the compact structure of a timm model")
    p.add_argument("--target", type=float, help="MAC fraction for a random heterogeneous "
                                               "compact structure (pyengine.synthetic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --target structure")
    p.add_argument("--model-kwargs", default=None, type=json.loads,
                   help='JSON kwargs for timm.create_model, e.g. \'{"depth": 2, "img_size": 64}\'')


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--compare", default="dense,padded,torch-pruning",
                   help="variants besides compact: dense, exact (compact in the exact layout), "
                        "padded, torch-pruning (comma list)")
    p.add_argument("--batch", default="1,8,64,256", help="batch sizes, comma list")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (cuda only)")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant first")
    p.add_argument("--modes", default=None,
                   help="several modes in one run, comma list of eager, compile, graphs, "
                        "compile+graphs (overrides --compile/--graphs)")
    p.add_argument("--layout", default=None,
                   help="head layout of the compact model: auto (default: planned with the "
                        "device's latency table), exact, padded")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50, help="timed samples per variant and batch")
    p.add_argument("--rounds", type=int, default=5, help="round-robin passes over the variants")
    p.add_argument("--min-sample-ms", type=float, default=0.0,
                   help="repeat short calls inside one sample until it lasts this long")
    p.add_argument("--backend", default="auto",
                   help="attention backend of the compact model: auto, torch, triton, cuda")
    p.add_argument("--multiple", type=int, default=8,
                   help="Torch-Pruning peer: head dim and FFN width multiple of this")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the report here (JSON)")


def run(a) -> int:
    import torch

    from pyengine.measure.bench import (bench, build_variants, format_report, parse_batches,
                                        parse_modes, resolve_device, set_attention_backend,
                                        write_json)
    if a.threads:
        torch.set_num_threads(a.threads)
    from pyengine.ops import BACKENDS
    batches = parse_batches(a.batch)  # fail early, before any model is built
    modes = parse_modes(a.modes) if a.modes else None
    if a.backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {a.backend!r}; choose from {BACKENDS}")
    dev = resolve_device(a.device)
    v = build_variants(a.model, a.compare, spec=a.spec, target=a.target, seed=a.seed,
                       model_kwargs=a.model_kwargs, multiple=a.multiple, show=print,
                       layout=a.layout, device=dev, dtype=a.dtype)
    for k in ("compact", "exact"):
        if k in v.models and a.backend != "auto":
            set_attention_backend(v.models[k], a.backend)
    report = bench(v, batches, dtype=a.dtype, device=dev, graphs=a.graphs,
                   compiled=a.compile, warmup=a.warmup, repeats=a.repeats, rounds=a.rounds,
                   min_sample_ms=a.min_sample_ms, show=print, modes=modes)
    print(format_report(report))
    if a.json:
        print(f"wrote {write_json(report, a.json)}")
    return 0
