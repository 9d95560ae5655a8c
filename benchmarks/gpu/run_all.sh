#!/usr/bin/env bash
# Run ON THE GPU DEVICE from the repo root, with `.whl` carried (README.md here has the exact calls).
#   bash benchmarks/gpu/run_all.sh STAGE [STAGE ...]
# Stages (each fits one 10-minute `run` call; run them back to back so the machine stays warm, since a
# fresh machine has lost /tmp/site and must build again):
#   build     build + install the kernels (build_kernels.sh) in a detached session, wait up to
#             BUILD_WAIT s (default 540) printing progress; if still building, call `build` again
#   check     tests/test_gpu.py, then parity.py (fused vs pure PyTorch on rsmamba_base, fp32 and bf16)
#   suite     the full test suite with the extras installed (its CPU tests compile cold: ~10 min)
#   base224   bench_throughput.py --device cuda --amp bf16: rsmamba_base, 224 px, batch 128 (+ timm peers)
#   huge224   the same for rsmamba_huge, batch 16
#   base384   rsmamba_base, 384 px, batch 24 (+ timm peers at 384)
#   huge384   rsmamba_huge, 384 px, batch 8
#   train     torchrun --nproc_per_node 1 train.py on UC Merced with the paper's split and recipe, shortened
#             (TRAIN_EPOCHS cosine epochs after the 10 warm-up ones, default 50), bf16 autocast; needs the
#             data carried as `.gpu_data` (a copy of ../shared/data: `cp -r ../shared/data .gpu_data`)
#   triton    the Triton backends, nothing to build: first-call compile time and peak memory of an rsmamba_base
#             train step at batch 128 (triton_first_call.py, cold Triton cache), tests/test_triton.py and the
#             Triton tests of tests/test_gpu.py, parity.py triton vs the eager pure-PyTorch backends (fp32, bf16)
#   triton_bench  bench_throughput.py rows triton, triton_gather, triton_keep_y, floor at batch 128 (+ fused
#             when the extra is installed), then triton_sweep.py (tile sizes of each kernel alone)
#   all       every stage in order (for a machine with no per-call limit)
# Batch sizes come from autograd's saved bytes per image measured on CPU under bf16 autocast
# (base 224: ~0.5 GB/img, huge 224: ~2.2, base 384: ~1.9, huge 384: ~6.2): base at batch 128 is
# ~60 GB of an H100's 80; if it reports out of memory, rerun with --batch-size 96.
# Rows that would not fit or would take minutes at the big batch run smaller ones (--row-batch):
# the reference keeps per-position states for backward and launches a dozen small kernels per position;
# the eager chunked backend keeps (chunks, batch, E, S) states, a memory cost the compiled kernels avoid.
# Everything worth keeping goes to $OUT (flat: the tool returns at most 8 files, 2 folders deep).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/rsmamba_out}"
SITE="${SITE:-/tmp/site}"
BUILD="${BUILD_DIR:-/tmp/rsmamba_kernels}"
mkdir -p "$OUT" "$SITE" "$BUILD"
export PYTHONPATH="$REPO:$SITE" PYTHONUNBUFFERED=1 SITE BUILD_DIR="$BUILD"
PY=python3
BENCH="$PY benchmarks/bench_throughput.py --device cuda --amp bf16 --warmup 3 --steps 10 --row-timeout 240"

