#!/usr/bin/env bash
# Run HERE (a machine with network), from anywhere: downloads what the GPU device lacks into
# <repo>/.whl (git-ignored; never commit it). The device has no network, so these travel with
# the `run` tool's `carry: [".whl"]`.
#   * mamba-ssm and causal-conv1d as sdists: their CUDA sources, built on the device for sm_90 only
#     by build_kernels.sh (the PyPI wheels are built for other torch/CUDA versions than the device's
#     torch 2.11 + CUDA 13, and setup.py's own wheel download cannot reach the network there).
#   * einops as a wheel: mamba-ssm imports it; the device image has it, so build_kernels.sh installs
#     this copy only when `import einops` fails there.
#   * timm as a wheel: the version this project is developed against; run_all.sh installs it only
#     when the device's timm is a different version.
# pip download of an sdist prepares its metadata by running setup.py, which imports torch: so no build
# isolation (this machine's torch is used), and *_SKIP_CUDA_BUILD=TRUE so nothing is compiled here.
# Versions are pinned so a later session builds what was checked; override with the env vars.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="$REPO/.whl"
MAMBA_SSM_VERSION="${MAMBA_SSM_VERSION:-2.3.2.post1}"
CAUSAL_CONV1D_VERSION="${CAUSAL_CONV1D_VERSION:-1.7.0}"
EINOPS_VERSION="${EINOPS_VERSION:-0.8.2}"
TIMM_VERSION="${TIMM_VERSION:-$(python3 -c 'import timm; print(timm.__version__)')}"

grep -qx '/.whl/' "$REPO/.gitignore" 2>/dev/null || grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || {
    echo "refusing: $DEST is not git-ignored (add '/.whl/' to .gitignore or .git/info/exclude)" >&2; exit 1; }
mkdir -p "$DEST"
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    python3 -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$DEST" \
    "mamba-ssm==$MAMBA_SSM_VERSION" "causal-conv1d==$CAUSAL_CONV1D_VERSION"
python3 -m pip download -q --no-deps --only-binary :all: -d "$DEST" "einops==$EINOPS_VERSION" "timm==$TIMM_VERSION"
echo "in $DEST:"
ls -l "$DEST"
du -sh "$DEST"
echo "the run tool carries at most 64 MiB of working tree in all; .whl must stay well under that"
