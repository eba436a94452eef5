"""bench/gpu_all.sh, the one GPU command: its CPU dry run runs the stages it is asked for,
records each stage's exit status and time, and writes summary.json (the stages' own CPU dry
runs are tested in test_bench.py and test_bench_scripts.py)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_dry_run_records_every_stage(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh"), "--dry-run", "--out",
                        str(out), "--stages", "build,wheels,csrc"],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert doc["dry_run"] is True and set(doc["stages"]) == {"build", "wheels", "csrc"}
    assert doc["stages"]["build"]["exit"] == 0
    # the CUDA kernels' check needs a GPU: recorded as such, not as a failure
    assert doc["stages"]["csrc"]["why"] == "needs-gpu"
    assert "device line:" in (out / "env.log").read_text()
    for stage in ("build", "wheels", "csrc"):
        assert (out / f"{stage}.log").is_file()
    assert "env.log" in doc["files"] and "build.log" in doc["files"]


def test_unknown_argument_is_refused(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh"), "--nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument --nope" in r.stderr
