"""Ahead-of-time compile of every Triton kernel configuration for real GPU targets, without a GPU.

TRITON_INTERPRET runs none of Triton's GPU compiler passes, so a kernel that the interpreter
runs can still fail to compile for a GPU (dot shapes, layouts, register or shared-memory
limits). This compiles every launch configuration that the kernel modules' ``launch_configs()``
list (the same tables their launchers choose from) to a cubin for each target with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` -- no driver and no GPU
needed, Triton ships its own ptxas -- and checks that the kernel's shared memory (dynamic, as
Triton launches it, plus the cubin's static) fits the target's per-block limit.

    python -m pyengine.kernels.aot --arch 80 90 [--json out.json] [--jobs 2] [--quick]
    python kernels/aot.py ...        by path: pyengine need not be installed (triton + torch)
    python -m pyengine.kernels.aot --known-bad   known-bad variants, which must fail

Library: ``compile_all(archs, ...) -> list[Result]``; the CLI prints one line per
configuration and a summary, and exits 1 when any configuration fails.

Specializations: the JIT compiles one variant per argument specialization (pointers 16-byte
aligned or not, ints divisible by 16, ints equal to 1 become constants). "aligned" is the usual
launch of contiguous tensors (unit strides are 1, everything else divisible by 16): the widest
vector loads and the deepest cp.async pipelines, so the most shared memory. "unaligned" knows
nothing (no alignment, no unit stride): the scalar-load code of odd shapes and strided views.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

if not __package__:  # run by path (python kernels/aot.py): import the folder as a package
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(_here))
    __package__ = os.path.basename(_here)
    importlib.import_module(__package__)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ._common import LaunchConfig, dtype_name, is_interpret  # noqa: E402

MODULES = ("varlen_attention", "masked_ffn", "importance")
SPECS = ("aligned", "unaligned")
# Most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 (sm_80)
# 163 KiB, H100/H200 (sm_90) 227 KiB; sm_86/sm_89 parts (RTX 30xx/40xx, A10, L4) 99 KiB
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclasses.dataclass
class Result:
    kernel: str
    config: str
    arch: int
    spec: str
    ok: bool
    shared: int | None = None       # bytes: dynamic (Triton's metadata.shared) + static
    limit: int = 0
    regs: int | None = None         # registers per thread (cuobjdump), for information
    stack: int | None = None        # local-memory stack bytes per thread: > 0 mostly spills
    seconds: float = 0.0
    cpu: float = 0.0                # CPU seconds, ptxas included (wall time depends on the load)
    error: str = ""

    def line(self) -> str:
        shared = "-" if self.shared is None else f"{self.shared}/{self.limit}"
        extra = "" if self.regs is None else f" regs={self.regs} stack={self.stack}"
        status = "ok" if self.ok else f"FAIL {self.error}"
        return (f"sm_{self.arch} {self.spec:9s} {self.kernel} [{self.config}] shared={shared}"
                f"{extra} {self.seconds:.1f}s {status}")


def launch_configs(modules=MODULES) -> list[LaunchConfig]:
    """Every launch configuration of the kernel modules, in a fixed order."""
    out = []
    for m in modules:
        out += list(importlib.import_module(f"{__package__}.{m}").launch_configs())
    return out


def _source(cfg: LaunchConfig, spec: str):
    """The ASTSource the JIT would build for this configuration and specialization."""
    from triton.compiler import ASTSource
    fn = cfg.kernel
    params = {p.name: p for p in fn.params}
    missing = [n for n, p in params.items() if p.is_constexpr and n not in cfg.constexprs]
    unknown = [n for n in list(cfg.constexprs) + list(cfg.pointers) if n not in params]
    untyped = [n for n in params if n.endswith("_ptr") and n not in cfg.pointers]
    if missing or unknown or untyped:
        raise ValueError(f"{cfg.kernel_name}: launch config does not match the kernel: "
                         f"constexprs missing {missing}, unknown arguments {unknown}, pointers "
                         f"without a type {untyped}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cfg.constexprs:
            signature[name], constexprs[name] = "constexpr", cfg.constexprs[name]
        elif spec == "aligned" and name in cfg.unit:
            signature[name], constexprs[name] = "constexpr", 1   # the JIT's specialization of 1
        else:
            signature[name] = f"*{dtype_name(cfg.pointers[name])}" if name in cfg.pointers \
                else "i32"
            if spec == "aligned":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def _resource_usage(cubin: bytes, name: str) -> tuple[int, int, int] | None:
    """(registers, stack bytes, static shared bytes) of kernel ``name`` in the cubin, read by
    the cuobjdump that ships with Triton; None when it is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=120).stdout
    m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return tuple(int(g) for g in m.groups()) if m else None


def compile_one(cfg: LaunchConfig, arch: int, spec: str = "aligned") -> Result:
    """Compile one configuration to a cubin for sm_<arch> and check its shared memory."""
    from triton.backends.compiler import GPUTarget
    res = Result(cfg.kernel_name, cfg.label, arch, spec, ok=False,
                 limit=SHARED_LIMIT.get(arch, 0))
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        kernel = triton.compile(_source(cfg, spec), target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages))
        usage = _resource_usage(kernel.asm["cubin"], kernel.metadata.name)
        static = 0
        if usage is not None:
            res.regs, res.stack, static = usage
        res.shared = kernel.metadata.shared + static
        res.ok = res.limit > 0 and res.shared <= res.limit
        if not res.ok:
            res.error = (f"shared memory {res.shared} B > sm_{arch} limit {res.limit} B"
                         if res.limit else f"no shared-memory limit known for sm_{arch}")
    except Exception as e:  # a compile error of any stage (frontend, MLIR passes, ptxas)
        msg = " ".join(str(e).split())
        res.error = f"{type(e).__name__}: {msg[:400]}"
    res.seconds, res.cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return res


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas, cuobjdump)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---- parallel driver: workers re-list the configurations and take theirs by index -------------
_WORKER: dict = {}


