"""Causal depthwise conv1d over (batch, dim, length), the Mamba mixer's short convolution.

Backends: ``triton`` (ops/triton_conv.py, the CUDA default), ``causal_conv1d`` (fused CUDA kernel from the
optional extra), ``cpu_kernel`` (the CPU default: the forward in C++, csrc/mamba_cpu.cpp, the backward as
``torch``'s), ``torch`` (shifted multiply-adds that keep the input's memory layout, every device; fused by
torch.compile for big problems on CPU and CUDA, eager otherwise) and ``reference`` (F.conv1d, the textbook
definition, for tests).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_support
from .compiled import CompiledKernels
from .cpu_kernel import CPU_KERNELS, cpu_conv_forward

BACKEND_ENV_VAR = 'RSMAMBA_CONV_BACKEND'
CONV_BACKENDS = ('triton', 'causal_conv1d', 'cpu_kernel', 'torch', 'reference')
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
    activation per conv instead of three. ``cpu_kernel``: the forward runs in C++.
    """

    @staticmethod
    def forward(ctx, x_tm, weight, bias, silu, compiled, cpu_kernel):
        ctx.save_for_backward(x_tm, weight, bias)
        ctx.silu, ctx.compiled = silu, compiled
        if cpu_kernel:
            return cpu_conv_forward(x_tm, weight, bias, silu)
        return _CONV_KERNELS('forward', x_tm, weight, bias, silu, compiled=compiled)

    @staticmethod
    def backward(ctx, dout):
        x_tm, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _CONV_KERNELS(
            'backward', x_tm, weight, bias, ctx.silu, dout.contiguous(), compiled=ctx.compiled)
        return dx, dweight, dbias, None, None, None


def causal_conv1d_torch(x, weight, bias=None, activation=None, cpu_kernel: bool = False):
    """Pure PyTorch, every device; (batch, dim, length) views of time-major tensors cost no copy.

    ``cpu_kernel``: run the forward in C++ (`causal_conv1d_cpu_kernel` decides when it can).
    """
    silu = activation in ('silu', 'swish')
    if not silu:
        _activate(x, activation)  # validates the name
    x_tm = x.permute(2, 0, 1)
    compiled = x.device.type in ('cpu', 'cuda') and x.numel() >= MIN_COMPILE_ELEMENTS
    out = _CausalConv1dTimeMajor.apply(x_tm, weight, bias, silu, compiled, cpu_kernel)
    return out.permute(1, 2, 0)


def causal_conv1d_cpu_kernel(x, weight, bias=None, activation=None):
    """`causal_conv1d_torch` with the forward in C++ (csrc/mamba_cpu.cpp): one pass, the SiLU's exp inlined.

    CPU tensors; fp32 (other dtypes, and with a warning machines where the kernel cannot be built, run
    `causal_conv1d_torch`'s forward).
    """
    if x.device.type != 'cpu':
        raise RuntimeError(f"conv backend 'cpu_kernel' runs on CPU tensors only, got {x.device.type}; "
                           f"use 'auto', 'torch' or 'causal_conv1d' on this device")
    fp32 = all(t is None or t.dtype == torch.float32 for t in (x, weight, bias))
    usable = fp32 and CPU_KERNELS.load() is not None
    return causal_conv1d_torch(x, weight, bias, activation, cpu_kernel=usable)


def _fused_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # optional extra; absence or a broken build must not break import
        return None
    return causal_conv1d_fn


def has_causal_conv1d() -> bool:
    return _fused_fn() is not None


def resolve_conv_backend(name: Optional[str], device=None) -> str:
    name = name or os.environ.get(BACKEND_ENV_VAR) or 'auto'
    if name == 'auto':
        kind = torch.device(device).type if device is not None else 'cpu'
        if kind == 'cuda':  # triton_support.CUDA_AUTO_BACKENDS holds the order
            return triton_support.cuda_auto_choice('conv', {'causal_conv1d': has_causal_conv1d, 'torch': lambda: True})
        return 'cpu_kernel' if kind == 'cpu' else 'torch'
    if name not in CONV_BACKENDS:
        raise ValueError(
            f"unknown causal-conv1d backend {name!r} (from the conv_backend argument or ${BACKEND_ENV_VAR}); "
            f"choose one of: auto, {', '.join(CONV_BACKENDS)}")
    return name


def causal_conv1d(x, weight, bias=None, activation=None, backend: Optional[str] = None):
    """x: (batch, dim, length); weight: (dim, kernel); bias: (dim,)."""
    name = resolve_conv_backend(backend, x.device)
    if name == 'causal_conv1d':
        fn = _fused_fn()
        if fn is None or not x.is_cuda:
            raise RuntimeError("conv backend 'causal_conv1d' needs CUDA tensors and pip install 'timm-rsmamba[cuda]'")
        return fn(x if x.stride(-1) == 1 else x.contiguous(), weight, bias, activation=activation)
    if name == 'reference':
        return causal_conv1d_reference(x, weight, bias, activation)
    if name == 'cpu_kernel':
        return causal_conv1d_cpu_kernel(x, weight, bias, activation)
    if name == 'triton':
        triton_support.require('conv', x.device, _RUNNABLE.get(x.device.type, "'auto', 'torch', 'reference'"))
        from . import triton_conv  # on first use: see triton_support
        return triton_conv.causal_conv1d_triton(x, weight, bias, activation)
    return causal_conv1d_torch(x, weight, bias, activation)
