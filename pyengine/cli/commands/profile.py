"""``pyengine profile``: per-layer FLOPs, bytes, measured time and roofline bound, before
and after pruning."""
from __future__ import annotations

HELP = "per-layer roofline profile of a model (dense and compact: before/after pruning)"
DESCRIPTION = (
    "Measure the device's copy bandwidth and GEMM rate, then time every layer of the model "
    "(forward hooks with CUDA events, perf_counter on the CPU) and set it against the cost "
    "model's FLOPs and bytes: achieved TFLOP/s and GB/s, memory- or compute-bound. With "
    "--target/--spec or a pyengine.save directory both the dense and the compact model are "
    "profiled, in one JSON and one roofline plot.")


def add_arguments(p) -> None:
    from pyengine.cli.commands.bench import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the bandwidth microbenchmark (default 1024 cuda, 64 cpu)")
    p.add_argument("--gemm-n", type=int, default=None,
                   help="n of the n x n x n GEMM microbenchmark (default 8192 cuda, 1024 cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rows", type=int, default=40, help="rows printed per model (JSON: all)")
    p.add_argument("--json", help="write the profile here (JSON)")
    p.add_argument("--plot", help="write the roofline plot here (PNG)")


def run(a) -> int:
    import torch

    from pyengine.measure.bench import load_models, write_json
    from pyengine.measure.roofline import format_profile, plot, profile
    if a.threads:
        torch.set_num_threads(a.threads)
    name, dense, compact = load_models(a.model, a.spec, a.target, a.seed, a.model_kwargs)
    models = {"dense": dense}
    if compact is not None:
        models["compact"] = compact
    report = profile(models, batch=a.batch, dtype=a.dtype, device=a.device, repeats=a.repeats,
                     warmup=a.warmup, model_name=name, copy_mib=a.copy_mib, gemm_n=a.gemm_n)
    print(format_profile(report, a.rows))
    if a.json:
        print(f"wrote {write_json(report, a.json)}")
    if a.plot:
        plot(report, a.plot)
        print(f"wrote {a.plot}")
    return 0
