#!/usr/bin/env bash
# Every GPU measurement of pyengine in one command, sized for a lent H100/H200 (15 minutes of
# device time in all, start-up included; this script aims at <= 8 minutes):
#
#   bash bench/gpu_all.sh [--out DIR] [--budget-s 480]      # on the GPU machine
#   bash bench/gpu_all.sh --dry-run --out /tmp/gpu-dry        # here, on a CPU: every stage, tiny
#   ... --stages csrc,ops                                     # only these stages
#
# Stages, each with a time limit carved from the budget, each logged, none allowed to stop the
# others (a failed stage is recorded with its exit status and the run goes on):
#   env        the device line: GPU, driver, torch / triton / CUDA / timm versions
#   build      pip install --no-build-isolation --no-deps -e . with FORCE_CUDA=1 for the GPU's
#              own arch only (TORCH_CUDA_ARCH_LIST from the device), ninja with every core
#   wheels     torch-pruning from ./wheels/*.whl when it is not installed (the GPU machine has
#              no internet: `pip download --no-deps torch-pruning -d wheels` beforehand, and
#              carry `wheels`)
#   csrc       bench/gpu_csrc.py: the CUDA C++ kernels vs the torch reference (bf16, fp32),
#              timings vs the Triton and torch backends
#   ops        bench/gpu_ops.py: the Triton kernels vs the reference at bf16/fp16/fp32, varlen
#              attention vs SDPA flash, masked FFN fwd+bwd vs dense, importance vs copy bandwidth
#   e2e        bench/gpu_end_to_end.py: deit_small at 50% MACs vs dense timm, padded heads and
#              Torch-Pruning, batch 1/8/64/256, eager and CUDA graphs, roofline profile
#   hiap       bench/hiap_step_time.py: HiAP training step vs plain training step
#   latency    pyengine latency-table --device cuda (the layout planner's table), when this
#              pyengine has the command
# Everything lands under one folder: DIR/<stage>.log, the stages' JSON and plots, and
# DIR/summary.json (per stage: exit status, seconds, files). Commit DIR under bench/results/gpu/.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=""
BUDGET=480
DRY=0
STAGES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --stages) STAGES=",$2,"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-${OUT_DIR:-bench/results/gpu/$STAMP}}
mkdir -p "$OUT" || { echo "gpu_all.sh: cannot create $OUT" >&2; exit 2; }
START=$SECONDS
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"

left() { echo $(( BUDGET - (SECONDS - START) )); }

# run STAGE LIMIT_S CMD...: log to OUT/STAGE.log, record status and seconds; never abort
run() {
  local stage=$1 limit=$2; shift 2
  if [ -n "$STAGES" ] && [[ "$STAGES" != *",$stage,"* ]]; then
    return
  fi
  local remain; remain=$(left)
  if [ "$remain" -le 10 ]; then
    echo "== $stage: skipped, the budget is spent" | tee -a "$OUT/$stage.log"
    printf '%s\tskipped\t0\n' "$stage" >> "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  echo "== $stage (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$stage.log" 2>&1
  local rc=$?
  local dt=$(( SECONDS - t0 ))
  if [ "$DRY" = 1 ] && [ "$rc" = 2 ] && grep -q "needs a CUDA GPU" "$OUT/$stage.log"; then
    rc=needs-gpu  # a GPU-only stage on a CPU dry run: recorded, not a failure
  fi
  printf '%s\t%s\t%s\n' "$stage" "$rc" "$dt" >> "$SUMMARY"
  echo "   $stage: exit $rc after ${dt}s (log $OUT/$stage.log)"
  tail -n 3 "$OUT/$stage.log" | sed 's/^/   | /'
}

# ---- env: the device line goes first into every log reader's view
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" - <<'PY'
import json, platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
try:
    import timm
    tm = timm.__version__
except ImportError:
    tm = None
d = {"python": platform.python_version(), "torch": torch.__version__,
     "cuda": torch.version.cuda, "triton": tv, "timm": tm,
     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
     "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None}
print("device line:", json.dumps(d))
PY
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

if [ "$DRY" = 1 ]; then
  # the dry run: CPU, tiny shapes, Triton in its interpreter; every stage's code path once
  export TRITON_INTERPRET=1
  TINY='{"depth": 1, "img_size": 32}'
  run build 60 "$PY" -c "import pyengine, pyengine.ops; print(pyengine.ops.describe())"
  run wheels 30 "$PY" -c "import importlib.util as u; print('torch_pruning:', bool(u.find_spec('torch_pruning')))"
  run csrc 60 "$PY" bench/gpu_csrc.py --check-only --small --out "$OUT"
  run ops 240 "$PY" bench/gpu_ops.py --small --warmup 1 --repeats 2 --out "$OUT"
  run e2e 240 "$PY" bench/gpu_end_to_end.py --device cpu --model vit_tiny_patch16_224 \
      --model-kwargs "$TINY" --dtype fp32 --batches 1 --repeats 2 --warmup 1 --rounds 1 \
      --profile-batch 1 --copy-mib 4 --gemm-n 64 --out "$OUT"
  run hiap 120 "$PY" bench/hiap_step_time.py --device cpu --model vit_tiny_patch16_224 \
      --model-kwargs "$TINY" --batch 2 --steps 2 --warmup 1 --out "$OUT"
  if "$PY" -m pyengine.cli latency-table --help >/dev/null 2>&1; then
    run latency 120 "$PY" -m pyengine.cli latency-table --device cpu --out "$OUT/latency_table_cpu.json" --quick
  fi
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_all.sh: no CUDA GPU visible (use --dry-run on a CPU)" >&2
    exit 2
  fi
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  run build 240 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
  if ! "$PY" -c "import torch_pruning" >/dev/null 2>&1 && ls wheels/*.whl >/dev/null 2>&1; then
    run wheels 60 "$PY" -m pip install --no-index --no-deps wheels/*.whl
  fi
  run csrc 90 "$PY" bench/gpu_csrc.py --out "$OUT"
  run ops 120 "$PY" bench/gpu_ops.py --out "$OUT"
  run e2e 200 "$PY" bench/gpu_end_to_end.py --budget-s 180 --out "$OUT"
  run hiap 90 "$PY" bench/hiap_step_time.py --steps 60 --out "$OUT"
  if "$PY" -m pyengine.cli latency-table --help >/dev/null 2>&1; then
    run latency 90 "$PY" -m pyengine.cli latency-table --device cuda --dtype bf16 \
        --out "$OUT/latency_table_cuda_bf16.json"
  fi
fi

# ---- summary.json: per stage exit status, seconds and the files the run wrote
"$PY" - "$OUT" "$SUMMARY" "$(( SECONDS - START ))" "$DRY" <<'PY'
import json, sys
from pathlib import Path
out, tsv, total, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
stages = {}
for line in tsv.read_text().splitlines():
    name, rc, secs = line.split("\t")
    stages[name] = {"exit": int(rc) if rc.isdigit() else None, "skipped": not rc.isdigit(),
                    "why": None if rc.isdigit() else rc, "seconds": int(secs)}
files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
doc = {"format": "pyengine.gpu_all/1", "dry_run": dry, "total_s": total, "stages": stages,
       "files": files}
(out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
failed = [k for k, v in stages.items() if v["exit"] not in (0, None)]
print(f"== gpu_all: {total}s, stages {', '.join(stages)}; failed: {failed or 'none'}; "
      f"wrote {out}/summary.json")
PY
rm -f "$SUMMARY"
