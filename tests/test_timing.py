"""The one timing harness (pyengine.measure.timing): statistics against numpy, ratios with their
paired spread, the interleaving order, the sample primitive, the environment record, and a guard
that no second timing loop, IQR or environment function creeps back into pyengine or bench/."""
import json
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyengine.measure import timing as T

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------- statistics
def test_quantile_and_iqr_on_known_samples():
    x = [4.0, 1.0, 3.0, 2.0]                      # sorted 1 2 3 4
    assert T.quantile(x, 0.25) == pytest.approx(1.75)
    assert T.quantile(x, 0.5) == pytest.approx(2.5)
    assert T.quantile(x, 0.75) == pytest.approx(3.25)
    assert T.quantile(x, 0.0) == 1.0 and T.quantile(x, 1.0) == 4.0
    assert T.iqr(x) == pytest.approx(1.5)
    assert T.iqr([7.0]) == 0.0
    s = T.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s == {"median_ms": 3.0, "iqr_ms": 2.0, "min_ms": 1.0, "mean_ms": 22.0, "repeats": 5}
    with pytest.raises(ValueError):
        T.quantile([], 0.5)
    with pytest.raises(ValueError):
        T.quantile([1.0], 1.5)
    with pytest.raises(ValueError):
        T.summarize([])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 50, 101])
def test_summarize_matches_numpy_and_statistics_inclusive(n):
    g = torch.Generator().manual_seed(n)
    t = (torch.rand(n, generator=g, dtype=torch.float64) * 10).tolist()
    s = T.summarize(t)
    q1, q3 = np.percentile(t, [25, 75])             # numpy's default: linear interpolation
    assert s["iqr_ms"] == pytest.approx(q3 - q1, abs=1e-12)
    if n >= 2:
        sq = statistics.quantiles(t, n=4, method="inclusive")
        assert s["iqr_ms"] == pytest.approx(sq[2] - sq[0], abs=1e-12)
    assert s["median_ms"] == pytest.approx(float(np.median(t)))
    assert s["mean_ms"] == pytest.approx(float(np.mean(t)))
    assert s["min_ms"] == min(t) and s["repeats"] == n


def test_one_definition_everywhere():
    # pyengine bench, the demo (measure/compare) and profile share the harness's statistics
    from pyengine.measure import bench as B
    from pyengine.measure import roofline as R
    assert B.summarize is T.summarize and R.summarize is T.summarize
    assert B.environment is T.environment and R.environment is T.environment
    s = T.Samples({"a": [1.0, 2.0, 3.0, 4.0, 10.0]})
    assert s.stats()["a"] == {**T.summarize([1.0, 2.0, 3.0, 4.0, 10.0]), "inner": 1}


def test_ratio_and_its_paired_spread():
    r = T.ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r == {"ratio": 2.0, "median": 2.0, "p25": 2.0, "p75": 2.0, "iqr": 0.0, "pairs": 3}
    a, b = [10.0, 12.0, 14.0, 16.0], [5.0, 4.0, 7.0, 8.0]   # paired ratios 2, 3, 2, 2
    r = T.ratio(a, b)
    assert r["ratio"] == pytest.approx(13.0 / 6.0)            # median(a) / median(b)
    pr = [x / y for x, y in zip(a, b)]
    q1, q3 = np.percentile(pr, [25, 75])
    assert r["median"] == pytest.approx(float(np.median(pr)))
    assert (r["p25"], r["p75"]) == (pytest.approx(q1), pytest.approx(q3))
    assert r["iqr"] == pytest.approx(q3 - q1) and r["pairs"] == 4
    s = T.Samples({"dense": a, "compact": b})
    assert s.ratio("dense", "compact") == r
    for bad in (([1.0], [1.0, 2.0]), ([], []), ([1.0], [0.0])):
        with pytest.raises(ValueError):
            T.ratio(*bad)


# ---------------------------------------------------------------------------- sampling
def test_sample_times_the_calls_not_the_preparation():
    calls = []
    ms = T.sample(lambda: (calls.append(1), time.sleep(0.002)), CPU, inner=3,
                  prepare=lambda: time.sleep(0.05))
    assert len(calls) == 3
    assert 2.0 <= ms < 40.0          # per call, the 50 ms preparation outside the timed span
    with pytest.raises(ValueError):
        T.sample(lambda: None, CPU, inner=0)
    c = T.Clock(None)
    a = c.mark()
    time.sleep(0.003)
    assert not c.cuda and c.elapsed_ms(a, c.mark()) >= 3.0


def _recorder():
    order = []
    return order, {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}


def test_measure_interleaves_round_robin():
    order, fns = _recorder()
    done = []
    s = T.measure(fns, warmup=2, repeats=3, device=CPU, progress=done.append)
    warm, calib, samples = order[:6], order[6:9], order[9:]
    assert warm == ["a", "b", "c"] * 2 and calib == ["a", "b", "c"]
    assert samples == ["a", "b", "c"] * 3                   # default: one sample each in turn
    assert done == [1, 2, 3]
    assert {k: len(v) for k, v in s.times_ms.items()} == {"a": 3, "b": 3, "c": 3}
    assert s.inner == {"a": 1, "b": 1, "c": 1}
    # rounds: a block of samples of each variant per pass
    order, fns = _recorder()
    done = []
    T.measure({k: fns[k] for k in "ab"}, warmup=0, repeats=5, device=CPU, rounds=2,
              progress=done.append)
    assert order[2:] == list("aaabbb") + list("aabb") and done == [3, 5]
    st = T.compare({k: fns[k] for k in "ab"}, warmup=0, repeats=2, device=CPU, rounds=9)
    assert st["a"]["repeats"] == st["b"]["repeats"] == 2


