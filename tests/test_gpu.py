"""CUDA checks: the fused kernels against our pure-PyTorch backends, on the ops and on the whole model.

Skipped without a GPU or without the ``[cuda]`` extra; on a GPU machine run
``pip install -e ".[cuda,test]" && pytest tests/test_gpu.py`` (benchmarks/gpu/ builds the extra offline).
"""
import pytest
import torch

import timm
from timm_rsmamba.ops import causal_conv1d, selective_scan
from timm_rsmamba.ops.conv import has_causal_conv1d
from timm_rsmamba.ops.scan import has_mamba_ssm, selective_scan_reference

from test_ops import make_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
needs_extra = pytest.mark.skipif(
    not (has_mamba_ssm() and has_causal_conv1d()),
    reason="needs the optional extra: pip install 'timm-rsmamba[cuda]' (mamba-ssm, causal-conv1d)")


def _cuda_inputs(*shape, **kw):
    return {k: (v.cuda().requires_grad_() if v is not None else None) for k, v in make_inputs(*shape, **kw).items()}


def _grads(out, inputs):
    names = [k for k, v in inputs.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(out.square().sum(), [inputs[k] for k in names])))


def _assert_rel_close(a, b, rel, what):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)
    assert err <= rel, f'{what}: max relative difference {err:.2e} > {rel:g}'


@needs_cuda
@pytest.mark.parametrize('backend', ['compiled', 'chunked'])
def test_pure_pytorch_scan_on_cuda_matches_reference(backend):
    x = _cuda_inputs(2, 16, 77, 16)
    out = selective_scan(**x, delta_softplus=True, backend=backend)
    ref = selective_scan_reference(**x, delta_softplus=True)
    _assert_rel_close(out, ref, 1e-5, 'output')
    g, g_ref = _grads(out, x), _grads(ref, x)
    for k in g:
        _assert_rel_close(g[k], g_ref[k], 1e-4, f'grad {k}')


@needs_cuda
@needs_extra
def test_fused_scan_and_conv_match_pure_pytorch():
    x = _cuda_inputs(2, 32, 100, 16)
    fused = selective_scan(**x, delta_softplus=True, backend='mamba_ssm')
    ours = selective_scan(**x, delta_softplus=True, backend='compiled')
    _assert_rel_close(fused, ours, 1e-4, 'scan output')
    g_fused, g_ours = _grads(fused, x), _grads(ours, x)
    for k in g_fused:
        _assert_rel_close(g_fused[k], g_ours[k], 1e-4, f'scan grad {k}')
    u = torch.randn(2, 32, 100, device='cuda')
    w, b = torch.randn(32, 4, device='cuda'), torch.randn(32, device='cuda')
    _assert_rel_close(causal_conv1d(u, w, b, 'silu', backend='causal_conv1d'),
                      causal_conv1d(u, w, b, 'silu', backend='torch'), 1e-5, 'conv output')


@needs_cuda
@needs_extra
def test_model_fused_vs_pure_pytorch_logits_and_grads():
    """Same weights, eval mode (fixed shuffle permutations): logits and every parameter gradient agree."""
    kwargs = dict(num_classes=21, img_size=64, depth=2)
    torch.manual_seed(0)
    fused = timm.create_model('rsmamba_small', scan_backend='mamba_ssm', conv_backend='causal_conv1d', **kwargs)
    ours = timm.create_model('rsmamba_small', scan_backend='compiled', conv_backend='torch', **kwargs)
    ours.load_state_dict(fused.state_dict())
    fused, ours = fused.cuda().eval(), ours.cuda().eval()
    x = torch.randn(4, 3, 64, 64, device='cuda')
    logits = {}
    for name, model in (('fused', fused), ('ours', ours)):
        logits[name] = model(x)
        logits[name].logsumexp(-1).sum().backward()
    _assert_rel_close(logits['fused'], logits['ours'], 1e-4, 'logits')
    ours_params = dict(ours.named_parameters())
    for name, p in fused.named_parameters():
        _assert_rel_close(p.grad, ours_params[name].grad, 1e-4, f'grad {name}')
