#!/usr/bin/env bash
# Every GPU measurement of issues 8 and 23 in one run on a lent machine, each step's result written under
# "$OUT" as soon as the step ends, so a timeout loses only the step it cut short.
#
#   bash benchmarks/device_suite.sh            # on the GPU machine (device tool, carry [".whl"]; the
#                                              # sweep workdirs/science too, if carried, for the latency)
#   bash benchmarks/device_suite.sh --tiny     # the same chain at CPU size (64 px, batch 8, 1-2 steps,
#                                              # one student), OUT defaults to a temporary folder
#
# Steps, in priority order (the whole suite stays within SUITE_BUDGET_S, 470 s by default: a step gets at
# most its own limit and what is left of the budget, and a step with under 20 s left is skipped):
#   1. the wheels of ../shared/DEVICE.md (ml-collections, grain, tensorflow-datasets) from .whl/, when the
#      imports fail;
#   2. the teacher forward ceiling (VGG16, 227 px, bf16 and fp32, batch 64 and 256);
#   3. distillation steps at 227 px, KD + SSWA with a live teacher (kd_sswa) and a cached one
#      (kd_sswa_cached), one process per (precision, batch, student): student x8 at every precision and
#      batch first, then x4 and x2;
#   4. the data pipeline at VOC resolution (apjax.data.benchmark --voc, original-resolution cache):
#      host-fed against device-resident batches (config.data.on_device), augmentation; then the cached
#      KD + SSWA step (x8, bf16, batch 256) fed from the host and from the devices (step_resident);
#   5. localisation (run, method, pair)/s (benchmarks/localization_benchmark.py, results under $OUT);
#   6. deployment latency (benchmarks/latency.py) of LATENCY_SWEEP (default workdirs/science when it is
#      there, else the tiny teacher and its copy trained by step 5, a note saying so).
# suite.tsv lists each step's exit code and seconds (124: its timeout; "skipped": no budget left).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
for a in "$@"; do
  case "$a" in
    --tiny) TINY=1 ;;
    *) echo "usage: bash benchmarks/device_suite.sh [--tiny]" >&2; exit 2 ;;
  esac
done
if [ -z "${OUT:-}" ]; then
  if [ "$TINY" = 1 ]; then OUT=$(mktemp -d /tmp/apjax_device_suite.XXXXXX); else OUT=$PWD/device_suite_out; fi
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && [ "$TINY" = 1 ] && PY=.venv/bin/python
WORK=$(mktemp -d /tmp/apjax_device_work.XXXXXX)
export JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache  # the teacher forward compiles once across the processes
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1

if [ "$TINY" = 1 ]; then
  BUDGET=${SUITE_BUDGET_S:-900}
  STEP=(--cpu-small --image-size 64 --precisions fp32 --steps 2 --warmup 1 --sources random)
  FWD=(--batch-sizes 8)
  GRID=("fp32 8 x8")
  DATA=(--voc --cache_size 0 --image_size 64 --count 16 --batch_size 8)
  RES=(--cpu-small --image-size 64 --precisions fp32 --steps 2 --warmup 1 --batch-sizes 8 --students x8)
  LAT=(--tiny)
else
  BUDGET=${SUITE_BUDGET_S:-470}
  STEP=(--image-size 227 --steps 10 --warmup 2 --sources random)
  FWD=(--precisions bf16,fp32 --batch-sizes 64,256)
  GRID=("bf16 64 x8" "fp32 64 x8" "bf16 256 x8" "fp32 256 x8"
        "bf16 64 x4" "bf16 64 x2" "fp32 64 x4" "fp32 64 x2"
        "bf16 256 x4" "bf16 256 x2" "fp32 256 x4" "fp32 256 x2")
  DATA=(--voc --cache_size 0 --image_size 227 --count 256 --batch_size 64)
  RES=(--image-size 227 --steps 10 --warmup 2 --precisions bf16 --batch-sizes 256 --students x8)
  LAT=(--calls 50 --batch-calls 10 --batch-size 64)
