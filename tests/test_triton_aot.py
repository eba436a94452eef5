"""GPU compile checks without a GPU (kernels/aot.py): the launch configurations the kernel modules
list are the ones their launchers launch, a representative subset of them compiles to cubins
for sm_80 and sm_90 within the shared-memory limits, and known-bad variants are rejected (the
check can fail). .ci/run compiles every configuration, under two Triton versions.

The compiles run in a subprocess without TRITON_INTERPRET: under the interpreter (conftest sets
it) the kernels are built for the interpreter and cannot be compiled for a GPU."""
import inspect
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")
from pyengine.kernels import aot  # noqa: E402
from pyengine.kernels import importance as KI  # noqa: E402
from pyengine.kernels import masked_ffn as KM  # noqa: E402
from pyengine.kernels import varlen_attention as KV  # noqa: E402


def _run_aot(tmp_path, *args, timeout=1800):
    """python -m pyengine.kernels.aot ARGS without TRITON_INTERPRET: (exit code, log, results)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    p = subprocess.run([sys.executable, "-m", "pyengine.kernels.aot", *args, "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    log = p.stdout + p.stderr
    print(log)  # shown when a test fails
    return p.returncode, log, json.loads(out.read_text())["results"] if out.exists() else None


# ---- the lists are what the launchers launch ---------------------------------------------------
class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.kernel.arg_names
            bound = dict(zip(names, args), **kwargs)
            self.calls.append((self.kernel, bound))
        return launch


def _launch_key(kernel, bound):
    warps, stages = bound.get("num_warps", 4), bound.get("num_stages", 3)
    params = inspect.signature(kernel.fn).parameters  # an InterpretedFunction: no .params
    constexprs = {k: v for k, v in bound.items()
                  if k in params and "constexpr" in str(params[k].annotation)}
    pointers = {k: v.dtype for k, v in bound.items() if isinstance(v, torch.Tensor)}
    return constexprs, pointers, warps, stages


def _bodies(kernel_name, constexprs, pointers, warps, stages):
    """A bucketed launch as its bucket bodies (what _aot_groups covers), else the launch."""
    if "NB" not in constexprs:
        return [(kernel_name, tuple(sorted(constexprs.items())),
                 tuple(sorted(pointers.items(), key=str)), warps, stages)]
    common = {k: v for k, v in constexprs.items() if not k.startswith(("BDQ", "BDV", "NB"))}
    return [(kernel_name, tuple(sorted(common.items())), (constexprs[f"BDQ{i}"],
             constexprs[f"BDV{i}"]), tuple(sorted(pointers.items(), key=str)), warps, stages)
            for i in range(constexprs["NB"])]


@pytest.fixture
def recorded(monkeypatch):
    """(every launch of the three modules' launchers, with the GPU block choices; the listed
    configurations, taken before the kernels are replaced)."""
    configs, calls = aot.launch_configs(), []
    for mod in (KV, KM, KI):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                monkeypatch.setattr(mod, name, _Recorder(obj, calls))
    monkeypatch.setattr(KV, "_blocks", KV._gpu_blocks)  # the GPU's choice, not the interpreter's
    monkeypatch.setattr(KM, "_cfg", lambda M, N, K: KM.GPU_BLOCKS)
    monkeypatch.setattr(KI, "INTERPRET_BLOCK_R", KI.BLOCK_R)
    return calls, configs


def test_launch_configs_cover_every_launch(recorded):
    recorded, configs = recorded
    # the launchers run (the kernels recorded, not run) over layers and flags that reach
    # every block row, dtype, flag and call site; each launch must be listed for the AOT check
    B, N = 2, 5
    layers = [([7, 40, 64, 16], [64, 9, 33, 16]), ([100, 3], [20, 130]), ([256, 16, 64, 128, 33],
              [8, 200, 64, 128, 64]), ([0, 12], [5, 0])]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for qk, vd in layers:
            q, k = (torch.randn(B, N, sum(qk), dtype=dt) for _ in range(2))
            v = torch.randn(B, N, sum(vd), dtype=dt)
            o, lse = KV.forward(q, k, v, qk, vd, [0.5] * len(qk))
            KV.backward(torch.randn_like(o), q, k, v, o, lse, qk, vd, [0.5] * len(qk))
        x = torch.randn(3, 7, 32, dtype=dt)
        w1, w2 = torch.randn(48, 32, dtype=dt), torch.randn(24, 48, dtype=dt)
        keep = torch.tensor([0, 3, 5, 9, 40], dtype=torch.int32)
        for bias in (False, True):
            for gate in (None, torch.rand(48, dtype=dt)):
                for act in KM.ACTS:
                    b1 = torch.randn(48, dtype=dt) if bias else None
                    b2 = torch.randn(24, dtype=dt) if bias else None
                    y, z, h = KM.forward(x, w1, b1, w2, b2, keep, gate, act)
                    KM.backward(torch.randn_like(y), x, w1, w2, keep, gate, z, h, act, bias, bias)
        # weights stored transposed: the gathered B of fc2 and dx flips between k/n-major
        w1t, w2t = w1.t().contiguous().t(), w2.t().contiguous().t()
        y, z, h = KM.forward(x, w1t, None, w2t, None, keep, None, "gelu")
        KM.backward(torch.randn_like(y), x, w1t, w2t, keep, None, z, h, "gelu", False, False)
    xs = [torch.randn(4, 8, dtype=d) for d in KI._DTYPES]
    KI.importance_reduce_many(xs, [None] * len(xs))
    for gd in KI._DTYPES:
        KI.importance_reduce_many(xs, [torch.randn(4, 8, dtype=gd) for _ in xs])

    listed = set()
    for c in configs:
        listed.update(_bodies(c.kernel_name, c.constexprs, c.pointers, c.num_warps, c.num_stages))
    seen = Counter()
    for kernel, bound in recorded:
        name = aot.LaunchConfig(kernel, "", {}, {}).kernel_name  # noqa: the real kernel's
        for body in _bodies(name, *_launch_key(kernel, bound)):
            assert body in listed, f"launched but not in launch_configs(): {body}"
            seen[name] += 1
    # every kernel was launched, with each gather flip of the GEMM
    assert set(seen) == {c.kernel_name for c in configs}
    kmajor = {bound["B_KMAJOR"] for k, bound in recorded if bound.get("B_GATHER_K")}
    assert kmajor == {False, True}


def test_gemm_unit_strides_are_those_of_contiguous_tensors(recorded):
    recorded, configs = recorded
    # aligned compiles fix these stride arguments to 1 (the JIT's specialization of ints == 1)
    x = torch.randn(3, 7, 32)
    w1, w2 = torch.randn(48, 32), torch.randn(24, 48)
    keep = torch.tensor([0, 3, 5, 9, 40], dtype=torch.int32)
    y, z, h = KM.forward(x, w1, torch.randn(48), w2, None, keep, torch.rand(48), "relu")
    KM.backward(torch.randn_like(y), x, w1, w2, keep, torch.rand(48), z, h, "relu", True, False)
    strides = {"sam", "sak", "sbk", "sbn", "scm", "scn", "szm", "szn"}
    assert len(recorded) == 6
    for kernel, bound in recorded:
        constexprs, pointers, warps, stages = _launch_key(kernel, bound)
        (cfg,) = [c for c in configs if c.kernel is kernel and c.constexprs == constexprs
                  and c.pointers == pointers]
        assert {k for k in strides if bound[k] == 1} == cfg.unit, cfg.label


def test_labels_are_unique_and_every_bucket_row_is_covered():
    configs = aot.launch_configs()
    keys = Counter((c.kernel_name, c.label) for c in configs)
    assert max(keys.values()) == 1
    # every width pair under every block row a launch can give it, per dtype (see _aot_groups)
    for kernel, backward in (("_fwd_kernel", False), ("_bwd_dkdv_kernel", True),
                             ("_bwd_dq_kernel", True)):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            got = set()
            for c in configs:
                if c.kernel_name.endswith(kernel) and c.pointers["q_ptr"] == dt:
                    m = c.constexprs
                    got |= {(m["BLOCK_M"], m["BLOCK_N"], m[f"BDQ{i}"], m[f"BDV{i}"])
                            for i in range(m["NB"])}
            want = {(cfg[0], cfg[1], a, b) for bound, cfg in KV._table(dt, backward)
                    for a in KV.WIDTHS for b in KV.WIDTHS if max(a, b) <= bound}
            assert got == want, (kernel, dt)
    nb = {c.constexprs["NB"] for c in configs if "NB" in c.constexprs}
    assert nb == {1, 2, 3, 4}


def test_heads_wider_than_the_compiled_tiles_are_refused():
    q = torch.randn(1, 3, 300)
    with pytest.raises(ValueError, match="head dims up to 256"):
        KV.forward(q, q, q, [300], [300], [0.1])
    assert KV.buckets([300], [0]) == {}  # no value dims: no launch, nothing to refuse


# ---- compiled for sm_80 and sm_90 --------------------------------------------------------------
def test_quick_subset_compiles_for_sm80_and_sm90(tmp_path):
    rc, log, results = _run_aot(tmp_path, "--quick", "--arch", "80", "90")
    assert results is not None, log
    failed = [r for r in results if not r["ok"]]
    assert rc == 0 and not failed, failed
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["kernel"] for r in results} == {c.kernel_name for c in aot.launch_configs()}
    assert all(r["shared"] <= aot.SHARED_LIMIT[r["arch"]] for r in results)


def test_known_bad_variants_are_rejected(tmp_path):
    rc, log, results = _run_aot(tmp_path, "--known-bad", "--arch", "80", "90")
    assert rc == 0, log
    assert len(results) == 4 and not any(r["ok"] for r in results)
    for r in results:
        if "_dot8_kernel" in r["kernel"]:  # rejected by the compiler
            assert r["error"].startswith("CompilationError") and r["shared"] is None
        else:  # compiles, but does not fit
            assert "shared memory" in r["error"] and r["shared"] > aot.SHARED_LIMIT[r["arch"]]


def test_shared_memory_of_a_mixed_launch_is_its_widest_bucket(tmp_path):
    # _aot_groups compiles a covering set of bucket combinations, not all of them: it relies on
    # the buckets' branches not holding shared memory at the same time
    rc, log, results = _run_aot(
        tmp_path, "--arch", "90", "--modules", "varlen_attention", "--match",
        r"_fwd_kernel \[fp16 BLOCK_M=128 BLOCK_N=64 buckets=(64x64|64x32|64x64,64x32) ")
    assert rc == 0, log
    shared = {r["config"].split("buckets=")[1].split()[0]: r["shared"] for r in results}
    assert len(shared) == 3
    assert shared["64x64,64x32"] == max(shared["64x64"], shared["64x32"])
