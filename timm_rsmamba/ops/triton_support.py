"""Where the Triton kernels (triton_scan.py, triton_conv.py) can run, and what ``auto`` picks on CUDA.

Nothing here imports triton at module import: Triton decides at a kernel's decoration whether it runs
compiled or interpreted (``TRITON_INTERPRET=1``, the CPU interpreter the tests use; it must be set before triton
itself is imported), so the kernel modules are imported on first use (local imports), and a missing or broken
triton must never break ``import timm_rsmamba``.
"""
import os
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch

# What `auto` runs on CUDA tensors, best first: the first one usable on the machine wins. This is the one
# place that decides between the Triton kernels and the fused mamba-ssm / causal-conv1d ones; the GPU
# measurements (docs/gpu-triton.md) settle the order.
CUDA_AUTO_BACKENDS: Dict[str, Sequence[str]] = {
    'scan': ('triton', 'mamba_ssm', 'compiled'),
    'conv': ('triton', 'causal_conv1d', 'torch'),
}


# On the Triton mixer, the gate's product y * weights keeps the mix's inputs, not y, for its backward, which
# re-runs the mix's forward: one more scan forward per block for one (L, paths * B, E) activation less ('1',
# the default) or autograd keeps y ('0').
GATE_RECOMPUTE_ENV_VAR = 'RSMAMBA_GATE_RECOMPUTE'


def gate_recompute() -> bool:
    value = os.environ.get(GATE_RECOMPUTE_ENV_VAR) or '1'
    if value not in ('0', '1'):
        raise ValueError(f"${GATE_RECOMPUTE_ENV_VAR}={value!r}: choose '1' (re-compute y) or '0' (keep y)")
    return value == '1'


def interpreter_requested() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')


def _interpretation() -> Optional[str]:
    """None if our kernels and Triton's own library both run in Triton's interpreter, else what went wrong."""
    from . import triton_conv
    if not triton_conv.LIBRARY_INTERPRETED:
        return ('TRITON_INTERPRET=1 was set after triton was imported (importing timm or torch._dynamo imports '
                'it); set it before anything imports them')
    if not triton_conv.INTERPRETED:
        return 'TRITON_INTERPRET=1 was set after the Triton kernels were first imported; set it before the first use'
    return None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` here, or None when they can."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # an absent or broken optional dependency must not break the package
        return f'triton does not import ({type(e).__name__}: {e}); it comes with the CUDA wheels of torch'
    if device.type == 'cuda':
        return None
    if device.type == 'cpu':
        if interpreter_requested():
            return _interpretation()
        return ('CPU tensors need TRITON_INTERPRET=1, set before the first use: Triton\'s CPU interpreter, '
                'slow, for tests')
    return f'the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device.type}'


def require(op: str, device: torch.device, alternatives: str):
    """Raise a clear error when backend 'triton' of ``op`` ('scan' or 'conv') cannot run on ``device``."""
    if torch.compiler.is_compiling():  # checked when the traced function first ran eagerly, or fails then
        return
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op} backend 'triton' cannot run here: {reason}. Backends that can: {alternatives}")


def mamba_mix(xz: torch.Tensor, *args):
    """`triton_mix.mamba_mix_triton` (the mixer between its projections on the Triton kernels), on first use."""
    require('mixer', xz.device, "scan_backend / conv_backend other than 'triton'")
    from . import triton_mix
    return triton_mix.mamba_mix_triton(xz, *args)


def weigh_paths(y: torch.Tensor, *args):
    """`triton_mix.weigh_paths_triton` (the gate's product without keeping y), on first use."""
    from . import triton_mix
    return triton_mix.weigh_paths_triton(y, *args)


_probed: Dict[str, Optional[str]] = {}


def cuda_probe_error() -> Optional[str]:
    """None if the Triton kernels compile and run on the GPU, else why not (no toolchain, an unsupported GPU, a
    broken install): found out once per process, by one small kernel."""
    if 'cuda' not in _probed:
        _probed['cuda'] = _probe_cuda()
    return _probed['cuda']


@torch.compiler.disable
def _probe_cuda() -> Optional[str]:
    reason = unavailable_reason(torch.device('cuda'))
    if reason is not None:
        return reason
    try:
        from . import triton_conv
        x = torch.randn(1, 8, 5, device='cuda')
        w, b = torch.randn(8, 4, device='cuda'), torch.randn(8, device='cuda')
        triton_conv.causal_conv1d_triton(x, w, b, 'silu')
        torch.cuda.synchronize()
    except Exception as e:
        return f'{type(e).__name__}: {e}'.strip().splitlines()[0]
    return None


_warned: set = set()


def cuda_auto_choice(op: str, usable: Dict[str, Callable[[], bool]]) -> str:
    """The first backend of CUDA_AUTO_BACKENDS[op] that is usable; when the Triton kernels are skipped because
    they fail here, one warning says why."""
    for name in CUDA_AUTO_BACKENDS[op]:
        if name == 'triton':
            error = cuda_probe_error()
            if error is None:
                return name
            if error not in _warned:
                _warned.add(error)
                warnings.warn(f'the Triton kernels do not run on this GPU ({error}); backend auto falls back to '
                              f'the next of {", ".join(CUDA_AUTO_BACKENDS[op][1:])} that is installed')
        elif usable[name]():
            return name
    raise AssertionError(f'no usable CUDA backend for {op}: the last entry of CUDA_AUTO_BACKENDS must always work')


def launches(t: torch.Tensor, interpreted: bool) -> bool:
    """Whether a triton_op body launches its kernels for input ``t``.

    Compiled, always: wrap_triton turns the launch into a no-op for fake tensors (the op body doubles as its fake
    implementation). Interpreted, wrap_triton hands back the bare kernel, so fake tensors (shape propagation,
    e.g. dynamo) skip the launch, and AOT tracing, which would record the op without its kernels, is refused.
    """
    if not interpreted:
        return True
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    if isinstance(t, FunctionalTensor):
        raise RuntimeError("torch.compile's AOT backends cannot trace interpreted Triton kernels (TRITON_INTERPRET=1): "
                           "use torch.compile(backend='eager') here, or a GPU")
    return not is_fake(t)


def block_size(n: int, cap: int) -> int:
    """A power of two covering ``n`` but at most ``cap`` (tile sides must be powers of two)."""
    return min(cap, 1 << max(n - 1, 0).bit_length())