fi
DEADLINE=$(( $(date +%s) + BUDGET ))
printf 'step\trc\tseconds\n' > "$OUT/suite.tsv"
{
  echo "apjax device suite, $(date -u +%FT%TZ), tiny=$TINY, budget ${BUDGET}s, $(uname -a)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
  echo "JAX_COMPILATION_CACHE_DIR is shared by the steps: a later process may load a program an earlier one"
  echo "compiled, so the step benchmark's compile_s is a cache load there (the teacher forward, mostly)"
} > "$OUT/suite.txt"

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout, output to $OUT/NAME.log, a line in suite.tsv.
step() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/suite.tsv"
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/suite.tsv"
  [ "$rc" = 0 ] || { echo "   exit $rc; the end of $OUT/$name.log:"; tail -5 "$OUT/$name.log"; }
}

# 1. wheels
if ! "$PY" -c "import ml_collections, grain, tensorflow_datasets" 2>/dev/null; then
  if [ -d .whl ]; then
    step install_wheels 60 "$PY" -m pip install -q --no-index --find-links .whl ml-collections grain \
      tensorflow-datasets
  else
    echo "== some of ml_collections, grain, tensorflow_datasets missing and no .whl/ to install them from" \
      "(../shared/tools/device-wheels.sh); going on"
  fi
fi

# 2. the teacher forward ceiling
step step_forward 120 "$PY" -m benchmarks.step_benchmark "${STEP[@]}" "${FWD[@]}" --cases teacher_forward \
  --out "$OUT/step_forward.json"

# 3. distillation steps, live and cached teacher
for g in "${GRID[@]}"; do
  read -r prec batch student <<< "$g"
  step "step_${prec}_b${batch}_${student}" 90 "$PY" -m benchmarks.step_benchmark "${STEP[@]}" \
    --precisions "$prec" --batch-sizes "$batch" --students "$student" --cases kd_sswa,kd_sswa_cached \
    --out "$OUT/step_${prec}_b${batch}_${student}.json"
  # the VOC data, localisation and latency steps keep a share of the budget (the rest of the grid
  # comes after them)
  [ "$TINY" = 0 ] && [ "$g" = "fp32 256 x8" ] && break
done

# 4. the data pipeline at VOC resolution, then the cached step fed from the host and from the devices'
#    copy of the training split (config.data.on_device)
step data_voc 60 "$PY" -m apjax.data.benchmark "${DATA[@]}" --out "$OUT/data_voc.json"
step step_resident 90 "$PY" -m benchmarks.step_benchmark "${RES[@]}" --cases kd_sswa_cached \
  --sources random,pipeline,resident --loc-images 8 --out "$OUT/step_resident.json"

# 5. localisation pairs/s (its tiny runs in $WORK/loc, its results in $OUT, not in benchmarks/results)
step localization 120 "$PY" -c "
import sys
from pathlib import Path
import benchmarks.localization_benchmark as lb
lb.RESULTS = Path(sys.argv[1])
sys.argv = ['localization_benchmark.py', '--label', 'device_suite', '--root', sys.argv[2]]
lb.main()" "$OUT" "$WORK/loc"

# 6. deployment latency
SWEEP=${LATENCY_SWEEP:-}
if [ -z "$SWEEP" ]; then
  if [ "$TINY" = 0 ] && [ -d workdirs/science ]; then SWEEP=workdirs/science
  else
    SWEEP=$WORK/loc
    echo "latency: the tiny teacher of the localisation step and its copy (not a compressed sweep)" \
      >> "$OUT/suite.txt"
  fi
fi
if [ -d "$SWEEP" ]; then
  step latency 120 "$PY" -m benchmarks.latency --sweep "$SWEEP" "${LAT[@]}" --exports "$WORK/exports" \
    --out "$OUT/latency.json"
else
  printf 'latency\tskipped\t0\n' >> "$OUT/suite.tsv"
  echo "latency: skipped, no sweep at $SWEEP" >> "$OUT/suite.txt"
fi

# 3 (rest). the other students, while budget remains
if [ "$TINY" = 0 ]; then
  for g in "${GRID[@]:4}"; do
    read -r prec batch student <<< "$g"
    step "step_${prec}_b${batch}_${student}" 90 "$PY" -m benchmarks.step_benchmark "${STEP[@]}" \
      --precisions "$prec" --batch-sizes "$batch" --students "$student" --cases kd_sswa,kd_sswa_cached \
      --out "$OUT/step_${prec}_b${batch}_${student}.json"
  done
fi

rm -rf "$WORK"
echo "== done in $(( $(date +%s) - DEADLINE + BUDGET ))s; results in $OUT"
cat "$OUT/suite.tsv"
