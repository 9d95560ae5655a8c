"""Converting the authors' mmpretrain checkpoints: built here from the spec's key list with random weights."""
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from timm_rsmamba.convert import ConversionError, UnsafeCheckpointError, convert_checkpoint, load_torch_file, main
from timm_rsmamba.reference import reference_forward

ROOT = Path(__file__).resolve().parents[1]
UCM_CONFIG = ROOT / 'hf_configs' / 'rsmamba_base.ucm'
TINY = dict(depth=2, img_size=32, embed_dim=32, intermediate_size=64)
TINY_CLI = ['depth=2', 'img_size=32', 'embed_dim=32', 'intermediate_size=64']


def original_state_dict(
        depth=2, d=32, E=64, S=16, n_classes=21, grid=(4, 4), path_type='forward_reverse_shuffle_gate',
        cls_position='none', pe_type='learnable', out_type='avg_featmap', seed=0):
    """Random weights under the spec's original key names and shapes (mmpretrain ImageClassifier)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    R = math.ceil(d / 16)
    n_cls = {'none': 0, 'head_tail': 2}.get(cls_position, 1)
    sd = {'backbone.patch_embed.projection.weight': rnd(d, 3, 16, 16, std=0.05)}
    if pe_type == 'learnable':
        sd['backbone.pos_embed'] = rnd(1, grid[0] * grid[1] + n_cls, d)
    if n_cls:
        sd['backbone.cls_token'] = rnd(1, n_cls, d)
    n_paths = 1 + ('reverse' in path_type) + ('shuffle' in path_type)
    for i in range(depth):
        p = f'backbone.layers.{i}.'
        sd.update({
            p + 'in_proj.weight': rnd(2 * E, d), p + 'conv1d.weight': rnd(E, 1, 4, std=0.3),
            p + 'conv1d.bias': rnd(E), p + 'x_proj.weight': rnd(R + 2 * S, E), p + 'dt_proj.weight': rnd(E, R),
            p + 'dt_proj.bias': rnd(E), p + 'D': 1 + rnd(E), p + 'out_proj.weight': rnd(d, E),
            p + 'A_log': torch.log(torch.arange(1, S + 1.)).expand(E, S) + rnd(E, S, std=.1)})
        if path_type.endswith('gate'):
            sd[f'backbone.gate_layers.{i}.0.weight'] = rnd(n_paths, n_paths * d)
    for name in ['pre_norm', 'ln1'] + (['ln2'] if out_type == 'avg_featmap' else []):
        sd[f'backbone.{name}.weight'] = 1 + rnd(d, std=0.1)
        sd[f'backbone.{name}.bias'] = rnd(d, std=0.1)
    sd['head.fc.weight'] = rnd(n_classes, d)
    sd['head.fc.bias'] = rnd(n_classes)
    return sd


def save_original(path, sd, **meta):
    """An mmengine-style file: numpy scalars, dtypes and arrays in 'meta' (what weights_only rejects)."""
    meta = dict(epoch=np.int64(500), best_f1=np.float64(93.88), dtype=np.dtype('float32'),
                history=np.arange(3.), **meta)
    torch.save({'meta': meta, 'state_dict': sd}, path)
    return path


def ucm_labels():
    return json.loads((UCM_CONFIG / 'config.json').read_text())['label_names']


def eval_logits_vs_reference(model, sd, **opts):
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ours = model(x).double()
    seq_len = model.patch_embed.num_patches + model.num_prefix_tokens
    perms = model.shuffle_permutations(seq_len, 'cpu') if 'shuffle' in model.path_type else None
    ref = reference_forward(sd, x.double(), perms=perms, **opts)
    return (ours - ref).abs().max().item()


def test_cli_converts_numpy_meta_checkpoint_and_keeps_class_order(tmp_path):
    sd = original_state_dict()
    src = save_original(tmp_path / 'rsmamba_uc_b.pth', sd, dataset_meta={'classes': tuple(ucm_labels())})
    with pytest.raises(Exception):  # the precondition: plain weights_only refuses the numpy metadata
        torch.load(src, weights_only=True)
    out = tmp_path / 'converted'
    main([str(src), '--config', str(UCM_CONFIG), '--out', str(out), '--model-kwargs', *TINY_CLI])
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == 'ucm'  # the paper's UCM weights

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == ucm_labels()
    assert torch.equal(model.head.weight, sd['head.fc.weight'])  # row i is still class i
    assert torch.equal(model.head.bias, sd['head.fc.bias'])
    assert eval_logits_vs_reference(model, sd) < 1e-5
    card = (out / 'README.md').read_text()
    assert '93.88' in card and 'UC Merced' in card and '2403.19654' in card

    # loaded directly instead, timm's safe loader refuses the metadata: the error says how to convert
    with pytest.raises(RuntimeError, match=r'python -m timm_rsmamba\.convert FILE'):
        timm.create_model('rsmamba_base.ucm', pretrained=True, pretrained_cfg_overlay=dict(file=str(src)),
                          depth=2, img_size=32, embed_dim=32, intermediate_size=64)


@pytest.mark.parametrize('cls_position,out_type', [
    ('head', 'cls_token'), ('tail', 'cls_token'), ('head_tail', 'cls_token'), ('middle', 'cls_token'),
    ('head', 'avg_featmap'), ('middle', 'avg_featmap')])
def test_class_token_variants_convert(tmp_path, cls_position, out_type):
    sd = original_state_dict(cls_position=cls_position, out_type=out_type, seed=1)
    src = save_original(tmp_path / 'orig.pth', sd)
    kwargs = dict(TINY) if cls_position == 'head_tail' else dict(TINY, cls_token_position=cls_position)
    model, _ = convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=kwargs, log=lambda *a: None)
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert loaded.cls_token_position == cls_position
    assert eval_logits_vs_reference(loaded, sd, cls_position=cls_position, out_type=out_type) < 1e-5


@pytest.mark.parametrize('path_type,pe_type', [
    ('forward', 'learnable'), ('forward_reverse_mean', 'sine'), ('forward_reverse_gate', 'none'),
    ('forward_reverse_shuffle_mean', 'learnable')])
def test_path_and_position_variants_convert(tmp_path, path_type, pe_type):
    sd = original_state_dict(path_type=path_type, pe_type=pe_type, seed=2)
    src = save_original(tmp_path / 'orig.pth', sd)
    kwargs = dict(TINY, pos_embed_type=pe_type)
    if path_type != 'forward_reverse_gate':  # the 2-way gate's shape identifies that one
        kwargs['path_type'] = path_type
    model, _ = convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=kwargs, log=lambda *a: None)
    assert model.path_type == path_type
    assert eval_logits_vs_reference(model, sd, path_type=path_type, pe_type=pe_type) < 1e-5


def test_logit_check_catches_a_wrong_mapping(tmp_path, monkeypatch):
    """Keys and shapes all fit, the math does not: only the reference comparison can notice."""
    import timm_rsmamba.convert as convert_module
    real = convert_module.convert_mmpretrain

    def swapped_norms(sd):
        out, unmatched = real(sd)
        for suffix in ('weight', 'bias'):
            out[f'norm.{suffix}'], out[f'fc_norm.{suffix}'] = out[f'fc_norm.{suffix}'], out[f'norm.{suffix}']
        return out, unmatched

    monkeypatch.setattr(convert_module, 'convert_mmpretrain', swapped_norms)
    src = save_original(tmp_path / 'orig.pth', original_state_dict())
    with pytest.raises(ConversionError, match='logits differ'):
        convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=TINY, log=lambda *a: None)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('corrupt,expected', [
    (lambda sd: sd.pop('backbone.layers.1.D'), ['missing', 'backbone.layers.1.D']),
    (lambda sd: sd.__setitem__('backbone.extra_norm.weight', torch.ones(32)), ['backbone.extra_norm.weight']),
    (lambda sd: sd.__setitem__('backbone.layers.2.D', torch.ones(64)), ['not used', 'backbone.layers.2.D']),
    (lambda sd: sd.__setitem__('backbone.pos_embed', torch.zeros(1, 17, 32)),
     ['wrong shape', 'backbone.pos_embed', '(1, 17, 32)', '(1, 16, 32)']),
    (lambda sd: sd.__setitem__('head.fc.weight', torch.zeros(30, 32)), ['head.fc.weight', '30 classes']),
])
def test_corrupted_key_sets_fail_naming_the_keys(tmp_path, corrupt, expected):
    sd = original_state_dict()
    corrupt(sd)
    src = save_original(tmp_path / 'orig.pth', sd)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=TINY, log=lambda *a: None)
    for text in expected:
        assert text in str(info.value)


def test_class_order_in_meta_must_match_the_config(tmp_path):
    labels = ucm_labels()
    src = save_original(tmp_path / 'orig.pth', original_state_dict(), dataset_meta={'classes': sorted(labels)})
    with pytest.raises(ConversionError, match='mislabelled'):
        convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=TINY, log=lambda *a: None)


def test_ambiguous_class_token_asks_for_the_position(tmp_path):
    src = save_original(tmp_path / 'orig.pth', original_state_dict(cls_position='tail', out_type='cls_token'))
    with pytest.raises(ConversionError, match='cls_token_position=head\\|tail\\|middle'):
        convert_checkpoint(src, UCM_CONFIG, tmp_path / 'out', model_kwargs=TINY, log=lambda *a: None)


class Marker:
    """A pickled object outside the allow-list; unpickling it flips a flag."""
    loaded = False

    def __setstate__(self, state):
        Marker.loaded = True
        self.__dict__.update(state)


def _fake_mmengine(monkeypatch):
    """mmengine's HistoryBuffer under its real module path, importable only while saving."""
    names = ['mmengine', 'mmengine.logging', 'mmengine.logging.history_buffer']
    modules = {n: types.ModuleType(n) for n in names}
    cls = type('HistoryBuffer', (), {'__module__': names[-1]})
    modules[names[-1]].HistoryBuffer = cls
    for n, m in modules.items():
        monkeypatch.setitem(sys.modules, n, m)
    return cls, names


