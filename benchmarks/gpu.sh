#!/usr/bin/env bash
# The GPU benchmark set of issue 15, in under 8 minutes on one H200-class GPU:
#   1. the peers pytorch-cka and torch-tract, installed with `pip install --no-deps` so that they keep this torch
#      (offline, e.g. on a machine that reaches no index: from a .whl/ folder of their wheels at the repository root);
#   2. `layerlab demo --device cuda`, timed;
#   3. benchmarks/gpu_set.py: criticality of timm resnet50 at 224 px (54 layers x 3 trials x 2,048 images; naive vs
#      fast, bf16 autocast and channels_last; the suffix-only ceiling), all-pairs CKA of resnet50 at N = 10,000
#      against pytorch-cka, TrAct step overhead of resnet50 and vit_base_patch16_224 at batch 256 against
#      torch-tract. It gets the time the demo left of --budget (default 450 s) and drops rounds that would not fit.
# Each measurement writes a JSON record into --out (default benchmarks/records/gpu-<UTC date-time>); gpu_run.json
# there holds every phase's wall time and the total. gpu_set.py's docstring gives the time estimate.
#
#   bash benchmarks/gpu.sh                          # needs a CUDA GPU
#   bash benchmarks/gpu.sh --smoke --out /tmp/gpu   # the same code paths, tiny, on the CPU (tests/test_gpu_smoke.py)
#
# PYTHON names the interpreter (default: python on PATH, else python3). Without a GPU and without --smoke it
# prints one line and exits 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

USAGE="usage: bash benchmarks/gpu.sh [--smoke] [--out DIR] [--threads N] [--budget SECONDS]"
SMOKE=0
OUT=""
THREADS=""
BUDGET=450
TARGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a folder; $USAGE" >&2; exit 2; }; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        --threads) [ $# -ge 2 ] || { echo "error: --threads needs a number; $USAGE" >&2; exit 2; }; THREADS="$2"; shift ;;
        --budget) [ $# -ge 2 ] || { echo "error: --budget needs seconds; $USAGE" >&2; exit 2; }; BUDGET="$2"; shift ;;
        -h|--help) echo "$USAGE"; exit 0 ;;
        *) echo "error: unknown argument '$1'; $USAGE" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "error: benchmarks/gpu.sh needs PyTorch, and '$PY' cannot import torch; set PYTHON to the interpreter that has it" >&2
    exit 2
fi
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "error: benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False); run with --smoke for the CPU smoke test" >&2
    exit 2
fi
if ! "$PY" -c "import layerlab" >/dev/null 2>&1; then  # not installed: the source tree (its dependencies must be there)
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import layerlab" >/dev/null 2>&1; then
        echo "error: '$PY' cannot import layerlab, installed or from src/; install it first (pip install -e .)" >&2
        exit 2
    fi
fi

MODE=full
[ "$SMOKE" = 1 ] && MODE=smoke
OUT="${OUT:-benchmarks/records/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
now() { local t="${EPOCHREALTIME:-$(date +%s)}"; echo "${t/,/.}"; }  # seconds; a decimal comma made a point
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
START="$(now)"
echo "== benchmarks/gpu.sh ($MODE) -> $OUT; python $("$PY" -c 'import sys; print(sys.executable)')"

# 1. peers
T0="$(now)"
if [ "$MODE" = full ]; then
    if "$PY" -c "import cka, torch_tract" >/dev/null 2>&1; then
        echo "peers: pytorch-cka and torch-tract already importable"
    else
        SRC=()
        [ -d "$ROOT/.whl" ] && SRC=(--no-index --find-links "$ROOT/.whl")
        if "$PY" -m pip install -q --no-deps ${SRC[@]+"${SRC[@]}"} pytorch-cka torch-tract; then
            echo "peers: installed pytorch-cka and torch-tract (--no-deps)"
        else
            echo "warning: pip could not install pytorch-cka and torch-tract (no index reachable and no .whl/ folder" \
                 "with their wheels?); their sides are skipped and the records say why" >&2
        fi
    fi
else
    echo "peers: --smoke installs nothing; a peer that is not importable is skipped and its record says so"
fi
T_PEERS="$(since "$T0")"

# 2. the demo (full mode); --smoke only checks that its command takes --device and --out
T0="$(now)"
DEMO_RC=0
if [ "$MODE" = full ]; then
    echo "== layerlab demo --device cuda --out $OUT/demo"
    "$PY" -m layerlab.cli demo --device cuda --out "$OUT/demo" || DEMO_RC=$?
else
    HELP="$("$PY" -m layerlab.cli demo --help)" || DEMO_RC=$?
    case "$HELP" in *--device*--out*|*--out*--device*) ;; *) echo "error: 'layerlab demo' lacks --device/--out" >&2; DEMO_RC=1 ;; esac
fi
T_DEMO="$(since "$T0")"
echo "demo: ${T_DEMO} s (rc $DEMO_RC)"

# 3. the measurements, with the time left of the budget (full mode)
T0="$(now)"
SET_ARGS=(--out "$OUT")
[ "$MODE" = smoke ] && SET_ARGS+=(--smoke)
[ -n "$THREADS" ] && SET_ARGS+=(--threads "$THREADS")
if [ "$MODE" = full ] && [ "$BUDGET" != 0 ]; then
    SET_ARGS+=(--budget "$(awk -v b="$BUDGET" -v e="$(since "$START")" 'BEGIN { l = b - e; print (l < 60 ? 60 : l) }')")
fi
SET_RC=0
"$PY" benchmarks/gpu_set.py "${SET_ARGS[@]}" || SET_RC=$?
T_SET="$(since "$T0")"
T_TOTAL="$(since "$START")"

[ "$MODE" = smoke ] && BUDGET=0  # --smoke runs without a budget
MODE="$MODE" TARGET="$TARGET" BUDGET="$BUDGET" T_PEERS="$T_PEERS" T_DEMO="$T_DEMO" DEMO_RC="$DEMO_RC" \
T_SET="$T_SET" SET_RC="$SET_RC" T_TOTAL="$T_TOTAL" "$PY" - "$OUT/gpu_run.json" <<'EOF'
import json, os, sys, time

import torch

e = os.environ
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
total = float(e["T_TOTAL"])
run = {
    "benchmark": "gpu_run", "mode": e["MODE"], "device": device, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    "phases_s": {"peers": float(e["T_PEERS"]), "demo": float(e["T_DEMO"]), "set": float(e["T_SET"])},
    "rc": {"demo": int(e["DEMO_RC"]), "set": int(e["SET_RC"])}, "total_s": total,
    "budget_s": float(e["BUDGET"]), "target_s": float(e["TARGET"]), "under_target": total <= float(e["TARGET"]),
}
with open(sys.argv[1], "w") as f:
    json.dump(run, f, indent=1)
    f.write("\n")
EOF
echo "total: ${T_TOTAL} s ($MODE; peers ${T_PEERS} s, demo ${T_DEMO} s, set ${T_SET} s; target ${TARGET} s); records in $OUT"
if [ "$DEMO_RC" != 0 ] || [ "$SET_RC" != 0 ]; then
    echo "error: a phase failed (demo rc $DEMO_RC, set rc $SET_RC)" >&2
    exit 1
fi
