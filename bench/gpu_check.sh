#!/usr/bin/env bash
# The GPU checks of issue 16 in one run, inside one command on a lent GPU machine (BUDGET seconds, default 540):
#   1. the CUDA and Triton tests (tests/test_graphs.py, tests/test_triton.py, tests/test_anytime.py);
#   2. bench/anytime.py at batch 256 with CUDA graphs, RUNS times (the wall / timestep ratio, target >= 0.85),
#      then once with eager steps (--graphs off) for comparison, then once on a long stream (--stream-passes LONG);
#   3. bench/latency.py (per-decision p50 / p99, one stream and continuous batching), before the eager comparison;
#   4. bench/lif_inference.py (the streaming LIF step on the GPU);
#   5. bench/exit_diag.py (decisions against simulate, time per early-exit call against one multi-step forward).
# Every part has its own time limit, cut to what is left of BUDGET, and the script goes on after a failure (a part
# that no longer fits is skipped and says so in summary.txt); the outputs land in OUT_DIR as
# at most 8 files (summary.txt, which starts with the machine, tests.txt, anytime.txt, anytime.json, latency.txt,
# latency.json, lif.txt, diag.txt).
#
#   bash bench/gpu_check.sh DATA_DIR RUN_DIR OUT_DIR        # DATA_DIR holds nmnist-small.tar.gz
#
# The run folder must be a trained N-MNIST run (runs/bench-nmnist: bench/anytime.py trains it on the CPU in
# ~1.5 min); it is copied, so the calibrations the benchmark writes stay out of the original. DEVICE=cpu runs
# the same script on the CPU (how it is checked without a GPU). RUNS (default 3), REPEATS (default 3)
# and LONG (the long stream's passes over the test split, default 40) size it.
# From a session with the device tool (the data folder beside the checkout does not travel, so copy it in):
#   mkdir -p .gpu-data && cp ../shared/data/nmnist-small.tar.gz .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
#   run(command="bash bench/gpu_check.sh .gpu-data runs/bench-nmnist $OUT", carry=[".gpu-data", "runs/bench-nmnist"],
#       timeout_s=600)
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(cd "${1:-$HERE/../shared/data}" && pwd) || { echo "gpu_check: data folder ${1:-../shared/data} not found" >&2; exit 2; }
RUN_SRC=${2:-$HERE/runs/bench-nmnist}
OUT_DIR=${3:-${OUT:-$HERE/gpu-check-out}}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-3}
REPEATS=${REPEATS:-3}
LONG=${LONG:-40}
PY=${PY:-python3}
BUDGET=${BUDGET:-540}
[ -f "$DATA/nmnist-small.tar.gz" ] || { echo "gpu_check: $DATA/nmnist-small.tar.gz not found" >&2; exit 2; }
[ -f "$RUN_SRC/checkpoint.pt" ] || { echo "gpu_check: no trained run at $RUN_SRC (checkpoint.pt missing)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
RUN=$(mktemp -d)/run
cp -r "$RUN_SRC" "$RUN"
cd "$HERE"
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} FEWSTEP_SHARED_DATA=$DATA PYTHONUNBUFFERED=1
SUMMARY=$OUT_DIR/summary.txt
step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a limit, append to the log, note the status in the summary
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$SUMMARY"
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo " (stopped at its ${limit} s limit)")" \
        | tee -a "$SUMMARY"
    return $rc
}

{ date -u; $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } >"$SUMMARY" 2>&1

step tests 150 "$OUT_DIR/tests.txt" $PY -m pytest -q -ra -p no:cacheprovider tests/test_graphs.py tests/test_triton.py tests/test_anytime.py

echo "[" >"$OUT_DIR/anytime.json"
sep=""
for i in $(seq 1 "$RUNS"); do
    if step "anytime graphs=auto #$i" 150 "$OUT_DIR/anytime.txt" $PY bench/anytime.py --run "$RUN" --data "$DATA" \
            --device "$DEVICE" --batch-size 256 --repeats "$REPEATS"; then
        { printf '%s' "$sep"; cat "$RUN/bench_anytime.json"; } >>"$OUT_DIR/anytime.json"; sep=","
    fi
done
step latency 120 "$OUT_DIR/latency.txt" $PY bench/latency.py --run "$RUN" --data "$DATA" --device "$DEVICE" \
    --streams 1,64,256 --rounds 3 && cp "$RUN/bench_latency.json" "$OUT_DIR/latency.json"
if step "anytime graphs=off" 150 "$OUT_DIR/anytime.txt" $PY bench/anytime.py --run "$RUN" --data "$DATA" \
        --device "$DEVICE" --batch-size 256 --repeats "$REPEATS" --graphs off; then
    { printf '%s' "$sep"; cat "$RUN/bench_anytime.json"; } >>"$OUT_DIR/anytime.json"; sep=","
fi
# a stream that does not run dry: the test split played LONG times (continuous batching keeps the batch full, so
# the tail, where the slowest samples step alone, weighs little)
if step "anytime long stream" 150 "$OUT_DIR/anytime.txt" $PY bench/anytime.py --run "$RUN" --data "$DATA" \
        --device "$DEVICE" --batch-size 256 --repeats "$REPEATS" --stream-passes "$LONG"; then
    { printf '%s' "$sep"; cat "$RUN/bench_anytime.json"; } >>"$OUT_DIR/anytime.json"
fi
echo "]" >>"$OUT_DIR/anytime.json"

step lif_inference 60 "$OUT_DIR/lif.txt" $PY bench/lif_inference.py --device "$DEVICE" --batches 1,64,256
step exit_diag 60 "$OUT_DIR/diag.txt" $PY bench/exit_diag.py --run "$RUN" --data "$DATA" --device "$DEVICE"

# the ratios of every anytime run, one line each (the figures issue 16 asks for)
$PY - "$OUT_DIR/anytime.json" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import json, sys
print("wall / timestep ratio per policy: continuous batching, per batch, on the K-times stream")
for r in json.load(open(sys.argv[1])):
    cell = lambda x, k: f"{x[k]:.2f}" if k in x else "-"  # noqa: E731
    K = r["rows"][0].get("stream_passes", 1)
    print(f"{r['device']}, batch {r['batch_size']}, graphs={r['graphs']}, K = {K}: " + "; ".join(
        f"{x['policy']} {cell(x, 'ratio_continuous')} / {cell(x, 'ratio_per_batch')} / {cell(x, 'ratio_stream')}"
        f"{'' if x['matches_simulation'] else ' (%s DECISIONS DIFFER FROM simulate)' % x.get('differ_from_simulation', 'some')}"
        for x in r["rows"]))
EOF
