"""train.py end to end on tiny synthetic data: outputs, exact resume, HF datasets, and each bad input.

References are independent of the training code: weights are compared tensor by tensor, and the validation
metric a checkpoint was ranked by is recomputed from its weights with timm's eval transform + scikit-learn.
"""
import csv
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_rsmamba  # noqa: F401
from timm.data import create_transform

from timm_rsmamba.data import DataError
from timm_rsmamba.malloc import LEAN_TUNABLES
from timm_rsmamba.training import CheckpointError, ConfigError, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / 'train.py'
TINY_MODEL = ['--model', 'rsmamba_small', '--model-kwargs', 'depth=2', 'img_size=32', 'embed_dim=32',
              'intermediate_size=64']
CLASSES = ['class0', 'class1', 'class2']


def _write_folder(root: Path, n_train=4, n_val=2, size=32, ext='.tif', seed=0):
    """3 classes of random RGB images whose mean colour depends on the class (so there is something to learn)."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size, 3)) * 90 + c * 70).astype(np.uint8)
                Image.fromarray(a).save(d / f'img{i}{ext}')
    return root


@pytest.fixture(scope='module')
def tif_data(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('tif'))


def _run(argv, tmp_path=None):
    args, text = parse_args([str(a) for a in argv])
    return train(args, text)


def _base(data, out, name, *extra):
    return [*([data] if data != '' else []), *TINY_MODEL, '-b', '4', '-j', '0', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '1',
            '--output', out, '--experiment', name, '--log-interval', '1', *extra]


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _reference_eval(checkpoint, data_root, split='val'):
    """Predictions of a checkpoint on a folder split, computed without timm_rsmamba.training/metrics."""
    from sklearn.metrics import accuracy_score, f1_score
    ckpt = _state(checkpoint)
    cfg = ckpt['pretrained_cfg']
    model = timm.create_model(ckpt['arch'], num_classes=len(ckpt['label_names']), **ckpt['model_kwargs'])
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    tf = create_transform(cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
                          crop_pct=cfg['crop_pct'], is_training=False)
    preds, targets = [], []
    with torch.no_grad():
        for idx, name in enumerate(ckpt['label_names']):
            for f in sorted((Path(data_root) / split / name).iterdir()):
                x = tf(Image.open(f).convert('RGB')).unsqueeze(0)
                preds.append(int(model(x).argmax(1)))
                targets.append(idx)
    return accuracy_score(targets, preds), f1_score(targets, preds, average='macro', zero_division=0)


def _as_fraction(value):
    return value / 100. if value > 1.0 + 1e-9 else value


def test_train_resume_equals_uninterrupted(tif_data, tmp_path):
    aug = ['--epochs', '3', '--model-ema', '--model-ema-decay', '0.9', '--mixup', '0.8', '--cutmix', '1.0',
           '--aa', 'original', '--vflip', '0.5', '--scale', '0.4', '1.0', '--drop-path', '0.1',
           '--sched-on-updates', '--eval-metric', 'f1']
    full = _run(_base(tif_data, tmp_path, 'full', *aug))
    part = _run(_base(tif_data, tmp_path, 'part', *aug, '--stop-epoch', '2'))
    assert _state(Path(part['output_dir']) / 'last.pth.tar')['epoch'] == 1
    resumed = _run(_base(tif_data, tmp_path, '', *aug, '--resume', Path(part['output_dir'])))
    assert resumed['output_dir'] == part['output_dir']  # continued in its own folder

    a, b = _state(tmp_path / 'full' / 'last.pth.tar'), _state(tmp_path / 'part' / 'last.pth.tar')
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f'{key}.{k} differs after resume'
    for opt_a, opt_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert full['weights_sha256'] == resumed['weights_sha256']

    out = tmp_path / 'part'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
                 'checkpoint-2.pth.tar', 'training_curves.png'):
        assert (out / name).is_file(), name
    assert not list(out.glob('*.partial*')), 'temporary files left behind'
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert {'train_loss', 'eval_top1', 'eval_top5', 'eval_f1', 'eval_precision', 'eval_recall'} <= set(rows[0])

    best = _state(out / 'model_best.pth.tar')
    f1s = [float(r['eval_f1']) for r in rows]
    assert best['metric'] == pytest.approx(max(f1s))
    assert best['epoch'] == f1s.index(max(f1s))  # ties keep the earlier epoch
    assert best['label_names'] == CLASSES
    cfg = best['pretrained_cfg']
    assert tuple(cfg['input_size']) == (3, 32, 32) and cfg['label_names'] == tuple(CLASSES)
    assert len(cfg['mean']) == 3 and cfg['interpolation'] and cfg['crop_pct']
    assert best['model_kwargs']['depth'] == 2
    assert best['metrics']['f1'] == pytest.approx(best['metric'])  # the best epoch's full metrics ride along

    from timm_rsmamba import hub
    card = (hub.push(out / 'model_best.pth.tar', 'someone/toy', dry_run=tmp_path / 'hub') / 'README.md').read_text()
    for text in ('Macro F1', 'Macro precision', 'Macro recall', 'Top-1 accuracy', tif_data.name):
        assert text in card, text


def test_eval_metrics_match_independent_reference(tif_data, tmp_path):
    res = _run(_base(tif_data, tmp_path, 'ref', '--epochs', '2', '--eval-metric', 'f1', '--smoothing', '0'))
    out = Path(res['output_dir'])
    with open(out / 'summary.csv') as f:
        last = list(csv.DictReader(f))[-1]
    acc, f1 = _reference_eval(out / 'last.pth.tar', tif_data)
    assert _as_fraction(float(last['eval_top1'])) == pytest.approx(acc, abs=1e-6)
    assert _as_fraction(float(last['eval_f1'])) == pytest.approx(f1, abs=1e-6)
    ckpt = _state(out / 'last.pth.tar')
    model = timm.create_model('rsmamba_small', num_classes=3, **ckpt['model_kwargs'])
    model.load_state_dict(ckpt['state_dict'])  # checkpoint is loadable from its own keys


def test_config_file_defaults_and_overrides(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('opt: adamw\nlr: 0.003\nmodel_kwargs: {depth: 2}\nscale: [0.4, 1.0]\n')
    args, text = parse_args(['-c', str(cfg), 'some/dir', '--lr', '0.01'])
    assert args.opt == 'adamw' and args.lr == 0.01 and args.model_kwargs == {'depth': 2}
    assert args.scale == [0.4, 1.0] and args.data_dir == 'some/dir'
    assert 'lr: 0.01' in text
    bad = tmp_path / 'bad.yaml'
    bad.write_text('learning_rate: 0.1\n')
    with pytest.raises(SystemExit):
        parse_args(['-c', str(bad), 'x'])


@pytest.mark.parametrize('name', ['ucm', 'aid', 'nwpu'])
def test_paper_configs_parse(name):
    from timm_rsmamba.models._datasets import normalization
    for size in ('base', 'large', 'huge'):
        args, _ = parse_args(['-c', str(ROOT / 'configs' / f'rsmamba_{size}_{name}.yaml'), 'd'])
        assert args.model == f'rsmamba_{size}.{name}'
        assert (args.opt, args.lr, args.weight_decay, args.weight_decay_all) == ('adamw', 5e-4, 0.05, True)
        assert args.epochs + args.warmup_epochs == 500 and args.warmup_prefix
        assert args.warmup_lr == pytest.approx(5e-4 * 1e-3) and args.min_lr == 1e-5
        assert (args.mixup, args.cutmix, args.smoothing) == (0.8, 1.0, 0.1)
        assert args.scale == [0.4, 1.0] and args.hflip == 0.5 and args.vflip == 0.5 and args.aa == 'original'
        assert args.eval_metric == 'f1' and args.interpolation == 'bicubic' and args.crop_pct == 0.875
        mean, std = normalization(name)
        assert args.mean == pytest.approx(list(mean), abs=1e-6) and args.std == pytest.approx(list(std), abs=1e-6)


@pytest.mark.slow
def test_readme_main_job_runs_on_the_shipped_sample(tmp_path):
    """The README's third command, shortened to 2 epochs, through the real CLI."""
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), 'sample_data/ucmerced', '-c', 'configs/quickstart.yaml', '--epochs', '2',
         '--warmup-epochs', '1', '--output', str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert 'Test: 42 images' in log and 'macro P/R/F1' in log and 'ETA' in log
    out = tmp_path / 'quickstart'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'training_curves.png'):
        assert (out / name).is_file(), name
    assert len(_state(out / 'last.pth.tar')['label_names']) == 21


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='--malloc lean needs glibc')
def test_grad_checkpointing_restarts_once_with_lean_malloc(tmp_path):
    """--malloc auto with --grad-checkpointing: train.py re-runs itself with GLIBC_TUNABLES, exactly once."""
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), 'sample_data/ucmerced', '-c', 'configs/quickstart.yaml', '--epochs', '1',
         '--warmup-epochs', '0', '--grad-checkpointing', '--output', str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert log.count('restarting with GLIBC_TUNABLES=' + LEAN_TUNABLES) == 1
    assert 'malloc thresholds: lean (--malloc auto)' in log
    assert (tmp_path / 'quickstart' / 'last.pth.tar').is_file()