def _init_worker(modules) -> None:
    _WORKER["configs"] = launch_configs(modules)


def _run_task(task) -> Result:
    i, key, arch, spec = task
    cfg = _WORKER["configs"][i]
    assert (cfg.kernel_name, cfg.label) == key, "configuration lists differ between processes"
    return compile_one(cfg, arch, spec)


def compile_all(archs=(80, 90), modules=MODULES, configs=None, specs=("aligned",), jobs=1,
                log=print) -> list[Result]:
    """Compile ``configs`` (default: every configuration of ``modules``) for each arch and
    specialization, in ``jobs`` processes when they all are configurations of ``modules`` (the
    workers list those again and take theirs by index), else in this one. ``log`` gets one
    line per result, in order."""
    if is_interpret():
        raise RuntimeError("kernels.aot: TRITON_INTERPRET is set, so the kernels were built for "
                           "the interpreter; run without it")
    full = launch_configs(modules)
    configs = full if configs is None else list(configs)
    where = {(c.kernel_name, c.label): i for i, c in enumerate(full)}
    runs = [(spec, arch, c) for spec in specs for arch in archs for c in configs]
    results = []
    if jobs > 1 and all((c.kernel_name, c.label) in where for c in configs):
        tasks = [(where[c.kernel_name, c.label], (c.kernel_name, c.label), arch, spec)
                 for spec, arch, c in runs]
        # spawn: fresh interpreters, none of this one's state (threads, CUDA, the JIT caches)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(tuple(modules),)) as pool:
            for res in pool.map(_run_task, tasks, chunksize=1):
                log(res.line())
                results.append(res)
    else:
        for spec, arch, c in runs:
            results.append(compile_one(c, arch, spec))
            log(results[-1].line())
    return results


# ---- known-bad variants: the check must reject them --------------------------------------------
@triton.jit
def _dot8_kernel(a_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))


def known_bad_configs() -> list[LaunchConfig]:
    """Variants that must fail: a tl.dot on 8-wide tiles (tl.dot needs >= 16), and the masked-FFN
    dW2 GEMM in fp16 with 128 x 256 x 64 tiles and 5 stages, which runs under the interpreter
    but whose cp.async pipeline needs 192 KiB (sm_80) / 241 KiB (sm_90) of shared memory."""
    import torch
    from . import masked_ffn
    meta, warps, stages = masked_ffn._meta((128, 256, 64, 8, 5), **masked_ffn.DW2)
    dw2 = next(c for c in masked_ffn.launch_configs() if c.label.startswith("DW2 fp16"))
    return [
        LaunchConfig(_dot8_kernel, "fp16 BLOCK=8", dict(BLOCK=8),
                     dict(a_ptr=torch.float16, c_ptr=torch.float32)),
        dataclasses.replace(dw2, label="DW2 fp16 blocks=128x256x64 warps=8 stages=5",
                            constexprs=meta, num_warps=warps, num_stages=stages),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyengine.kernels.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                    help="compute capabilities to compile for (default: 80 90)")
    ap.add_argument("--spec", nargs="+", choices=SPECS, default=["aligned"],
                    help="argument specializations (see above); default aligned")
    ap.add_argument("--modules", nargs="+", choices=MODULES, default=list(MODULES))
    ap.add_argument("--match", default="",
                    help="only configurations whose 'kernel [config]' matches this regex")
    ap.add_argument("--quick", action="store_true",
                    help="a representative subset (LaunchConfig.quick): per kernel and dtype "
                         "the narrowest and the widest tiles, each GEMM call site")
    ap.add_argument("--known-bad", action="store_true",
                    help="compile the known-bad variants instead; exit 0 only if all fail")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.known_bad:
        args.spec = ["aligned"]  # the pipelined variant: the one whose shared memory is too much

    print(f"== Triton {triton.__version__} AOT compile for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} ({', '.join(args.spec)}), no GPU needed",
          flush=True)
    t0 = time.perf_counter()
    log = functools.partial(print, flush=True)
    if args.known_bad:
        configs = known_bad_configs()
    else:
        configs = launch_configs(args.modules)
        if args.quick:
            configs = [c for c in configs if c.quick]
        pat = re.compile(args.match)
        configs = [c for c in configs if pat.search(f"{c.kernel_name} [{c.label}]")]
    results = compile_all(args.arch, args.modules, configs, specs=args.spec, jobs=args.jobs,
                          log=log)
    bad = [r for r in results if not r.ok]
    took = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": round(took, 1),
                       "cpu_seconds": round(sum(r.cpu for r in results), 1),
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    spills = sum(1 for r in results if r.ok and r.stack)
    print(f"== Triton {triton.__version__}: {len(results) - len(bad)}/{len(results)} "
          f"configurations compiled within the shared-memory limit, {len(bad)} failed; "
          f"{took:.0f} s ({sum(r.cpu for r in results):.0f} CPU s in compiles); "
          f"{spills} with a local-memory stack (register spills, slow on the GPU)", flush=True)
    if args.known_bad:
        if results and not any(r.ok for r in results):
            print("== every known-bad variant was rejected: the check can fail")
            return 0
        print("== FAIL: a known-bad variant passed the check")
        return 1
    for r in bad:
        print(f"FAILED: {r.line()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