ensure_timm() {  # the project is developed against the carried timm; use it if the device's differs
    local want
    want=$(ls .whl/timm-*.whl 2>/dev/null | sed -E 's/.*timm-([^-]+)-.*/\1/' | head -n 1)
    [ -n "$want" ] || return 0
    if [ "$($PY -c 'import timm; print(timm.__version__)' 2>/dev/null)" != "$want" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/timm-"$want"-*.whl
    fi
    $PY -c 'import timm, torch; print("timm", timm.__version__, "| torch", torch.__version__)'
}

link_shared() {  # tests and the split lists expect ../shared/data beside the checkout
    if [ -d .gpu_data ] && [ ! -e ../shared/data ]; then
        mkdir -p ../shared && ln -s "$REPO/.gpu_data" ../shared/data
    fi
    [ -e ../shared/data ] && echo "shared data: $(readlink -f ../shared/data)" || echo "no ../shared/data (carry .gpu_data)"
}

stage_build() {
    if ! pgrep -f "build_kernels.sh" >/dev/null; then
        setsid nohup bash benchmarks/gpu/build_kernels.sh >"$BUILD/build.log" 2>&1 </dev/null &
        echo "build started in the background ($(date +%T)); log $BUILD/build.log"
    else
        echo "a build is already running; waiting for it"
    fi
    local waited=0 wait_s="${BUILD_WAIT:-540}"
    while pgrep -f "build_kernels.sh" >/dev/null && [ "$waited" -lt "$wait_s" ]; do
        sleep 30; waited=$((waited + 30))
        echo "[$(date +%T)] building: $(find "$BUILD" -name '*.o' 2>/dev/null | wc -l) object files done" \
             "(mamba-ssm has 10 .cu + 1 .cpp, causal-conv1d 3 .cu + 1 .cpp), $(tail -c 200 "$BUILD/build.log" | tr '\n' ' ' | cut -c1-120)"
    done
    cp "$BUILD/build.log" "$OUT/build.log"
    if pgrep -f "build_kernels.sh" >/dev/null; then
        echo "STILL BUILDING after $waited s: call 'run_all.sh build' again (it resumes waiting)"; return 3
    fi
    tail -n 15 "$BUILD/build.log"
    grep -q "kernels import OK" "$BUILD/build.log" || { echo "BUILD FAILED, see build.log"; return 1; }
}

stage_check() {
    ensure_timm
    $PY -c 'from timm_rsmamba.ops import has_mamba_ssm, has_causal_conv1d; import sys; ok = has_mamba_ssm() and has_causal_conv1d(); print("extras visible to timm_rsmamba:", ok); sys.exit(0 if ok else 1)' \
        || { echo "kernels not importable: run the build stage first (same warm machine)"; return 1; }
    link_shared
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    timeout 200 $PY -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests_gpu.log" | tail -n 25
    timeout 360 $PY benchmarks/gpu/parity.py 2>&1 | tee "$OUT/parity.log"
}

stage_suite() {
    ensure_timm
    link_shared
    timeout 560 $PY -m pytest -q -rs -x tests 2>&1 | tee "$OUT/tests.log" | tail -n 25
}

stage_triton() {
    ensure_timm
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    timeout 200 $PY benchmarks/gpu/triton_first_call.py --batch-size 128 --json-out "$OUT/triton_first_call.json" \
        2>&1 | tee "$OUT/triton_first_call.md"
    timeout 240 $PY -m pytest -q -rs tests/test_triton.py tests/test_gpu.py -k "triton or Triton" 2>&1 \
        | tee "$OUT/tests_triton.log" | tail -n 25
    timeout 150 $PY benchmarks/gpu/parity.py --fused triton,triton --pytorch chunked,reference --batch-size 4 2>&1 \
        | tee "$OUT/parity_triton.log"
}

stage_triton_bench() {
    local rows=triton,triton_gather,triton_keep_y,floor
    if $PY -c 'import sys; from timm_rsmamba import ops; sys.exit(not (ops.has_mamba_ssm() and ops.has_causal_conv1d()))'; then
        rows=$rows,fused  # the extra was built on this machine (stage build)
    fi
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-380} bench bench_triton224 --models rsmamba_base --img-size 224 --batch-size 128 \
        --rows "$rows"
    timeout 180 $PY benchmarks/gpu/triton_sweep.py --json-out "$OUT/triton_sweep.json" 2>&1 | tee "$OUT/triton_sweep.md"
}

bench() {  # $1 = output name, rest = bench_throughput.py arguments
    local name=$1; shift
    ensure_timm
    # BENCH_ROWS=a,b,... runs a subset (the last --rows wins), to split a stage over calls
    timeout "${BENCH_TIMEOUT:-560}" $BENCH "$@" ${BENCH_ROWS:+--rows "$BENCH_ROWS"} --json-out "$OUT/$name.json" 2>&1 \
        | tee "$OUT/$name.md"
}

stage_train() {
    ensure_timm
    link_shared
    [ -e ../shared/data/ucmerced ] || { echo "train needs the data: carry .gpu_data"; return 1; }
    local data=/tmp/ucm_paper run=/tmp/rsmamba_train
    $PY -m timm_rsmamba.data.split ../shared/data/ucmerced "$data" --force \
        --train-list ../shared/data/rsmamba_datainfo/UC/train.txt --val-list ../shared/data/rsmamba_datainfo/UC/val.txt
    timeout "${TRAIN_TIMEOUT:-540}" $PY -m torch.distributed.run --nproc_per_node 1 train.py "$data" \
        -c configs/rsmamba_base_ucm.yaml --epochs "${TRAIN_EPOCHS:-50}" --val-interval 10 -j 14 \
        --amp --amp-dtype bfloat16 --output "$run" --experiment ucm_gpu 2>&1 | tee "$OUT/train.log"
    local rc=${PIPESTATUS[0]}
    for f in summary.csv args.yaml; do cp "$run/ucm_gpu/$f" "$OUT/train_$f" 2>/dev/null; done
    cp "$run"/ucm_gpu/*.png "$OUT/" 2>/dev/null
    ls "$run/ucm_gpu"
    return "$rc"
}

[ "$#" -gt 0 ] || set -- all
status=0
for stage in "$@"; do
    echo "=== stage $stage ($(date +%T))"
    case "$stage" in
        build) stage_build || status=$? ;;
        check) stage_check || status=$? ;;
        suite) stage_suite || status=$? ;;
        base224) bench bench_base224 --models rsmamba_base --img-size 224 --batch-size 128 \
                     --row-batch compiled=32 chunked=32 reference=8 || status=$? ;;
        huge224) bench bench_huge224 --models rsmamba_huge --img-size 224 --batch-size 16 \
                     --rows ours,ours_ckpt,compiled,chunked,reference,floor --row-batch chunked=16 reference=4 || status=$? ;;
        base384) bench bench_base384 --models rsmamba_base --img-size 384 --batch-size 24 \
                     --row-batch chunked=8 reference=2 || status=$? ;;
        huge384) bench bench_huge384 --models rsmamba_huge --img-size 384 --batch-size 8 \
                     --rows ours,ours_ckpt,compiled,chunked,floor --row-batch chunked=4 || status=$? ;;
        train) stage_train || status=$? ;;
        triton) stage_triton || status=$? ;;
        triton_bench) stage_triton_bench || status=$? ;;
        all) for s in build check suite base224 huge224 base384 huge384 triton triton_bench; do
                 bash "$0" "$s" || status=$?
             done ;;
        *) echo "unknown stage '$stage' (build, check, suite, base224, huge224, base384, huge384, train, triton," \
                "triton_bench, all)"; exit 2 ;;
    esac
done
exit "$status"
