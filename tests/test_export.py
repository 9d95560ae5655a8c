"""torch.export and ONNX: the 'loop' scan against the sequential reference, exported graphs against eager."""
import collections
import json
import subprocess
import sys

import pytest
import torch

import timm
import timm_rsmamba  # noqa: F401
from timm_rsmamba.export import check_onnx, example_input, export_onnx, export_program, onnx_metadata
from timm_rsmamba.ops import selective_scan_reference
from timm_rsmamba.ops.scan import selective_scan_loop

TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)
LABELS = ['field', 'forest', 'harbor']


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('rsmamba_small', num_classes=len(LABELS), **dict(TINY, **kwargs)).eval()


def onnx_tools():
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(name, reason=f'{name} is in the export/test extras: pip install -e ".[test]"')


@pytest.mark.parametrize('gated', [True, False])
def test_loop_scan_matches_the_sequential_reference(gated):
    torch.manual_seed(0)
    b, d, n, length = 2, 5, 3, 9
    u, delta, z = (torch.randn(b, d, length, dtype=torch.float64, requires_grad=True) for _ in range(3))
    A = (-torch.rand(d, n, dtype=torch.float64)).requires_grad_()
    B, C = (torch.randn(b, n, length, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D, bias = (torch.randn(d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    extras = dict(D=D, z=z, delta_bias=bias, delta_softplus=True) if gated else {}
    inputs = [u, delta, A, B, C] + ([D, z, bias] if gated else [])
    outs = []
    for fn in (selective_scan_loop, selective_scan_reference):
        y, last = fn(u, delta, A, B, C, return_last_state=True, **extras)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, length, dtype=torch.float64)).sum(), inputs)
        outs.append((y, last, grads))
    (y, last, grads), (y_ref, last_ref, grads_ref) = outs
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_export_program_has_constant_permutations_a_dynamic_batch_and_reloads(tmp_path):
    model = tiny()
    program = export_program(model, example_input(model, 2), str(tmp_path / 'm.pt2'))
    ops = collections.Counter(str(n.target) for n in program.graph.nodes if n.op == 'call_function')
    assert not [op for op in ops if 'rand' in op]  # no generator, no randperm: the eval permutations are constants
    assert any('scan' in op for op in ops) and not [op for op in ops if op.startswith('rsmamba.')]
    reloaded = torch.export.load(str(tmp_path / 'm.pt2')).module()
    with torch.no_grad():
        for batch in (1, 5):
            x = example_input(model, batch)
            torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_exporting_random_shuffles_is_a_clear_error():
    model = tiny()
    x = example_input(model)
    with pytest.raises(RuntimeError, match=r'training mode: call model.eval\(\)'):
        torch.export.export(model.train(), (x,))
    model.eval().eval_shuffle = 'random'
    with pytest.raises(RuntimeError, match="eval_shuffle='random'"):
        torch.export.export(model, (x,))
    with pytest.raises(ValueError, match='eval mode'):
        export_program(tiny().train(), x)


def test_plain_onnx_export_call_runs_in_onnxruntime(tmp_path):
    onnx_tools()
    model = tiny()
    x = example_input(model, 2)
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(tmp_path / 'plain.onnx'))
    assert check_onnx(tmp_path / 'plain.onnx', model, [x]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('name,size', [('rsmamba_small', 64), ('rsmamba_base', 224)])
def test_onnx_matches_eager_with_a_dynamic_batch(tmp_path, name, size):
    onnx_tools()
    import onnx
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size).eval()
    x = example_input(model, 2)
    path = tmp_path / f'{name}.onnx'
    export_onnx(model, str(path), x, onnx_metadata(model, x, model.pretrained_cfg['label_names']))
    assert check_onnx(path, model, [example_input(model, 1), example_input(model, 3)]) < 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta['input_size'] == [3, size, size] and meta['label_names'][0] == 'harbor'
    assert meta['mean'] == pytest.approx(model.pretrained_cfg['mean'])


def test_export_command_writes_a_checked_onnx_file_with_the_checkpoints_classes(tmp_path):
    onnx_tools()
    import onnx
    model = tiny()
    cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear', mean=(0.4,) * 3, std=(0.2,) * 3,
               label_names=tuple(LABELS), num_classes=3)
    torch.save({'state_dict': model.state_dict(), 'arch': 'rsmamba_small', 'model_kwargs': TINY,
                'label_names': LABELS, 'num_classes': 3, 'pretrained_cfg': cfg}, tmp_path / 'ckpt.pth.tar')
    out = tmp_path / 'out' / 'model.onnx'
    run = subprocess.run([sys.executable, '-m', 'timm_rsmamba.export', str(tmp_path / 'ckpt.pth.tar'), '--out',
                          str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert 'onnxruntime matches PyTorch' in run.stderr
    assert 'Skipping constant folding' not in run.stderr  # the optimiser's per-block notes stay quiet
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta['label_names'] == LABELS and meta['mean'] == [0.4] * 3 and meta['interpolation'] == 'bilinear'
    assert check_onnx(out, model, [example_input(model, 4)]) < 1e-4

    bad = subprocess.run([sys.executable, '-m', 'timm_rsmamba.export', str(tmp_path / 'missing.pth.tar'), '--out',
                          str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and 'missing.pth.tar' in bad.stderr and 'Traceback' not in bad.stderr


def test_pure_pytorch_backends_compile_fullgraph_with_eager_values_and_gradients():
    """The backend devices without the C++ kernels run ('chunked'), traced whole by torch.compile."""
    model = tiny(scan_backend='chunked', conv_backend='torch')
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
