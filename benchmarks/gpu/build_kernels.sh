#!/usr/bin/env bash
# Run ON THE GPU DEVICE, from the repo root, with `.whl` carried (see README.md here).
# Builds causal-conv1d and mamba-ssm from the sdists in .whl for ONE architecture (sm_90: H100/H200)
# and installs them with pip into $SITE (default /tmp/site); then `export PYTHONPATH=$SITE`.
# Idempotent: exits at once when both extensions already import from $SITE.
#
# Why the setup.py patch: both sdists' setup.py (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0) pass a
# hard-coded `-gencode` list to nvcc (sm_75, 80, 87, 90, 100, 120 and, with nvcc >= 13, 103, 110, 121),
# and neither reads an environment variable to narrow it: MAMBA_FORCE_BUILD / CAUSAL_CONV1D_FORCE_BUILD
# only skip the prebuilt-wheel download, *_SKIP_CUDA_BUILD skips CUDA entirely, and
# TORCH_CUDA_ARCH_LIST is ignored by torch.utils.cpp_extension as soon as extra_compile_args already
# holds an 'arch' flag (_get_cuda_arch_flags returns []). So we export TORCH_CUDA_ARCH_LIST=9.0 for
# form's sake and rewrite cc_flag in a scratch copy of each setup.py to keep only sm_$RSMAMBA_SM,
# which cuts the nvcc work ~9x. The sources themselves are untouched.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WHL="$REPO/.whl"
SITE="${SITE:-/tmp/site}"
BUILD="${BUILD_DIR:-/tmp/rsmamba_kernels}"
SM="${RSMAMBA_SM:-90}"
export TORCH_CUDA_ARCH_LIST="${SM:0:-1}.${SM: -1}" MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
export MAX_JOBS="${MAX_JOBS:-16}" RSMAMBA_SM="$SM"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
mkdir -p "$SITE" "$BUILD"

check_import() {
    $PY - <<'PY'
import torch  # first: the extensions link against libc10.so, which torch loads
import selective_scan_cuda, causal_conv1d_cuda  # the compiled extensions
from causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # runs mamba_ssm/__init__ too
import mamba_ssm, causal_conv1d
print('kernels import OK:', 'mamba_ssm', mamba_ssm.__version__, '| causal_conv1d', causal_conv1d.__version__,
      '| from', selective_scan_cuda.__file__)
PY
}

if check_import 2>/dev/null; then
    echo "already built in $SITE"; exit 0
fi

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -n 2
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'capability', torch.cuda.get_device_capability())"
echo "nproc $(nproc), MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, gencode sm_$SM only"

$PY -c 'import einops' 2>/dev/null || {
    echo "einops missing: installing the carried wheel"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/einops-*.whl; }
$PY -c 'import setuptools, wheel, packaging, ninja' || { echo "build needs setuptools, wheel, packaging, ninja" >&2; exit 1; }

patch_setup() {  # keep only sm_$SM in the setup.py's hard-coded -gencode list
    $PY - "$1" <<'PY'
import os, sys
path = sys.argv[1]
src = open(path).read()
anchor = '    if FORCE_CXX11_ABI:\n'
if src.count(anchor) != 1:
    sys.exit(f'{path}: cannot find where cc_flag is complete; the sdist changed, update build_kernels.sh')
sm = os.environ['RSMAMBA_SM']
keep = (f'    # timm-rsmamba build_kernels.sh: one architecture only\n'
        f'    cc_flag = ["-gencode", "arch=compute_{sm},code=sm_{sm}"]\n')
open(path, 'w').write(src.replace(anchor, keep + anchor))
PY
}

build_one() {  # $1 = sdist glob
    local sdist
    sdist=$(ls "$WHL"/$1 | head -n 1)
    local name
    name=$(basename "$sdist" .tar.gz)
    rm -rf "$BUILD/$name"
    tar -xzf "$sdist" -C "$BUILD"
    patch_setup "$BUILD/$name/setup.py"
    echo "== building $name ($(date +%T))"
    local t0=$SECONDS
    # --no-build-isolation: build against the device's own torch (the ABI the extension must match)
    if ! $PY -m pip install --no-build-isolation --no-deps --no-index --no-compile --target "$SITE" \
            "$BUILD/$name" >"$BUILD/$name.log" 2>&1; then
        grep -iE "error|fatal" "$BUILD/$name.log" | head -n 40
        tail -n 30 "$BUILD/$name.log"
        echo "build of $name FAILED; full log $BUILD/$name.log" >&2
        return 1
    fi
    echo "built $name in $((SECONDS - t0)) s"
    echo "$name $((SECONDS - t0))" >>"$BUILD/build_times.txt"
}

# Both at once: causal-conv1d has 3 .cu files and mamba-ssm 10, so together they fill 16 cores;
# the wall time is that of the slowest mamba-ssm backward kernel.
T0=$SECONDS
build_one 'causal_conv1d-*.tar.gz' & conv_pid=$!
build_one 'mamba_ssm-*.tar.gz' & scan_pid=$!
failed=0
wait "$conv_pid" || failed=1
wait "$scan_pid" || failed=1
[ "$failed" = 0 ] || { echo "== build FAILED after $((SECONDS - T0)) s" >&2; exit 1; }
echo "== total build time $((SECONDS - T0)) s (both in parallel, MAX_JOBS=$MAX_JOBS each, sm_$SM)"
for so in "$SITE"/selective_scan_cuda*.so "$SITE"/causal_conv1d_cuda*.so; do
    echo "$(basename "$so"): $(du -h "$so" | cut -f1), $(cuobjdump --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
done
check_import