def test_trust_pickle_gating(tmp_path, monkeypatch, capsys):
    marker = Marker()
    marker.note = 'x'
    src = save_original(tmp_path / 'marker.pth', original_state_dict(), extra=marker)
    Marker.loaded = False
    with pytest.raises(UnsafeCheckpointError, match='test_convert.Marker.*--trust-pickle'):
        load_torch_file(src)
    assert not Marker.loaded
    with pytest.raises(SystemExit, match='--trust-pickle'):
        main([str(src), '--config', str(UCM_CONFIG), '--out', str(tmp_path / 'a'), '--model-kwargs', *TINY_CLI])
    assert not Marker.loaded and not (tmp_path / 'a').exists()

    with pytest.warns(UserWarning, match='trust-pickle'):
        main([str(src), '--config', str(UCM_CONFIG), '--out', str(tmp_path / 'b'), '--trust-pickle',
              '--model-kwargs', *TINY_CLI])
    assert Marker.loaded and (tmp_path / 'b' / 'model.safetensors').is_file()
    assert 'WARNING' in capsys.readouterr().out

    # mmengine objects in the metadata, mmengine not installed: refused safely, loaded as inert placeholders
    history_cls, names = _fake_mmengine(monkeypatch)
    buf = history_cls()
    buf.values = [1.0, 2.0]
    src = save_original(tmp_path / 'mm.pth', original_state_dict(), message_hub={'loss': buf})
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    with pytest.raises(UnsafeCheckpointError, match='mmengine.logging.history_buffer.HistoryBuffer'):
        load_torch_file(src)
    with pytest.warns(UserWarning):
        ckpt = load_torch_file(src, trust_pickle=True, log=lambda *a: None)
    assert ckpt['meta']['message_hub']['loss']._state == {'values': [1.0, 2.0]}
    assert torch.equal(ckpt['state_dict']['head.fc.bias'], original_state_dict()['head.fc.bias'])
