"""Hub round trip: save_for_hf folders, push dry runs, offline errors, and the committed hf_configs."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

import timm
from timm_rsmamba import hub
from timm_rsmamba.hub import HeadMismatchError, HubUnavailableError, UnknownModelError, create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)
LABELS = ['field', 'forest', 'harbor', 'river', 'road']
# spec table: parameters at 224 px with a 21-class head, and the hidden width d
SPEC_PARAMS = {'base': (6_381_141, 192), 'large': (16_246_549, 256), 'huge': (33_053_141, 320)}
DATAINFO = {'ucm': 'UC', 'aid': 'AID', 'nwpu': 'NWPU'}


def tiny_model(**kwargs):
    return timm.create_model(
        'rsmamba_small', num_classes=len(LABELS), path_type='forward_reverse_gate', scan_backend='reference',
        **TINY, **kwargs)


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_save_folder_round_trip(tmp_path):
    model = tiny_model(cls_token_position='head')
    data = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.9, interpolation='bilinear')
    out = hub.save_pretrained_folder(
        model, tmp_path / 'tiny', label_names=LABELS, pretrained_cfg=data, dataset='toy', split='all',
        metrics={'top1': 80.0})
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'rsmamba_small'
    assert config['num_classes'] == 5 and config['label_names'] == LABELS
    args = config['model_args']
    assert args['path_type'] == 'forward_reverse_gate' and args['cls_token_position'] == 'head'
    assert args['depth'] == 2 and args['embed_dim'] == 32 and args['intermediate_size'] == 64
    assert 'scan_backend' not in args  # runtime choice, not architecture
    assert 'pos_embed_type' not in args and 'state_size' not in args  # equal to the variant's defaults
    cfg = config['pretrained_cfg']
    assert cfg['mean'] == [0.1, 0.2, 0.3] and cfg['std'] == [0.4, 0.5, 0.6]
    assert cfg['input_size'] == [3, 32, 32] and cfg['crop_pct'] == 0.9 and cfg['interpolation'] == 'bilinear'

    loaded = create_model(f'local-dir:{out}', pretrained=True, scan_backend='reference')  # same kernel: identical
    assert type(loaded) is type(model) and loaded.pretrained_cfg['architecture'] == 'rsmamba_small'
    assert loaded.num_classes == 5 and loaded.pretrained_cfg['label_names'] == LABELS
    assert len(loaded.blocks) == 2 and loaded.path_type == 'forward_reverse_gate'
    assert loaded.cls_token_position == 'head' and loaded.embed_dim == 32
    assert tuple(loaded.pretrained_cfg['mean']) == (0.1, 0.2, 0.3)
    assert tuple(loaded.pretrained_cfg['std']) == (0.4, 0.5, 0.6)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert timm.data.resolve_input_data_config(loaded)['mean'] == (0.1, 0.2, 0.3)


def test_label_count_must_match_head(tmp_path):
    with pytest.raises(ValueError, match='4 label names for a 5-class head'):
        hub.save_pretrained_folder(tiny_model(), tmp_path / 'x', label_names=LABELS[:4])


def train_checkpoint(path, model):
    """What train.py saves."""
    torch.save({
        'epoch': 3, 'arch': 'rsmamba_small', 'state_dict': model.state_dict(), 'label_names': LABELS,
        'num_classes': 5, 'metric': 0.875, 'version': 2,
        'optimizer': torch.optim.AdamW(model.parameters()).state_dict(),
        'model_kwargs': dict(path_type='forward_reverse_gate', in_chans=3, **dict(TINY, img_size=(32, 32))),
        'pretrained_cfg': dict(mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2), input_size=(3, 32, 32), crop_pct=0.875,
                               interpolation='bicubic', crop_mode='center'),
        'args': argparse.Namespace(epochs=3, lr=5e-4, opt='adamw', weight_decay=0.05, batch_size=8,
                                   dataset='hfds/toy/scenes', eval_metric='macro_f1'),
    }, path)
    return path


def test_push_dry_run_writes_the_upload_folder(tmp_path, capsys):
    model = tiny_model()
    ckpt = train_checkpoint(tmp_path / 'model_best.pth.tar', model)
    metrics = tmp_path / 'results.json'
    metrics.write_text(json.dumps({'top1': 91.25, 'macro_precision': 90.5, 'macro_recall': 89.75,
                                   'macro_f1': 90.125, 'model': 'x'}))
    out = tmp_path / 'upload'
    hub.main(['push', str(ckpt), '--repo-id', 'someone/rsmamba-toy', '--dry-run', str(out),
              '--metrics-file', str(metrics), '--split', '70/30 per class', '--private', '--revision', 'v1'])
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'dry run' in capsys.readouterr().out

    card = (out / 'README.md').read_text()
    for text in ('Top-1 accuracy | 91.25', 'Macro precision | 90.50', 'Macro recall | 89.75', 'Macro F1 | 90.12',
                 'hfds/toy/scenes', '70/30 per class', "'hf-hub:someone/rsmamba-toy'", 'arXiv', '2403.19654',
                 'IEEE Geoscience and Remote Sensing Letters', 'lr: 0.0005'):
        assert text in card, text
    config = json.loads((out / 'config.json').read_text())
    assert config['label_names'] == LABELS
    assert config['pretrained_cfg']['mean'] == [0.3, 0.3, 0.3]
    assert 'tag' not in config['pretrained_cfg']  # not labelled '.ucm' just because that is the default cfg
    assert config['model_card']['metrics']['Macro F1'] == 90.125

    loaded = create_model(f'local-dir:{out}', pretrained=True, scan_backend='reference')
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_push_dry_run_uses_the_checkpoint_metric(tmp_path):
    ckpt = train_checkpoint(tmp_path / 'ckpt.pth.tar', tiny_model())
    out = hub.push(ckpt, 'someone/rsmamba-toy', dry_run=tmp_path / 'upload')
    assert 'Macro F1 | 0.875' in (out / 'README.md').read_text()
    args = json.loads((out / 'config.json').read_text())['model_args']
    assert args.get('in_chans', 3) == 3 and args['img_size'] == [32, 32] and args['depth'] == 2  # timm adds in_chans


def test_push_goes_through_timm_push_to_hf_hub(tmp_path, monkeypatch):
    """No network: HfApi and timm's push_to_hf_hub are stand-ins that record what push asks of them."""
    import huggingface_hub
    import timm.models
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls['api_token'] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls['create_repo'] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls['branch'] = (repo_id, branch)

    def fake_push(model, repo_id, **kwargs):
        calls['push'] = dict(kwargs, repo_id=repo_id, model_args=dict(model._model_args))
        return 'commit-url'

    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    monkeypatch.setattr(timm.models, 'push_to_hf_hub', fake_push)
    ckpt = train_checkpoint(tmp_path / 'ckpt.pth.tar', tiny_model())
    assert hub.push(ckpt, 'someone/rsmamba-toy', private=True, revision='v1') == 'commit-url'
    assert calls['api_token'] == 'hf_test_token' and calls['create_repo'] == ('someone/rsmamba-toy', True, True)
    assert calls['branch'] == ('someone/rsmamba-toy', 'v1')
    push = calls['push']
    assert push['token'] == 'hf_test_token' and push['revision'] == 'v1' and push['private'] is True
    assert push['safe_serialization'] is True
    assert push['model_config']['label_names'] == LABELS
    assert push['model_args']['path_type'] == 'forward_reverse_gate'
    assert '2403.19654' in push['model_card']['citation']


