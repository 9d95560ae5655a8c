"""validate.py and inference.py end to end on a tiny synthetic .tif folder with a tiny RSMamba checkpoint.

The reference is computed here independently: torchvision transforms + the model's forward + scikit-learn
metrics, with targets mapped to the checkpoint's class order by hand.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import precision_recall_fscore_support
from torchvision import transforms as T

import timm_rsmamba  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import inference  # noqa: E402
import validate  # noqa: E402

TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)
FOLDER_CLASSES = ['airplane', 'beach', 'river']  # alphabetical, as ImageFolder indexes them
MODEL_CLASSES = ['river', 'airplane', 'beach']  # the checkpoint's (non-alphabetical) order
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('vi')
    rng = np.random.default_rng(0)
    for split, n in (('train', 1), ('val', 4)):
        for ci, cls in enumerate(FOLDER_CLASSES):
            for i in range(n + (ci == 0 and split == 'val')):  # 13 val images: uneven over 2 ranks
                side = 40 if i % 2 else 36
                arr = rng.integers(0, 120, (side, side, 3), dtype=np.uint8)
                arr[..., ci] += 120
                path = root / 'data' / split / cls / f'{cls}{i}.tif'
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    torch.manual_seed(0)
    model = timm.create_model('rsmamba_small', num_classes=3, **TINY)
    with torch.no_grad():  # make the head decisive so predictions vary between images
        model.head.weight.mul_(20)
    cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear', mean=MEAN, std=STD,
               label_names=tuple(MODEL_CLASSES), num_classes=3)
    torch.save({'state_dict': model.state_dict(), 'arch': 'rsmamba_small', 'model_kwargs': TINY,
                'label_names': MODEL_CLASSES, 'num_classes': 3, 'pretrained_cfg': cfg, 'epoch': 1},
               root / 'ckpt.pth.tar')
    return root


def _reference(workdir, split='val'):
    """Independent predictions: torchvision eval transform + the checkpoint's model; targets by class name."""
    model = timm.create_model('rsmamba_small', num_classes=3, **TINY)
    model.load_state_dict(torch.load(workdir / 'ckpt.pth.tar', weights_only=False)['state_dict'])
    model.eval()
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    files = sorted((workdir / 'data' / split).rglob('*.tif'))
    x = torch.stack([tf(Image.open(f).convert('RGB')) for f in files])
    with torch.no_grad():
        logits = model(x)
    targets = np.array([MODEL_CLASSES.index(f.parent.name) for f in files])
    return files, logits, targets


def _run_validate(args):
    return validate.main([str(a) for a in args] + ['-j', '0', '--device', 'cpu'])


def test_validate_maps_class_order_and_matches_reference(workdir, tmp_path):
    files, logits, targets = _reference(workdir)
    preds = logits.argmax(1).numpy()
    assert len(set(preds.tolist())) > 1, 'degenerate reference: every image gets the same class'
    p, r, f, _ = precision_recall_fscore_support(targets, preds, labels=[0, 1, 2], average='macro', zero_division=0)
    cm_png, res_json = tmp_path / 'cm.png', tmp_path / 'res.json'
    results = _run_validate([workdir / 'data', '--split', 'val', '--checkpoint', workdir / 'ckpt.pth.tar',
                             '--confusion-matrix', cm_png, '--results-file', res_json, '--results-format', 'json'])
    assert results['top1'] == pytest.approx(100 * np.mean(preds == targets), abs=1e-3)
    assert results['macro_precision'] == pytest.approx(100 * p, abs=1e-3)
    assert results['macro_recall'] == pytest.approx(100 * r, abs=1e-3)
    assert results['macro_f1_score'] == pytest.approx(100 * f, abs=1e-3)
    # without the name mapping (alphabetical targets) the numbers differ: the test detects a mislabel
    alpha_targets = np.array([FOLDER_CLASSES.index(f.parent.name) for f in files])
    assert np.mean(preds == alpha_targets) != np.mean(preds == targets)
    assert cm_png.read_bytes()[:4] == b'\x89PNG'
    saved = json.loads(res_json.read_text())
    assert [c['class'] for c in saved['per_class']] == MODEL_CLASSES
    assert [c['support'] for c in saved['per_class']] == [4, 5, 4]
    assert saved['num_images'] == 13

    csv_path = tmp_path / 'res.csv'
    _run_validate([workdir / 'data', '--split', 'val', '--checkpoint', workdir / 'ckpt.pth.tar',
                   '--results-file', csv_path])
    row = pd.read_csv(csv_path).iloc[0]
    assert row['macro_f1_score'] == pytest.approx(100 * f, abs=1e-3) and row['top5'] == 100.


def test_validate_unmatched_class_names_is_a_clear_error(workdir, tmp_path, caplog):
    data = tmp_path / 'renamed'
    shutil.copytree(workdir / 'data' / 'val', data / 'val')
    (data / 'val' / 'beach').rename(data / 'val' / 'seaside')
    with pytest.raises(SystemExit) as e:
        _run_validate([data, '--split', 'val', '--checkpoint', workdir / 'ckpt.pth.tar'])
    assert e.value.code == 2
    assert "'seaside'" in caplog.text and "'beach'" in caplog.text and '--class-map' in caplog.text


def test_validate_wrong_num_classes_is_a_clear_error(workdir, caplog):
    with pytest.raises(SystemExit):
        _run_validate([workdir / 'data', '--split', 'val', '--checkpoint', workdir / 'ckpt.pth.tar',
                       '--num-classes', '5'])
    assert '3-class head' in caplog.text and '5 classes' in caplog.text


