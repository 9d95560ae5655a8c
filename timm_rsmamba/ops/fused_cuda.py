"""The optional fused CUDA kernels (``[cuda]`` extra: mamba-ssm, causal-conv1d) as torch.library custom ops.

Eagerly, the packages' own autograd functions run as they are. Under torch.compile those Python autograd
functions, which call CUDA extensions, would break the graph, so there they run inside custom ops with fake
(meta) implementations: the forward op calls the package's function without autograd; the backward op replays
the package's autograd.Function (its forward, which saves what its backward needs, then its backward) on a
plain context object, since autograd itself is off inside a custom op. That costs one extra forward of the
kernel per backward and uses the classes the packages' own functions use, not their low-level extension calls,
whose signatures change between releases.
"""
from typing import Callable, List, Optional

import torch

__all__ = ['mamba_ssm_fn', 'causal_conv1d_fn', 'fused_selective_scan', 'fused_causal_conv1d']


def mamba_ssm_fn() -> Optional[Callable]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # missing or broken optional extra must never break import
        return None
    return selective_scan_fn


def causal_conv1d_fn() -> Optional[Callable]:
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except Exception:  # optional extra; absence or a broken build must not break import
        return None
    return fn


def _optional(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def _register_replayed_autograd(op, backward_op, num_tensors: int):
    """``op``'s autograd: its first ``num_tensors`` inputs are saved, the one flag after them is kept, and
    ``backward_op(*saved, flag, dout)`` gives their gradients (none for the flag)."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.flag = inputs[num_tensors]

    def backward(ctx, dout):
        grads = backward_op(*ctx.saved_tensors, ctx.flag, dout)
        return (*[_optional(g) for g in grads], None)

    op.register_autograd(backward, setup_context=setup_context)


class _ReplayContext:
    """What an autograd.Function's forward and backward use of ``ctx``, without autograd."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (True,) * n_inputs

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _replay_backward(function, args, kwargs, grad_out, inputs) -> List[torch.Tensor]:
    """Gradients of ``inputs`` (the function's first arguments) from ``function``'s own forward and backward;
    an absent input's gradient is an empty tensor."""
    ctx = _ReplayContext(len(args) + len(kwargs))
    function.forward(ctx, *args, **kwargs)
    grads = function.backward(ctx, grad_out)
    return [g if g is not None else (torch.zeros_like(t) if t is not None else grad_out.new_empty(0))
            for t, g in zip(inputs, grads)]


def _package_function(module: str, name: str):
    import importlib
    return getattr(importlib.import_module(module), name)


# ---- the selective scan ----------------------------------------------------------------------------------------
@torch.library.custom_op('rsmamba::fused_selective_scan', mutates_args=())
def _scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
          D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
          softplus: bool) -> torch.Tensor:
    with torch.no_grad():
        return mamba_ssm_fn()(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=softplus)


@_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus):
    return torch.empty_like(u)


@torch.library.custom_op('rsmamba::fused_selective_scan_backward', mutates_args=())
def _scan_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                   softplus: bool, dout: torch.Tensor) -> List[torch.Tensor]:
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    function = _package_function('mamba_ssm.ops.selective_scan_interface', 'SelectiveScanFn')
    return _replay_backward(function, (*inputs, softplus), {}, dout.contiguous(), inputs)


@_scan_backward.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, dout):
    return [torch.empty_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]


_register_replayed_autograd(_scan, _scan_backward, 8)


def fused_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """mamba-ssm's ``selective_scan_fn``; under torch.compile through the custom op (no last state there)."""
    fn = mamba_ssm_fn()
    if fn is None:
        raise RuntimeError("scan backend 'mamba_ssm' needs the optional extra: pip install 'timm-rsmamba[cuda]'")
    if torch.compiler.is_compiling():
        if return_last_state:
            raise RuntimeError("scan backend 'mamba_ssm' returns no last state under torch.compile")
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)


# ---- the causal conv -------------------------------------------------------------------------------------------
@torch.library.custom_op('rsmamba::fused_causal_conv1d', mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    with torch.no_grad():
        return causal_conv1d_fn()(x, weight, bias, activation='silu' if silu else None)


@_conv.register_fake
def _(x, weight, bias, silu):
    return torch.empty_like(x)


@torch.library.custom_op('rsmamba::fused_causal_conv1d_backward', mutates_args=())
def _conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                   dout: torch.Tensor) -> List[torch.Tensor]:
    function = _package_function('causal_conv1d.causal_conv1d_interface', 'CausalConv1dFn')
    return _replay_backward(function, (x, weight, bias), dict(activation='silu' if silu else None),
                            dout.contiguous(), (x, weight, bias))


@_conv_backward.register_fake
def _(x, weight, bias, silu, dout):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else
            x.new_empty(0)]


_register_replayed_autograd(_conv, _conv_backward, 3)


def fused_causal_conv1d(x, weight, bias=None, activation=None):
    """causal-conv1d's ``causal_conv1d_fn`` (x with a unit last stride); under torch.compile through the custom op."""
    fn = causal_conv1d_fn()
    if fn is None:
        raise RuntimeError("conv backend 'causal_conv1d' needs CUDA tensors and pip install 'timm-rsmamba[cuda]'")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if torch.compiler.is_compiling():
        return _conv(x, weight, bias, activation in ('silu', 'swish'))
    return fn(x, weight, bias, activation=activation)
