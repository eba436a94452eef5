"""``pyengine profile``: per-layer FLOPs, bytes, measured time and roofline bound, before
and after pruning, under a roof measured on the device it runs on."""
from __future__ import annotations

from pyengine.cli.checks import parse_sizes

HELP = "per-layer roofline profile of a model (dense and compact: before/after pruning)"
DESCRIPTION = (
    "Time every layer of the model (forward hooks with CUDA events on a GPU, perf_counter on "
    "the CPU) and set it against the cost model's FLOPs and bytes and a roof measured in the "
    "same run, interleaved with the layers: the best of square GEMMs and of the model's own "
    "layer shapes at the profiled dtype, and the best copy/read at each footprint (cache "
    "levels down to DRAM, beyond the last-level cache). Reported per layer: achieved FLOP/s "
    "and GB/s, % of the roof at its intensity, memory- or compute-bound; totals by kind; "
    "with --target/--spec or a pyengine.save directory, dense and compact side by side. The "
    "dtype defaults to what users run on the device (bf16 on a GPU; fp32 on a CPU without bf16 "
    "matrix units). A layer above the roof is reported and the roof raised to it.")


def add_arguments(p) -> None:
    from pyengine.cli.commands.bench import add_model_arguments
    from pyengine.cost.peaks import PEAKS
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default=None,
                   help="bf16, fp16, fp32 (default: the device's own: bf16 on a GPU with bf16 "
                        "tensor cores, fp32 on a CPU without bf16 matrix units)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--peaks", default="measured",
                   help="the roof: 'measured' (default: measured here, interleaved with the "
                        f"layers) or a vendor data sheet: {', '.join(sorted(PEAKS))}")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed forward passes per model (and samples per roof probe)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gemm-n", default=None,
                   help="square GEMM sizes of the compute roof, comma list (default "
                        "256,512,1024,2048 on the CPU, 2048,4096,8192 on CUDA); the model's "
                        "own layer shapes are always added")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="source size of the DRAM stream in MiB (default: twice the "
                        "last-level cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rows", type=int, default=None,
                   help="rows printed per table (default all; the JSON has all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", help="write the profile here (JSON)")
    p.add_argument("--plot", help="write the roofline plot here (PNG)")


def run(a) -> int:
    import torch

    from pyengine.measure.bench import load_models, write_json
    from pyengine.measure.roofline import format_profile, plot, profile
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = parse_sizes(a.gemm_n, "--gemm-n")
    if a.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {a.batch}")
    name, dense, compact = load_models(a.model, a.spec, a.target, a.seed, a.model_kwargs)
    models = {"dense": dense}
    if compact is not None:
        models["compact"] = compact
    report = profile(models, batch=a.batch, dtype=a.dtype, device=a.device, peaks=a.peaks,
                     repeats=a.repeats, warmup=a.warmup, model_name=name, gemm_sizes=sizes,
                     copy_mib=a.copy_mib, progress=not a.no_progress)
    print(format_profile(report, a.rows))
    if a.json:
        print(f"wrote {write_json(report, a.json)}")
    if a.plot:
        plot(report, a.plot)
        print(f"wrote {a.plot}")
    return 0