# ---------------------------------------------------------------------------------------------- bad inputs

def test_missing_data_dir(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(Exception, match='nope'):
        _run(_base(missing, tmp_path, 'x', '--epochs', '1'))


def test_empty_data_dir(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(Exception, match='empty'):
        _run(_base(empty, tmp_path, 'x', '--epochs', '1'))


def test_num_classes_disagrees_with_data(tif_data, tmp_path):
    with pytest.raises(Exception, match=r'(?s)(5.*3|3.*5)'):
        _run(_base(tif_data, tmp_path, 'x', '--epochs', '1', '--num-classes', '5'))


def test_unknown_model_cli_message(tif_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), str(tif_data), '--model', 'rsmamba_smal', '--epochs', '1', '-j', '0',
         '--output', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rsmamba_smal" in proc.stderr and 'rsmamba_small' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_val_classes_differ_from_train(tmp_path):
    data = _write_folder(tmp_path / 'd')
    for f in (data / 'val' / 'class1').iterdir():
        f.unlink()
    (data / 'val' / 'class1').rmdir()
    with pytest.raises(Exception, match='class1'):
        _run(_base(data, tmp_path, 'x', '--epochs', '1'))


def test_unsplit_folder_warns_that_validation_sees_training_images(tmp_path, caplog):
    data = _write_folder(tmp_path / 'd') / 'train'  # class folders only, no train/ val/
    with caplog.at_level(logging.WARNING):
        _run(_base(data, tmp_path, 'x', '--epochs', '1'))
    assert 'measure fit to the training images' in caplog.text and 'timm_rsmamba.data.split' in caplog.text


def test_grayscale_training_and_unsupported_band_count(tif_data, tmp_path):
    out = _run(_base(tif_data, tmp_path, 'gray', '--epochs', '1', '--in-chans', '1'))
    assert _state(Path(out['output_dir']) / 'last.pth.tar')['state_dict']['patch_embed.proj.weight'].shape[1] == 1
    with pytest.raises(DataError, match=r'img0\.tif has 3 bands but --in-chans is 13'):  # the multi-band reader
        _run(_base(tif_data, tmp_path, 'ms', '--epochs', '1', '--in-chans', '13', '--mean', '0.5', '--std', '0.2'))


def test_corrupt_image_named_or_skipped(tmp_path, caplog):
    data = _write_folder(tmp_path / 'd')
    bad = data / 'train' / 'class0' / 'broken.tif'
    bad.write_bytes(b'II*\x00 this is not a tiff')
    with pytest.raises(Exception, match='broken.tif'):
        _run(_base(data, tmp_path, 'strict', '--epochs', '1'))
    with caplog.at_level(logging.WARNING):
        res = _run(_base(data, tmp_path, 'skip', '--epochs', '1', '--skip-corrupt'))
    assert (Path(res['output_dir']) / 'last.pth.tar').is_file()
    assert 'broken.tif' in caplog.text or 'skipped' in caplog.text.lower()


def test_initial_checkpoint_with_other_class_count(tif_data, tmp_path):
    other = timm.create_model('rsmamba_small', num_classes=5, depth=2, img_size=32, embed_dim=32,
                              intermediate_size=64)
    path = tmp_path / 'five.pth'
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match='5-class head') as e:
        _run(_base(tif_data, tmp_path, 'x', '--epochs', '1', '--initial-checkpoint', path))
    assert '--pretrained-path' in str(e.value)


def test_unknown_model_and_missing_pretrained_path(tif_data, tmp_path):
    with pytest.raises(ConfigError, match='rsmamba_smal'):
        _run(_base(tif_data, tmp_path, 'x', '--epochs', '1', '--model', 'rsmamba_smal'))
    with pytest.raises(ConfigError, match='--pretrained-path'):
        _run(_base(tif_data, tmp_path, 'x', '--epochs', '1', '--pretrained-path', tmp_path / 'none.pth'))


def test_interrupted_run_resumes_from_last_complete_checkpoint(tif_data, tmp_path, caplog):
    res = _run(_base(tif_data, tmp_path, 'run', '--epochs', '3', '--stop-epoch', '2'))
    out = Path(res['output_dir'])
    # a crash while writing (on a filesystem without atomic rename): last.pth.tar cut short, a partial
    # temporary left behind. A new inode, as a writer would make: checkpoint-N are hard links to old ones.
    last = out / 'last.pth.tar'
    head = last.read_bytes()[:1000]
    last.unlink()
    last.write_bytes(head)
    (out / 'tmp.pth.tar.123.partial').write_bytes(b'\x00' * 10)
    with caplog.at_level(logging.WARNING):
        res2 = _run(_base(tif_data, tmp_path, '', '--epochs', '3', '--resume', out))
    assert 'checkpoint-1.pth.tar' in caplog.text and 'last.pth.tar' in caplog.text
    assert _state(out / 'last.pth.tar')['epoch'] == 2
    with open(out / 'summary.csv') as f:
        assert [int(r['epoch']) for r in csv.DictReader(f)] == [0, 1, 2]
    assert res2['output_dir'] == str(out)

    for f in out.glob('*.pth.tar'):
        f.write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='no complete checkpoint'):
        _run(_base(tif_data, tmp_path, '', '--epochs', '3', '--resume', out))