def test_measure_min_sample_ms_sets_inner_and_stats():
    def slow():
        time.sleep(0.004)

    def fast():
        time.sleep(0.001)
    st = T.compare({"slow": slow, "fast": fast}, warmup=1, repeats=4, device="cpu")
    assert st["slow"]["min_ms"] >= 4.0 and st["fast"]["min_ms"] >= 1.0
    assert st["slow"]["median_ms"] > st["fast"]["median_ms"]
    assert set(st["slow"]) == {"median_ms", "iqr_ms", "min_ms", "mean_ms", "repeats", "inner"}
    st = T.compare({"fast": fast}, warmup=0, repeats=2, device="cpu", min_sample_ms=5.0)
    assert st["fast"]["inner"] >= 2 and st["fast"]["median_ms"] >= 1.0
    st = T.compare({"fast": fast}, warmup=0, repeats=1, device="cpu", inner=3)
    assert st["fast"]["inner"] == 3


def test_measure_grad_mode_and_errors():
    seen = []
    T.measure({"f": lambda: seen.append(torch.is_inference_mode_enabled())}, 1, 1)
    assert seen == [True] * 3
    seen.clear()
    T.measure({"f": lambda: seen.append(torch.is_grad_enabled())}, 1, 1, inference=False)
    assert seen == [True] * 3
    f = {"f": lambda: None}
    for kw in ({"repeats": 0}, {"warmup": -1}, {"inner": 0}, {"rounds": 0}):
        with pytest.raises(ValueError):
            T.measure(f, **kw)
    with pytest.raises(ValueError, match="nothing"):
        T.measure({})
    # the CUDA-graph path needs a GPU: on the CPU it refuses clearly, before calling anything
    calls = []
    with pytest.raises(ValueError, match="CUDA graphs"):
        T.measure({"f": lambda: calls.append(1)}, device="cpu", graphs=True)
    assert calls == []
    # flush_l2 is a CUDA-only option: the CPU path ignores it
    assert T.compare(f, 0, 1, "cpu", flush_l2=True)["f"]["repeats"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_graph_refuses_without_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        T.cuda_graph(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_and_graphs():
    dev = torch.device("cuda")
    a = torch.randn(1024, 1024, device=dev)
    b = torch.randn(1024, 1024, device=dev)
    out = torch.empty(1024, 1024, device=dev)
    s = T.measure({"mm": lambda: torch.mm(a, b, out=out), "add": lambda: out.add_(1.0)},
                  warmup=3, repeats=10, device=dev, graphs=True, flush_l2=True)
    st = s.stats()
    assert st["mm"]["median_ms"] > 0 and st["add"]["median_ms"] > 0
    assert s.ratio("mm", "add")["pairs"] == 10
    st = T.compare({"mm": lambda: a @ b}, 2, 5, dev, min_sample_ms=1.0)
    assert st["mm"]["inner"] >= 1 and st["mm"]["min_ms"] > 0
    c = T.Clock(dev)
    e0 = c.mark()
    a @ b
    e1 = c.mark()
    c.sync()
    assert c.elapsed_ms(e0, e1) > 0
    env = T.environment(dev)
    assert env["gpu"] == torch.cuda.get_device_name(dev) and env["cuda"] == torch.version.cuda


# ---------------------------------------------------------------------------- environment
def test_environment_record(monkeypatch):
    env = T.environment("cpu")
    for k in ("device", "gpu", "driver", "python", "platform", "torch", "cuda", "triton", "timm",
              "torch_pruning", "pyengine", "extension", "cpu", "cpu_count", "threads"):
        assert k in env, k
    assert env["device"] == "cpu" and env["gpu"] is None and env["driver"] is None
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["python"] == platform.python_version()
    assert env["threads"] == torch.get_num_threads() and env["cpu"]
    import timm
    assert env["timm"] == timm.__version__
    json.dumps(env)                                   # a plain JSON record
    # no host name anywhere
    assert not {"host", "hostname", "node"} & set(env)
    assert platform.node() not in {v for v in env.values() if isinstance(v, str)}
    # torch-pruning: its version, or None where it is missing
    monkeypatch.setattr("pyengine.measure.baselines.torch_pruning_available",
                        lambda: (False, "not installed (test)"))
    assert T.environment("cpu")["torch_pruning"] is None
    default = T.environment()
    assert default["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- one harness
GUARDED = {
    r"cuda\.Event\(": "CUDA events",
    r"\bquantiles?\(": "quantiles",
    r"do_bench\(": "triton.testing.do_bench",
    r"def _env\(|def environment\(|def _device_line\(": "an environment record",
    r"platform\.python_version\(\)": "an environment record",
}


def test_no_second_harness_in_pyengine_or_bench():
    """Timing loops, IQRs and environment records live in pyengine/measure/timing.py only."""
    files = sorted((ROOT / "pyengine").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    allowed = {ROOT / "pyengine" / "measure" / "timing.py"}
    found = []
    for f in files:
        if f in allowed:
            continue
        text = f.read_text()
        for pat, what in GUARDED.items():
            for m in re.finditer(pat, text):
                found.append(f"{f.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: "
                             f"{what}")
    assert found == [], "\n".join(found)
