#!/usr/bin/env bash
# One-command check of a machine with one NVIDIA GPU: the suite's CUDA tests, head parity on CUDA
# (fp32 and bf16 against the fp64 CPU reference), the head step against the reference design at
# 2,059,906 classes, bench_train for r50 and r100 (bf16, channels-last), the fallback loader's
# decode throughput and a host-sync report. Needs PyTorch with CUDA and this repository's
# requirements; no network, no DALI, no DeepSpeed. Not part of CI.
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu_check_<UTC time>), plus each
# step's JSON and log under DIR/steps/. Every step runs in its own process with a time limit, and
# the whole script stays under 8 minutes (GPU_CHECK_BUDGET_S, default 470 s): a step that would
# start with too little time left is recorded as not run. --dry-run runs every step at toy size on
# the CPU (tests/integration/test_gpu_check.py), to know the script works before a GPU is at hand.
# The interpreter is $PYTHON, else python3 from PATH; it must import torch.
# Exit status: 0 when every step passed (or only reports figures), 1 otherwise, 2 bad arguments or
# no torch.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="" dry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --dry-run) dry="--dry-run"; shift ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || out="$root/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out/steps" || exit 2
out="$(cd "$out" && pwd)"
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# The interpreter with torch: $PYTHON, else python3 (a bare GPU machine may have no `python`).
python="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $python cannot import torch; set PYTHON=/path/to/python" >&2
  exit 2
fi
budget="${GPU_CHECK_BUDGET_S:-470}"
started="$(date +%s)"

# step name and its own limit in seconds (the sum is what a slow machine could need; the budget
# above cuts it)
steps=(tests:120 parity:45 head:90 train_r50:75 train_r100:75 loader:60 syncs:60)
for entry in "${steps[@]}"; do
  name="${entry%%:*}" limit="${entry##*:}"
  left=$(( budget - ($(date +%s) - started) - 10 ))  # 10 s kept for the summary
  if [ "$left" -lt 15 ]; then
    echo "[gpu_check] $name: not run, the time budget is spent" | tee "$out/steps/$name.log"
    echo "not run" > "$out/steps/$name.rc"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "[gpu_check] $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$python" benchmarks/gpu_check.py step "$name" --out "$out" $dry \
    > "$out/steps/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$out/steps/$name.rc"
  tail -n 1 "$out/steps/$name.log"
done
"$python" benchmarks/gpu_check.py summary --out "$out" --started "$started" $dry || exit 1
grep -q '"overall": "pass"' "$out/gpu_check.json"