def test_push_without_token_says_how(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    ckpt = train_checkpoint(tmp_path / 'ckpt.pth.tar', tiny_model())
    with pytest.raises(HubUnavailableError, match='HF_TOKEN.*--dry-run'):
        hub.push(ckpt, 'someone/rsmamba-toy')


def test_offline_hub_name_gives_clear_error(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(HubUnavailableError) as info:
        create_model('hf-hub:rsmamba-tests/not-a-cached-repo', pretrained=True)
    message = str(info.value)
    assert 'rsmamba-tests/not-a-cached-repo' in message and 'HF_HUB_OFFLINE' in message
    assert "local-dir:" in message and 'pretrained_cfg_overlay=dict(file=' in message


def test_unknown_name_lists_rsmamba_models():
    with pytest.raises(UnknownModelError, match='rsmamba_base.*rsmamba_huge.*rsmamba_base.aid'):
        create_model('rsmamba_medium')
    with pytest.raises(UnknownModelError, match='rsmamba_base.nwpu'):
        create_model('rsmamba_base.imagenet')


def test_head_mismatch_is_explained(tmp_path):
    weights = tmp_path / 'w.pth'
    torch.save(tiny_model().state_dict(), weights)
    with pytest.raises(HeadMismatchError, match='5 classes.*num_classes=21.*num_classes=5'):
        create_model('rsmamba_small.ucm', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                     path_type='forward_reverse_gate', **TINY)


def read_datainfo_independently(folder: Path):
    names = (folder / 'cls_names.txt').read_text().split('\n')
    numbers = [float(v) for v in re.findall(r'[-+]?\d+\.\d*(?:[eE][-+]?\d+)?', (folder / 'meanstd.txt').read_text())]
    return [n.strip() for n in names if n.strip()], [v / 255 for v in numbers[:3]], [v / 255 for v in numbers[3:6]]


@pytest.mark.parametrize('name', [f'rsmamba_{s}.{d}' for s in SPEC_PARAMS for d in DATAINFO])
def test_hf_config_builds_its_model(name):
    folder = ROOT / 'hf_configs' / name
    config = json.loads((folder / 'config.json').read_text())
    size, tag = name[len('rsmamba_'):].split('.')
    assert config['architecture'] == f'rsmamba_{size}'
    assert config['num_classes'] == len(config['label_names']) == {'ucm': 21, 'aid': 30, 'nwpu': 45}[tag]
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 224, 224] and cfg['interpolation'] == 'bicubic'
    assert cfg['crop_pct'] == 224 / 256 and cfg['crop_mode'] == 'center'
    assert cfg['license'] == 'apache-2.0' and '2403.19654' in cfg['paper_ids']
    model = timm.create_model(f'local-dir:{folder}', device='meta')
    assert model.num_classes == model.head.out_features == config['num_classes']
    assert model.pretrained_cfg['label_names'] == config['label_names']
    params, d = SPEC_PARAMS[size]
    n = config['num_classes']
    assert sum(p.numel() for p in model.parameters()) == params + (n - 21) * (d + 1)


@pytest.mark.parametrize('tag', list(DATAINFO))
def test_hf_config_labels_and_stats_follow_datainfo(shared_data, tag):
    labels, mean, std = read_datainfo_independently(shared_data / 'rsmamba_datainfo' / DATAINFO[tag])
    for size in SPEC_PARAMS:
        config = json.loads((ROOT / 'hf_configs' / f'rsmamba_{size}.{tag}' / 'config.json').read_text())
        assert config['label_names'] == labels  # cls_names.txt order, not alphabetical
        assert config['pretrained_cfg']['mean'] == pytest.approx(mean, abs=1e-12)
        assert config['pretrained_cfg']['std'] == pytest.approx(std, abs=1e-12)


def test_committed_configs_match_the_generator(shared_data, tmp_path):
    written = hub.make_configs(tmp_path, shared_data / 'rsmamba_datainfo')
    assert len(written) == 9
    for path in written:
        committed = ROOT / 'hf_configs' / path.parent.name / 'config.json'
        assert json.loads(path.read_text()) == json.loads(committed.read_text()), committed
