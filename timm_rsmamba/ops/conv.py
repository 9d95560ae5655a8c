"""Causal depthwise conv1d over (batch, dim, length), the Mamba mixer's short convolution.

Backends: ``triton`` (ops/triton_conv.py, the CUDA default), ``causal_conv1d`` (fused CUDA kernel from the
optional extra), ``cpu_kernel`` (the CPU default: forward and backward in C++, csrc/mamba_cpu.cpp, as the
custom ops ``rsmamba::cpu_causal_conv1d_fwd/bwd``), ``torch`` (shifted multiply-adds that keep the input's
memory layout, every device; fused by torch.compile for big problems on CPU and CUDA, eager otherwise) and
``reference`` (F.conv1d, the textbook definition, for tests; what ``auto`` picks under torch.export, a grouped
``Conv`` in ONNX).

The multi-path block's token orders (``order``, ops/token_orders.py): ``cpu_kernel`` and ``triton`` read x
through the index; the other backends get a gathered copy.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_support
from .compiled import CompiledKernels
from .cpu_kernel import CPU_KERNELS, MAX_CONV_TAPS, causal_conv1d_fwd, cpu_kernels_available
from .fused_cuda import causal_conv1d_fn, fused_causal_conv1d
from .token_orders import gather_channel_major

BACKEND_ENV_VAR = 'RSMAMBA_CONV_BACKEND'
CONV_BACKENDS = ('triton', 'causal_conv1d', 'cpu_kernel', 'torch', 'reference')
# The backends that take ``order`` and read x through it; the others get a gathered copy of x.
ORDER_READING_CONVS = {'triton', 'cpu_kernel'}
# What the error of a backend that cannot run on a device suggests instead.
_RUNNABLE = {'cpu': "'auto', 'cpu_kernel', 'torch', 'reference'",
             'cuda': "'auto', 'causal_conv1d' (the [cuda] extra), 'torch', 'reference'"}


def _activate(x, activation):
    if activation in ('silu', 'swish'):
        return F.silu(x)
    if activation is None:
        return x
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_reference(x, weight, bias=None, activation=None):
    """The definition: a depthwise F.conv1d padded by kernel-1 on both sides, keeping the first L outputs."""
    kernel, length = weight.shape[-1], x.shape[-1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=kernel - 1, groups=weight.shape[0])[..., :length]
    return _activate(out, activation)


def _shifted_conv(x_tm, weight, bias):
    """Time-major causal conv: out[t] = bias + sum_k weight[:, k] * x[t - (K-1) + k]."""
    kernel, length = weight.shape[-1], x_tm.shape[0]
    out = torch.mul(x_tm, weight[:, kernel - 1])
    for k in range(kernel - 1):
        shift = kernel - 1 - k
        if shift < length:
            out[shift:].addcmul_(x_tm[:length - shift], weight[:, k])
    return out if bias is None else out.add_(bias)


def _conv_forward(x_tm, weight, bias, silu: bool):
    out = _shifted_conv(x_tm, weight, bias)
    return F.silu(out) if silu else out


def _conv_backward(x_tm, weight, bias, silu: bool, dout):
    """Gradients of x, weight and bias (or None), the pre-activation re-computed from the input."""
    kernel, length = weight.shape[-1], x_tm.shape[0]
    if silu:
        pre = _shifted_conv(x_tm, weight, bias)
        sig = torch.sigmoid(pre)
        dout = dout * sig * (1 + pre * (1 - sig))
    dx = torch.mul(dout, weight[:, kernel - 1])
    dweight = torch.empty_like(weight)
    dweight[:, kernel - 1] = (dout * x_tm).sum((0, 1))
    for k in range(kernel - 1):
        shift = kernel - 1 - k
        if shift < length:
            dx[:length - shift].addcmul_(dout[shift:], weight[:, k])
            dweight[:, k] = (dout[shift:] * x_tm[:length - shift]).sum((0, 1))
        else:
            dweight[:, k] = 0
    dbias = dout.sum((0, 1)) if bias is not None else None
    return dx, dweight, dbias


# The conv is memory-bound: compiled, its shifted multiply-adds, bias and SiLU make one pass over memory
# instead of six (rsmamba_base evaluates ~10% faster on a 2-core CPU).
_CONV_KERNELS = CompiledKernels("conv backend 'torch'", forward=_conv_forward, backward=_conv_backward)
# Below this many elements (length * batch * dim), or off CPU/CUDA, the conv runs eagerly.
MIN_COMPILE_ELEMENTS = 2 ** 20


class _CausalConv1dTimeMajor(torch.autograd.Function):
    """Causal depthwise conv (+ optional SiLU) on (L, b, d) tensors of any strides.

    Saves only its input and re-computes the pre-activation in backward, so training keeps one
    activation per conv instead of three.
    """

    @staticmethod
    def forward(ctx, x_tm, weight, bias, silu, compiled):
        ctx.save_for_backward(x_tm, weight, bias)
        ctx.silu, ctx.compiled = silu, compiled
        return _CONV_KERNELS('forward', x_tm, weight, bias, silu, compiled=compiled)

    @staticmethod
    def backward(ctx, dout):
        x_tm, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _CONV_KERNELS(
            'backward', x_tm, weight, bias, ctx.silu, dout.contiguous(), compiled=ctx.compiled)
        return dx, dweight, dbias, None, None


def _is_silu(activation) -> bool:
    if activation not in ('silu', 'swish'):
        _activate(None, activation)  # validates the name
    return activation is not None


def causal_conv1d_torch(x, weight, bias=None, activation=None, may_compile: bool = True):
    """Pure PyTorch, every device; (batch, dim, length) views of time-major tensors cost no copy.

    ``may_compile=False``: eager even for big problems (no C++ compiler for torch.compile to use).
    """
    compiled = may_compile and x.device.type in ('cpu', 'cuda') and x.numel() >= MIN_COMPILE_ELEMENTS
    out = _CausalConv1dTimeMajor.apply(x.permute(2, 0, 1), weight, bias, _is_silu(activation), compiled)
    return out.permute(1, 2, 0)


def causal_conv1d_cpu_kernel(x, weight, bias=None, activation=None, order: Optional[torch.Tensor] = None):
    """The C++ conv (csrc/mamba_cpu.cpp), forward and backward: one pass each, the SiLU's exp inlined.

    CPU tensors, all fp32 or all fp64, up to MAX_CONV_TAPS taps; anything else, and machines where the kernels
    cannot be built, run `causal_conv1d_torch` (eagerly if there is no C++ compiler). ``order``: read x through
    an (L, paths) token-order index, with no gathered copy (the result has paths * batch sequences).
    """
    if x.device.type != 'cpu':
        raise RuntimeError(f"conv backend 'cpu_kernel' runs on CPU tensors only, got {x.device.type}; "
                           f"use 'auto', 'torch' or 'causal_conv1d' on this device")
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if (len(dtypes) > 1 or not dtypes <= {torch.float32, torch.float64} or weight.shape[-1] > MAX_CONV_TAPS
            or not cpu_kernels_available()):
        if order is not None:
            x = gather_channel_major(x, order)
        return causal_conv1d_torch(x, weight, bias, activation, may_compile=CPU_KERNELS.compiler_found)
    return causal_conv1d_fwd(x.permute(2, 0, 1), weight, bias, _is_silu(activation), order).permute(1, 2, 0)


def has_causal_conv1d() -> bool:
    return causal_conv1d_fn() is not None


def resolve_conv_backend(name: Optional[str], device=None) -> str:
    name = name or os.environ.get(BACKEND_ENV_VAR) or 'auto'
    if name == 'auto':
        if torch.compiler.is_exporting():
            return 'reference'  # F.conv1d: a grouped Conv in ONNX
        kind = torch.device(device).type if device is not None else 'cpu'
        if kind == 'cuda':  # triton_support.CUDA_AUTO_BACKENDS holds the order
            return triton_support.cuda_auto_choice('conv', {'causal_conv1d': has_causal_conv1d, 'torch': lambda: True})
        return 'cpu_kernel' if kind == 'cpu' else 'torch'
    if name not in CONV_BACKENDS:
        raise ValueError(
            f"unknown causal-conv1d backend {name!r} (from the conv_backend argument or ${BACKEND_ENV_VAR}); "
            f"choose one of: auto, {', '.join(CONV_BACKENDS)}")
    return name


def causal_conv1d(x, weight, bias=None, activation=None, backend: Optional[str] = None,
                  order: Optional[torch.Tensor] = None):
    """x: (batch, dim, length); weight: (dim, kernel); bias: (dim,).

    ``order`` (length, paths): sequence p * batch + b of the result is x[b] read in the token order order[:, p]
    (the multi-path block's orders; see token_orders), so the result has paths * batch sequences.
    """
    name = resolve_conv_backend(backend, x.device)
    if order is not None and name not in ORDER_READING_CONVS:
        x, order = gather_channel_major(x, order), None
    if name == 'causal_conv1d':
        if not x.is_cuda:
            raise RuntimeError("conv backend 'causal_conv1d' needs CUDA tensors and pip install 'timm-rsmamba[cuda]'")
        return fused_causal_conv1d(x, weight, bias, activation)
    if name == 'reference':
        return causal_conv1d_reference(x, weight, bias, activation)
    if name == 'cpu_kernel':
        return causal_conv1d_cpu_kernel(x, weight, bias, activation, order)
    if name == 'triton':
        triton_support.require('conv', x.device, _RUNNABLE.get(x.device.type, "'auto', 'torch', 'reference'"))
        from . import triton_conv  # on first use: see triton_support
        return triton_conv.causal_conv1d_triton(x, weight, bias, activation, order)
    return causal_conv1d_torch(x, weight, bias, activation)