# ---------------------------------------------------------------------------------------------- HF datasets

def _hf_env(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))


def test_hfds_imagefolder_offline(tmp_path, monkeypatch):
    pytest.importorskip('datasets')
    _hf_env(monkeypatch, tmp_path)
    data = _write_folder(tmp_path / 'imgf', ext='.png')
    (data / 'val').rename(data / 'validation')
    res = _run(_base('', tmp_path, 'hf_imgf', '--epochs', '1', '--dataset', f'hfds/{data}'))
    assert res['label_names'] == CLASSES
    assert (Path(res['output_dir']) / 'last.pth.tar').is_file()


def test_hfds_parquet_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip('datasets')
    _hf_env(monkeypatch, tmp_path)
    rng = np.random.default_rng(1)
    names = ['forest', 'beach', 'river']  # not alphabetical: the ClassLabel order must be kept
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=names)})
    root = tmp_path / 'pq' / 'data'
    root.mkdir(parents=True)
    for split, n in (('train', 4), ('validation', 2)):
        images, labels = [], []
        for c in range(3):
            for _ in range(n):
                images.append(Image.fromarray((rng.random((32, 32, 3)) * 90 + c * 70).astype(np.uint8)))
                labels.append(c)
        ds = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features)
        ds.to_parquet(str(root / f'{split}-00000-of-00001.parquet'))
    res = _run(_base('', tmp_path, 'hf_pq', '--epochs', '1', '--dataset', f'hfds/{tmp_path / "pq"}'))
    assert res['label_names'] == names
    ckpt = _state(Path(res['output_dir']) / 'last.pth.tar')
    assert ckpt['label_names'] == names


