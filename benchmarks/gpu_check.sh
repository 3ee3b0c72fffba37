#!/usr/bin/env bash
# The GPU check: build the bundle of wheels the offline GPU machine lacks (here), then on that machine
# unpack it and run every GPU part in under 8 minutes, each part time-boxed (docs/gpu.md).
#
#   benchmarks/gpu_check.sh build              # here, with PyPI: .gpu_bundle/site-cp312.tar.xz
#   benchmarks/gpu_check.sh run                # there (carry .gpu_bundle/site-cp312.tar.xz): results in $OUT
#   PYTHON=... CPU_OK=1 benchmarks/gpu_check.sh run   # here: every step on the CPU at tiny sizes
#
# run: unpacks the bundle into $SITE (default /tmp/site; kept when it holds this bundle already), puts
# it and the repository on PYTHONPATH, checks that every project module imports, then runs the parts
# that need no Ray (benchmarks/gpu_check.py: methods, lrp_speed, kmeans, bf16, erm_step), then the
# Ray parts (the GPU suite `pytest -m gpu` without its demo test, then the demo itself). Each part has
# its own time limit (seconds below), so a short lease still brings back the parts that finished.
# Without a CUDA GPU it stops with exit code 3, unless CPU_OK=1.
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODE=${1:-}

case "$MODE" in
build)
    shift
    exec "$PY" "$ROOT/benchmarks/gpu_bundle.py" build "$@"
    ;;
run) ;;
*)
    echo "usage: $0 build [--python 3.12] | run   (see the comments at the top of $0)" >&2
    exit 2
    ;;
esac

OUT=${OUT:-$ROOT/gpu_check_out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")') || {
    echo "gpu_check: no Python at '$PY' (set PYTHON=...)" >&2; exit 2; }
BUNDLE=${BUNDLE:-$ROOT/.gpu_bundle/site-cp$ver.tar.xz}
if [ ! -f "$BUNDLE" ]; then
    have=$(ls "$ROOT"/.gpu_bundle/site-cp*.tar.xz 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
    echo "gpu_check: no bundle for this Python (cp$ver): $BUNDLE is missing (found: ${have:-none})." >&2
    echo "  Build it here: benchmarks/gpu_check.sh build --python ${ver:0:1}.${ver:1}; carry that file" >&2
    exit 2
fi

# torch is the device image's own: no bundle needed to know whether there is a GPU
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [ "${CPU_OK:-0}" != 1 ]; then
        say "no CUDA GPU: torch $("$PY" -c 'import torch; print(torch.__version__)') sees none." \
            "Nothing was measured. (CPU_OK=1 runs every step here at tiny sizes.)"
        exit 3
    fi
    say "no CUDA GPU: CPU_OK=1, so every step runs on the CPU at tiny sizes (not GPU figures)"
    TINY=1
else
    TINY=0
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

# a bundle already unpacked on a warm machine is reused when it is this one (same size and time)
stamp="$(stat -c '%s %Y' "$BUNDLE")"
if [ "$(cat "$SITE/.bundle_stamp" 2>/dev/null)" != "$stamp" ]; then
    say "unpacking $(basename "$BUNDLE") ($(( $(stat -c %s "$BUNDLE") / 1048576 )) MiB) into $SITE"
    if [ -n "$(ls -A "$SITE" 2>/dev/null)" ] && [ ! -f "$SITE/.bundle_stamp" ]; then
        say "SITE=$SITE holds files that are no bundle's: not emptying it; set SITE to a new folder"; exit 2
    fi
    rm -rf "$SITE" && mkdir -p "$SITE" && tar -xJf "$BUNDLE" -C "$SITE" || { say "unpack failed"; exit 2; }
    echo "$stamp" > "$SITE/.bundle_stamp"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE=disabled TQDM_DISABLE=1 MPLBACKEND=Agg OUT

# part NAME SECONDS CMD...: run with a time limit (SIGINT, then SIGKILL 10 s later), log to OUT/NAME.log.
# The limits are an H100's; CPU_OK runs scale them by LIMIT_SCALE (default 10: a shared 2-core machine)
SCALE=${LIMIT_SCALE:-$([ "$TINY" = 1 ] && echo 10 || echo 1)}
FAILED=()
part() {
    local name=$1 limit=$(( $2 * SCALE ))
    shift 2
    say "── $name (limit ${limit}s): $*"
    timeout -s INT -k 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    [ $rc -eq 124 ] && say "$name: TIMED OUT after ${limit}s"
    [ $rc -ne 0 ] && FAILED+=("$name(rc=$rc)")
    say "$name: rc=$rc"
    return 0
}

part imports 40 "$PY" "$ROOT/benchmarks/gpu_bundle.py" check
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
          torch.backends.cudnn.version(), "TF32 matmul", torch.backends.cuda.matmul.allow_tf32,
          "TF32 cuDNN", torch.backends.cudnn.allow_tf32)' 2>&1 | tee -a "$LOG"

# the parts that need no Ray (seconds: about 6 min with the Ray parts below on one H100)
extra=()
[ "$TINY" = 1 ] && extra=(--tiny)
part methods 40 "$PY" "$ROOT/benchmarks/gpu_check.py" methods --out "$OUT" "${extra[@]}"
part lrp_speed 70 "$PY" "$ROOT/benchmarks/gpu_check.py" lrp_speed --out "$OUT" "${extra[@]}"
part bf16 40 "$PY" "$ROOT/benchmarks/gpu_check.py" bf16 --out "$OUT" "${extra[@]}"
part kmeans 40 "$PY" "$ROOT/benchmarks/gpu_check.py" kmeans --out "$OUT" "${extra[@]}"
part erm_step 40 "$PY" "$ROOT/benchmarks/gpu_check.py" erm_step --out "$OUT" "${extra[@]}"
"$PY" "$ROOT/benchmarks/gpu_check.py" summary --out "$OUT" >> "$LOG" 2>&1

# the Ray parts: the GPU suite (its demo test left out: the demo runs next, its output kept in OUT)
part gpu_suite 100 "$PY" -m pytest -m gpu "$ROOT/tests/test_gpu.py" -q -p no:cacheprovider \
    -k "not test_demo_runs_on_the_gpu" --junitxml="$OUT/gpu_suite.xml"
demo_sets=()
if [ "$TINY" = 1 ]; then
    demo_sets=(--set dataset.rho=0.9 --set dataset.n_train=400 --set dataset.n_val=300
               --set dataset.n_test=200 --set erm.epochs=1 --set model.backbone=test_resnet
               --set clustering.k=2 --set retrain.dfr.n_final_fits=2)
fi
part demo 90 "$PY" -m exmap_ray run cmnist --out "$OUT/demo" "${demo_sets[@]}"
# keep what comes back small
rm -rf "$OUT/demo/cache" "$OUT/demo/mlflow.db" "$OUT/demo/mlartifacts" 2>/dev/null

say "done in $(( $(date +%s) - T0 ))s; failed: ${FAILED[*]:-none}; figures and logs in $OUT"
[ ${#FAILED[@]} -eq 0 ]
