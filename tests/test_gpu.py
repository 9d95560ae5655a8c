"""CUDA checks: the fused and the Triton kernels against our pure-PyTorch backends and the references, on the ops
and on the whole model.

Skipped without a GPU (the Triton ones) or without the ``[cuda]`` extra (the fused ones); on a GPU machine run
``pip install -e ".[cuda,test]" && pytest tests/test_gpu.py`` (benchmarks/gpu/ builds the extra offline).
"""
import pytest
import torch

import timm
from timm_rsmamba.ops import causal_conv1d, selective_scan
from timm_rsmamba.ops.conv import causal_conv1d_reference, has_causal_conv1d
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
@pytest.mark.parametrize('scan_backend,conv_backend', [('compiled', 'torch'), ('triton', 'triton')])
def test_fused_scan_and_conv_match_ours(scan_backend, conv_backend):
    """mamba-ssm / causal-conv1d against pure PyTorch and against the Triton kernels: values and gradients
    (300 positions: several chunks of the Triton scan)."""
    x = _cuda_inputs(2, 32, 300, 16)
    fused = selective_scan(**x, delta_softplus=True, backend='mamba_ssm')
    ours = selective_scan(**x, delta_softplus=True, backend=scan_backend)
    _assert_rel_close(fused, ours, 1e-4, 'scan output')
    g_fused, g_ours = _grads(fused, x), _grads(ours, x)
    for k in g_fused:
        _assert_rel_close(g_fused[k], g_ours[k], 1e-4, f'scan grad {k}')
    u = torch.randn(2, 32, 300, device='cuda')
    w, b = torch.randn(32, 4, device='cuda'), torch.randn(32, device='cuda')
    _assert_rel_close(causal_conv1d(u, w, b, 'silu', backend='causal_conv1d'),
                      causal_conv1d(u, w, b, 'silu', backend=conv_backend), 1e-5, 'conv output')


def _twin_models(*backends):
    """rsmamba_small (2 blocks, 64 px) on CUDA in eval mode (fixed shuffle permutations) with the same weights,
    once per (scan, conv) backend pair."""
    torch.manual_seed(0)
    models = [timm.create_model('rsmamba_small', scan_backend=scan, conv_backend=conv, num_classes=21, img_size=64,
                                depth=2) for scan, conv in backends]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return [model.cuda().eval() for model in models]


@needs_cuda
@needs_extra
def test_model_fused_vs_pure_pytorch_logits_and_grads():
    """Same weights, eval mode (fixed shuffle permutations): logits and every parameter gradient agree."""
    fused, ours = _twin_models(('mamba_ssm', 'causal_conv1d'), ('compiled', 'torch'))
    x = torch.randn(4, 3, 64, 64, device='cuda')
    logits = {}
    for name, model in (('fused', fused), ('ours', ours)):
        logits[name] = model(x)
        logits[name].logsumexp(-1).sum().backward()
    _assert_rel_close(logits['fused'], logits['ours'], 1e-4, 'logits')
    ours_params = dict(ours.named_parameters())
    for name, p in fused.named_parameters():
        _assert_rel_close(p.grad, ours_params[name].grad, 1e-4, f'grad {name}')


# ---- the Triton kernels on CUDA (tests/test_triton.py runs its fp32 checks on CUDA too, compiled) -------------

def _time_major_cuda(*shape, dtype=torch.float32, **kw):
    """make_inputs as the mixer passes them: (batch, dim, L) views of time-major storage, on CUDA, as leaves."""
    out = {}
    for k, v in make_inputs(*shape, **kw).items():
        if v is not None:
            v = v.permute(2, 0, 1).contiguous().permute(1, 2, 0) if v.dim() == 3 else v
            v = v.to('cuda', dtype if k not in ('A', 'D', 'delta_bias') else torch.float32).requires_grad_()
        out[k] = v
    return out


def _fp32_copy(inputs):
    return {k: v.detach().float().requires_grad_() if v is not None else None for k, v in inputs.items()}


@needs_cuda
def test_triton_scan_bf16_inputs_match_fp32_reference():
    """bf16 u, delta, B, C, z read as they are (no fp32 copies), fp32 math: within bf16 rounding of the fp32
    reference computed from the same (rounded) inputs, in values and every gradient."""
    x = _time_major_cuda(4, 64, 300, 16, dtype=torch.bfloat16)
    out = selective_scan(**x, delta_softplus=True, backend='triton')
    assert out.dtype == torch.bfloat16
    x32 = _fp32_copy(x)
    ref = selective_scan_reference(**x32, delta_softplus=True)
    _assert_rel_close(out, ref, 1e-2, 'output')
    weight = torch.randn_like(ref)
    g = _grads(out.float() * weight, x)
    g_ref = _grads(ref * weight, x32)
    for k in g_ref:
        assert g[k].dtype == x[k].dtype
        _assert_rel_close(g[k], g_ref[k], 3e-2, f'grad {k}')


@needs_cuda
def test_triton_conv_bf16_matches_fp32_reference():
    x_tm = torch.randn(300, 4, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 4, device='cuda', requires_grad=True)
    b = torch.randn(64, device='cuda', requires_grad=True)
    out = causal_conv1d(x_tm.permute(1, 2, 0), w, b, 'silu', backend='triton')
    assert out.dtype == torch.bfloat16
    x32 = x_tm.detach().float().requires_grad_()
    ref = causal_conv1d_reference(x32.permute(1, 2, 0), w, b, 'silu')
    _assert_rel_close(out, ref, 1e-2, 'output')
    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out.float() * weight).sum(), (x_tm, w, b))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (x32, w, b))
    for name, g, g_ref in zip(('x', 'weight', 'bias'), grads, grads_ref):
        _assert_rel_close(g, g_ref, 2e-2, f'grad {name}')


@needs_cuda
@pytest.mark.parametrize('token_order', ['kernel', 'gather'])
def test_model_triton_vs_reference_fp32_and_bf16_autocast(monkeypatch, token_order):
    """rsmamba_small (2 blocks, 64 px): logits and every parameter gradient, fp32 (tight) and bf16 autocast (loose)."""
    monkeypatch.setenv('RSMAMBA_TOKEN_ORDER', token_order)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # the patch conv: same rounding in both models
    ref, tri = _twin_models(('reference', 'reference'), ('triton', 'triton'))
    x = torch.randn(4, 3, 64, 64, device='cuda')
    for amp, rel in ((False, 1e-4), (True, 5e-2)):
        results = {}
        for name, model in (('ref', ref), ('tri', tri)):
            model.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits.float().logsumexp(-1).sum().backward()
            results[name] = logits.float(), {n: p.grad for n, p in model.named_parameters()}
        _assert_rel_close(results['tri'][0], results['ref'][0], rel, f'logits (amp={amp})')
        for n, g in results['ref'][1].items():
            _assert_rel_close(results['tri'][1][n], g, rel * 10 if amp else rel, f'grad {n} (amp={amp})')


@needs_cuda
def test_auto_picks_triton_on_cuda():
    from timm_rsmamba.ops import resolve_conv_backend, resolve_scan_backend
    from timm_rsmamba.ops.triton_support import cuda_probe_error
    assert cuda_probe_error() is None
    assert resolve_scan_backend('auto', torch.device('cuda')) == 'triton'
    assert resolve_conv_backend('auto', torch.device('cuda')) == 'triton'
