"""The hand-written CPU forwards of the scan and the conv (csrc/mamba_cpu.cpp), built on first use.

torch.utils.cpp_extension compiles it once per machine (about 25 s on 2 cores; cached under
$TORCH_EXTENSIONS_DIR, rebuilt only when the source changes), for the vector width of the ISA torch detects.
Where it cannot be built (no compiler, no OpenMP, an unusual platform), callers get None and a warning that
says why, once, and run the torch.compile'd forward instead.
"""
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_SOURCE = Path(__file__).parent / 'csrc' / 'mamba_cpu.cpp'
# torch's CPU capability -> (vector bytes, compiler flags); anything else builds 16-byte vectors (SSE2, NEON)
_ISA_BUILDS = {
    'AVX512': (64, ['-mavx512f', '-mavx512dq', '-mavx512vl', '-mavx512bw', '-mfma']),
    'AVX2': (32, ['-mavx2', '-mfma']),
}
_logger = logging.getLogger(__name__)


class _CpuKernels:
    def __init__(self):
        self.module: Optional[ModuleType] = None
        self.error: Optional[str] = None

    def load(self) -> Optional[ModuleType]:
        if self.module is None and self.error is None:
            capability = torch.backends.cpu.get_cpu_capability()
            width, isa_flags = _ISA_BUILDS.get(capability, (16, []))
            name = f'rsmamba_mamba_cpu_{capability.lower()}'
            _logger.info('backend cpu_kernel: loading %s (built on first use, ~25 s)', name)
            try:
                from torch.utils.cpp_extension import load
                self.module = load(
                    name=name, sources=[str(_SOURCE)], extra_ldflags=['-fopenmp'],
                    # contraction into FMAs is what keeps the exp's fraction exact (see the source)
                    extra_cflags=['-O3', '-fopenmp', '-ffp-contract=fast', f'-DRSM_VEC_BYTES={width}', *isa_flags])
            except Exception as e:  # a build failure must never break the scan: compiled runs instead
                self.error = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
                warnings.warn(f"backend 'cpu_kernel': building {_SOURCE.name} failed ({self.error}); "
                              f"running the torch.compile'd forwards instead")
        return self.module


CPU_KERNELS = _CpuKernels()


def cpu_scan_forward(u, delta_raw, A, B, C, D, z, delta_bias, softplus: bool, chunk_len: int, save_starts: bool):
    """The scan on time-major fp32 CPU tensors (L, b, d) / (L, b, n), see the source's header.

    Returns out (L, b, d), the state at each chunk start (chunks, n, b, d) (empty unless ``save_starts``) and
    the last state (n, b, d). Callers check ``CPU_KERNELS.load()`` first.
    """
    u, delta_raw, B, C, z = (_unit_last_stride(t) for t in (u, delta_raw, B, C, z))
    return _module().scan_forward(u, delta_raw, A.t().contiguous(), B, C, D, z, delta_bias, softplus, chunk_len,
                                  save_starts)


def cpu_conv_forward(x_tm, weight, bias, silu: bool):
    """Causal depthwise conv (+ SiLU) of a time-major fp32 CPU tensor (L, b, d); weight (d, K)."""
    return _module().conv_forward(_unit_last_stride(x_tm), weight.t().contiguous(), bias, silu)


def _unit_last_stride(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _module() -> ModuleType:
    module = CPU_KERNELS.load()
    if module is None:
        raise RuntimeError(f'the CPU kernels could not be built: {CPU_KERNELS.error}')
    return module
