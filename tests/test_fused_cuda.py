"""The fused-kernel wrappers as custom ops, checked on the CPU with stand-ins for the optional packages.

The stand-ins compute with the sequential references, so what is tested is the wrapping: fake implementations,
registered autograd, and torch.compile(fullgraph=True) running through the ops with the eager values and
gradients. The real kernels are checked against the references on a GPU (tests/test_gpu.py).
"""
import sys
import types

import pytest
import torch

from timm_rsmamba.ops import causal_conv1d_reference, fused_cuda, selective_scan_reference
from timm_rsmamba.ops.conv import _conv_backward
from timm_rsmamba.ops.scan import _chunk_backward


class _StandInScanFn(torch.autograd.Function):
    """mamba-ssm's SelectiveScanFn contract, computed by this package's eager chunk kernels (time-major)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        tm = [None if t is None else t.permute(2, 0, 1) for t in (u, delta, z, B, C, dout)]
        h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        du, ddelta, dz, dB, dC, dA, dD, _ = _chunk_backward(
            h0, tm[0], tm[1], tm[2], A, tm[3], tm[4], D, delta_bias, ctx.delta_softplus, tm[5], torch.zeros_like(h0))
        back = [None if t is None else t.permute(1, 2, 0) for t in (du, ddelta, dB, dC, dz)]
        d_bias = None if delta_bias is None else ddelta.sum((0, 1))
        return back[0], back[1], dA, back[2], back[3], dD, back[4], d_bias, None


class _StandInConvFn(torch.autograd.Function):
    """causal-conv1d's CausalConv1dFn contract, computed by this package's eager conv backward."""

    @staticmethod
    def forward(ctx, x, weight, bias=None, seq_idx=None, activation=None):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = activation in ('silu', 'swish')
        return causal_conv1d_reference(x, weight, bias, activation).contiguous()  # as the kernel returns it

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _conv_backward(x.permute(2, 0, 1), weight, bias, ctx.silu, dout.permute(2, 0, 1))
        return dx.permute(1, 2, 0), dweight, dbias, None, None


@pytest.fixture
def stand_ins(monkeypatch):
    """Fake mamba_ssm / causal_conv1d packages that count how often their functions run."""
    calls = {'scan': 0, 'conv': 0}

    def scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        calls['scan'] += 1
        return _StandInScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def conv_fn(x, weight, bias=None, activation=None):
        calls['conv'] += 1
        return _StandInConvFn.apply(x, weight, bias, None, activation)

    modules = {name: types.ModuleType(name) for name in (
        'mamba_ssm', 'mamba_ssm.ops', 'mamba_ssm.ops.selective_scan_interface', 'causal_conv1d',
        'causal_conv1d.causal_conv1d_interface')}
    modules['mamba_ssm'].ops = modules['mamba_ssm.ops']
    modules['mamba_ssm.ops'].selective_scan_interface = interface = modules['mamba_ssm.ops.selective_scan_interface']
    interface.selective_scan_fn, interface.SelectiveScanFn = scan_fn, _StandInScanFn
    modules['causal_conv1d'].causal_conv1d_fn = conv_fn
    modules['causal_conv1d'].causal_conv1d_interface = modules['causal_conv1d.causal_conv1d_interface']
    modules['causal_conv1d.causal_conv1d_interface'].CausalConv1dFn = _StandInConvFn
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def _inputs(b=2, d=6, n=4, length=9):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, delta, z = (torch.randn(b, d, length, **f64) for _ in range(3))
    weight, bias = torch.randn(d, 4, **f64), torch.randn(d, **f64)
    A = (-torch.rand(d, n, dtype=torch.float64)).requires_grad_()
    B, C = (torch.randn(b, n, length, **f64) for _ in range(2))
    D, delta_bias = (torch.randn(d, **f64) for _ in range(2))
    return x, weight, bias, delta, A, B, C, D, z, delta_bias


def _mixer_step(conv, scan, x, weight, bias, delta, A, B, C, D, z, delta_bias):
    u = conv(x, weight, bias, 'silu')
    return scan(u, delta, A, B, C, D, z, delta_bias, True)


def test_fused_ops_pass_torch_library_checks(stand_ins):
    x, weight, bias, delta, A, B, C, D, z, delta_bias = _inputs()
    u = x.detach().requires_grad_()
    torch.library.opcheck(fused_cuda._scan, (u, delta, A, B, C, D, z, delta_bias, True))
    torch.library.opcheck(fused_cuda._scan, (u, delta, A, B, C, None, None, None, False))
    torch.library.opcheck(fused_cuda._conv, (x, weight, bias, True))
    torch.library.opcheck(fused_cuda._conv, (x, weight, None, False))


def test_compiled_fullgraph_through_the_fused_ops_equals_the_references(stand_ins):
    inputs = _inputs()
    def scan(u, delta, A, B, C, D, z, delta_bias, softplus):
        return fused_cuda.fused_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                               delta_softplus=softplus)

    compiled = torch.compile(lambda *t: _mixer_step(fused_cuda.fused_causal_conv1d, scan, *t), fullgraph=True,
                             backend='aot_eager')
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert stand_ins == {'scan': 1, 'conv': 1}  # the forward ops called the packages' functions

    def reference_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, softplus)

    ref = _mixer_step(causal_conv1d_reference, reference_scan, *inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref)