def test_validate_local_hf_imagefolder_offline(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
    files, logits, targets = _reference(workdir)
    preds = logits.argmax(1).numpy()
    results = _run_validate(['--dataset', f'hfds/{workdir / "data"}', '--split', 'validation',
                             '--checkpoint', workdir / 'ckpt.pth.tar', '--data-dir', tmp_path / 'hf_cache'])
    assert results['num_images'] == 13
    assert results['top1'] == pytest.approx(100 * np.mean(preds == targets), abs=1e-3)
    assert results['_label_names'] == MODEL_CLASSES


def test_inference_folder_and_files(workdir, tmp_path, capsys):
    files, logits, _ = _reference(workdir)
    out = tmp_path / 'pred'
    df = inference.main([str(workdir / 'data' / 'val'), '--checkpoint', str(workdir / 'ckpt.pth.tar'),
                         '--topk', '2', '--include-index', '--results-dir', str(out), '--results-file', 'p',
                         '--results-format', 'csv', 'json', 'parquet', '-j', '0', '--device', 'cpu'])
    assert '--result' in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {'p.csv', 'p.json', 'p.parquet'}
    assert len(df) == len(files)
    probs = logits.softmax(-1)
    by_name = {f.name: i for i, f in enumerate(files)}
    for _, row in df.iterrows():
        i = by_name[row['filename']]
        top = probs[i].topk(2)
        assert list(row['index']) == top.indices.tolist()
        assert list(row['label']) == [MODEL_CLASSES[j] for j in top.indices.tolist()]
        np.testing.assert_allclose(row['prob'], top.values.numpy(), rtol=1e-4)
    assert len(pd.read_parquet(out / 'p.parquet')) == len(files)

    cmap = tmp_path / 'names.txt'
    cmap.write_text('r\na\nb\n')
    one = inference.main([str(files[0]), str(files[5]), '--checkpoint', str(workdir / 'ckpt.pth.tar'),
                          '--class-map', str(cmap), '--results-dir', str(out), '--fullname', '-j', '0',
                          '--device', 'cpu', '--no-console-results'])
    assert list(one['filename']) == [str(files[0]), str(files[5])]
    assert list(one['label']) == ['rab'[int(logits[i].argmax())] for i in (0, 5)]


def test_inference_show_dir_draws_predictions(workdir, tmp_path):
    files, logits, _ = _reference(workdir)
    show = tmp_path / 'show'
    inference.main([str(workdir / 'data' / 'val'), str(files[0]), '--checkpoint', str(workdir / 'ckpt.pth.tar'),
                    '--topk', '2', '--show-dir', str(show), '--results-dir', str(tmp_path / 'p'), '-j', '0',
                    '--device', 'cpu', '--no-console-results'])
    written = sorted(str(p.relative_to(show)) for p in show.rglob('*.png'))
    names = [str(f.relative_to(workdir / 'data' / 'val').with_suffix('.png')) for f in files]
    assert written == sorted(names + [f'{files[0].stem}.png'])  # folder inputs keep their relative names
    for f in files[:2]:
        out = Image.open(show / f.relative_to(workdir / 'data' / 'val').with_suffix('.png'))
        src = np.asarray(Image.open(f).convert('RGB'))
        factor = -(-256 // src.shape[1])  # enlarged by a whole factor to at least 256 px
        assert out.width == src.shape[1] * factor and out.height > src.shape[0] * factor
        arr = np.asarray(out)
        np.testing.assert_array_equal(arr[:src.shape[0] * factor:factor, ::factor], src)  # no normalisation
        strip = arr[src.shape[0] * factor:]
        assert (strip != strip[0, 0]).any(axis=-1).sum() > 100  # the labels are drawn under the image


def test_torchrun_two_processes_equal_single(workdir, tmp_path):
    torchrun = shutil.which('torchrun')
    if torchrun is None or not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip('torchrun / gloo backend not available in this environment')
    single = _run_validate([workdir / 'data', '--split', 'val', '--checkpoint', workdir / 'ckpt.pth.tar', '-b', '2'])
    res = tmp_path / 'dist.json'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([torchrun, '--nproc_per_node', '2', '--master_port', '29517', str(REPO / 'validate.py'),
                        str(workdir / 'data'), '--split', 'val', '--checkpoint', str(workdir / 'ckpt.pth.tar'),
                        '-b', '2', '-j', '0', '--device', 'cpu', '--results-file', str(res),
                        '--results-format', 'json'], capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads(res.read_text())
    assert dist['num_images'] == 13  # 13 images over 2 ranks: the padded duplicate is dropped
    for key in ('top1', 'top5', 'macro_precision', 'macro_recall', 'macro_f1_score'):
        assert dist[key] == single[key], key
    assert dist['confusion_matrix'] == single['_metrics']['confusion_matrix'].tolist()


def test_scripts_take_a_published_folder_as_model(workdir, tmp_path):
    """`push --dry-run` writes the hub folder; validate.py and inference.py load it as local-dir:... and agree
    with the independent reference (same weights, same class names, class order mapped by name)."""
    from timm_rsmamba import hub
    folder = hub.push(workdir / 'ckpt.pth.tar', 'someone/toy', dry_run=tmp_path / 'hub')
    files, logits, targets = _reference(workdir)
    results = _run_validate([workdir / 'data', '--split', 'val', '--model', f'local-dir:{folder}'])
    assert results['top1'] == pytest.approx(100 * np.mean(logits.argmax(1).numpy() == targets), abs=1e-3)
    df = inference.main([str(files[0]), '--model', f'local-dir:{folder}', '--results-dir', str(tmp_path / 'p'),
                         '-j', '0', '--device', 'cpu', '--no-console-results'])
    assert list(df['label']) == [MODEL_CLASSES[int(logits[0].argmax())]]
