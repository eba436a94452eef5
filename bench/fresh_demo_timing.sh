#!/usr/bin/env bash
# Wall-clock of the README's demo command as a new user meets it: a fresh clone in a fresh venv
# (no pip cache of ours), then a second `pip install -e .` with unchanged sources.
#   bash bench/fresh_demo_timing.sh OUT_DIR
# Writes OUT_DIR/fresh_demo_timing.log (everything printed, with phase times) and
# OUT_DIR/fresh_demo_timing.json (the phase times, machine, versions).
set -euo pipefail
out=$(realpath -m "${1:?usage: bash bench/fresh_demo_timing.sh OUT_DIR}")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
log="$out/fresh_demo_timing.log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$log") 2>&1

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -srm), $(nproc) cores, $(python3 --version)"
echo "== commit $(git -C "$repo" rev-parse HEAD)"
git clone -q "$repo" "$work/pyengine"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
cd "$work/pyengine"
export PIP_NO_CACHE_DIR=1  # a new user's pip has nothing cached
export PYENGINE_CACHE="$work/cache"  # nor a latency table of this CPU (compile measures one)

# the README's demo command, split at its && so each phase is timed
t0=$SECONDS
pip install -q "torch>=2.14" "torchvision>=0.29" setuptools wheel ninja pybind11
t1=$SECONDS
pip install -q --no-build-isolation -e .
t2=$SECONDS
pyengine demo
t3=$SECONDS
# a second install with unchanged sources (the persistent build folder: only a relink)
pip install -q --no-build-isolation -e .
t4=$SECONDS

python - "$out/fresh_demo_timing.json" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) $((t4 - t3)) <<'PY'
import json, os, platform, sys, torch
path, deps, build, demo, again = sys.argv[1], *map(int, sys.argv[2:])
doc = {"readme_demo_command_s": deps + build + demo, "install_dependencies_s": deps,
       "install_pyengine_s": build, "demo_s": demo, "second_install_s": again,
       "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
       "torch": torch.__version__}
json.dump(doc, open(path, "w"), indent=1)
print(json.dumps(doc, indent=1))
PY
echo "== README demo command: $((t3 - t0)) s (dependencies $((t1 - t0)) s, pyengine build $((t2 - t1)) s, demo $((t3 - t2)) s); second pip install -e .: $((t4 - t3)) s"