@pytest.mark.slow
def test_small_model_beats_chance_on_held_out_uc_merced(shared_data, tmp_path):
    """Real data: a small RSMamba at 48 px, trained briefly on 12 UC Merced images per class, classifies
    4 other images per class far above chance (1/21), scored by the independent evaluator above."""
    from timm_rsmamba.data.split import main as split_main
    root = tmp_path / 'ucm'
    split_main([str(shared_data / 'ucmerced'), str(root), '--max-per-class', '16', '--ratios', '0.75', '0.25',
                '--seed', '0'])
    argv = [root, '--model', 'rsmamba_small', '--model-kwargs', 'depth=2', 'img_size=48', 'embed_dim=64',
            'intermediate_size=128', '--img-size', '48', '-b', '16', '-j', '0', '--opt', 'adamw', '--lr', '2e-3',
            '--weight-decay', '0.05', '--sched', 'cosine', '--epochs', '12', '--warmup-epochs', '1',
            '--hflip', '0.5', '--vflip', '0.5', '--seed', '0', '--eval-metric', 'top1', '--output', tmp_path / 'out',
            '--experiment', 'ucm', '--log-interval', '50']
    _run(argv)
    top1, f1 = _reference_eval(tmp_path / 'out' / 'ucm' / 'model_best.pth.tar', root)
    chance = 1 / 21
    assert top1 >= 3 * chance, f'top-1 {top1:.3f} on 84 held-out images is not clearly above chance {chance:.3f}'


def test_new_run_never_overwrites_an_earlier_runs_checkpoints(tif_data, tmp_path, caplog):
    first = _run(_base(tif_data, tmp_path, 'exp', '--epochs', '1'))
    before = (Path(first['output_dir']) / 'last.pth.tar').read_bytes()
    with caplog.at_level(logging.WARNING):
        second = _run(_base(tif_data, tmp_path, 'exp', '--epochs', '1', '--seed', '1'))
    assert Path(second['output_dir']) == tmp_path / 'exp-1'
    assert (Path(first['output_dir']) / 'last.pth.tar').read_bytes() == before
    assert 'holds checkpoints of an earlier run' in caplog.text and '--resume' in caplog.text
