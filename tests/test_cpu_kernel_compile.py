"""The C++ CPU kernels as torch.library custom ops: schema, fake (meta) implementations and autograd checked by
torch.library.opcheck, and a whole model through torch.compile(fullgraph=True) with the same logits and
gradients as eager."""
import pytest
import timm
import torch

import timm_rsmamba  # noqa: F401
from timm_rsmamba.ops.cpu_kernel import cpu_kernels_available

from conftest import TINY
from test_ops import make_inputs, token_orders

ops = torch.ops.rsmamba


@pytest.fixture(autouse=True)
def _kernels():
    if not cpu_kernels_available():
        pytest.skip('the C++ CPU kernels could not be built here')


def _time_major(x):
    """make_inputs' (batch, channels, length) tensors as the ops take them: (length, batch, channels) views."""
    return {k: (v.permute(2, 0, 1) if v is not None and v.dim() == 3 else v) for k, v in x.items()}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_scan_ops_pass_opcheck(dtype):
    x = _time_major(make_inputs(2, 20, 13, 16, dtype=dtype))
    args = [x[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
    grad_args = [t.detach().clone().requires_grad_() for t in args]
    torch.library.opcheck(ops.cpu_selective_scan_fwd, (*grad_args, True, 4, True))
    _, starts, *_ = ops.cpu_selective_scan_fwd(*args, True, 4, True)
    dout, dlast = torch.randn(13, 2, 20, dtype=dtype), torch.randn(16, 2, 20, dtype=dtype)
    torch.library.opcheck(ops.cpu_selective_scan_bwd, (*args, starts, dout, dlast, True, 4))
    dout_sums = torch.randn(2, 20, dtype=dtype)  # the gradient of the forward's sums of out
    torch.library.opcheck(ops.cpu_selective_scan_bwd, (*args, starts, dout, None, True, 4, None, None, None, dout_sums))


def test_scan_ops_reading_token_orders_pass_opcheck():
    """With z read through an order index: z is the (L, batch / paths, dim) source, dz per token order."""
    x = _time_major(make_inputs(6, 20, 13, 16))
    x['z'] = torch.randn(13, 6, 40)[:, :2, :20]  # the mixer's strides: half of xz
    order = token_orders(13)
    args = [x[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
    grad_args = [t.detach().clone().requires_grad_() for t in args]
    torch.library.opcheck(ops.cpu_selective_scan_fwd, (*grad_args, True, 4, True, order))
    _, starts, *_ = ops.cpu_selective_scan_fwd(*args, True, 4, True, order)
    dout = torch.randn(13, 6, 20)
    torch.library.opcheck(ops.cpu_selective_scan_bwd, (*args, starts, dout, None, True, 4, order))


def test_scan_ops_projecting_delta_pass_opcheck():
    """With delta_proj: delta is the low-rank dt, a slice of rows as x_proj's output gives it."""
    x = _time_major(make_inputs(2, 20, 13, 16))
    x['delta'] = torch.randn(13, 2, 3 + 32)[..., :3]
    weight = torch.randn(20, 3) * 0.5
    args = [x[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
    grad_args = [t.detach().clone().requires_grad_() for t in args]
    torch.library.opcheck(ops.cpu_selective_scan_fwd,
                          (*grad_args, True, 4, True, None, None, weight.clone().requires_grad_()))
    _, starts, *_ = ops.cpu_selective_scan_fwd(*args, True, 4, True, None, None, weight)
    dout = torch.randn(13, 2, 20)
    torch.library.opcheck(ops.cpu_selective_scan_bwd, (*args, starts, dout, None, True, 4, None, None, weight))


@pytest.mark.parametrize('with_order', [False, True])
def test_conv_ops_pass_opcheck(with_order):
    x = torch.randn(11, 3, 40)[:, :, :20]  # the mixer's strides
    w, b = torch.randn(20, 4, requires_grad=True), torch.randn(20, requires_grad=True)
    order = token_orders(11) if with_order else None
    dout = torch.randn(11, 9 if with_order else 3, 20)
    torch.library.opcheck(ops.cpu_causal_conv1d_fwd, (x.requires_grad_(), w, b, True, order))
    torch.library.opcheck(ops.cpu_causal_conv1d_bwd, (x.detach(), w.detach(), None, dout, False, order))


def test_compiled_model_fullgraph_matches_eager():
    """Default (cpu_kernel) backends: no graph break in forward or backward, logits and gradients as eager."""
    torch._dynamo.reset()
    model = timm.create_model('rsmamba_small', num_classes=5, **TINY).eval()  # eval: fixed token shuffles
    assert model.blocks[0].mixer.backend_names() == ('cpu_kernel', 'cpu_kernel')
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)
