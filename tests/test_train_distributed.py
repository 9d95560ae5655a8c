"""``torchrun --nproc_per_node 2`` on CPU (gloo): both ranks end with identical weights, and validation
gathered across ranks (with the sampler's padding removed) equals an independent single-process evaluation.
"""
import csv
import os
import re
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ['class0', 'class1', 'class2']
ENV_FAILURES = ('Address already in use', 'errno', 'Errno', 'Connection refused', 'gloo', 'Timed out',
                'rendezvous', 'Rendezvous', 'getaddrinfo', 'Network is unreachable')


def _write_folder(root: Path, n_train=4, n_val=3):
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray((rng.random((32, 32, 3)) * 90 + c * 70).astype(np.uint8)).save(d / f'{i}.tif')
    return root


def _torchrun():
    exe = shutil.which('torchrun')
    return [exe] if exe else [sys.executable, '-m', 'torch.distributed.run']


def test_torchrun_two_ranks_identical_weights_and_gathered_metrics(tmp_path):
    data = _write_folder(tmp_path / 'd')  # 9 val images over 2 ranks: the sampler pads one duplicate
    cmd = [*_torchrun(), '--standalone', '--nproc_per_node', '2', str(ROOT / 'train.py'), str(data),
           '--model', 'rsmamba_small', '--model-kwargs', 'depth=2', 'img_size=32', 'embed_dim=32',
           'intermediate_size=64', '--device', 'cpu', '-b', '2', '-vb', '2', '-j', '0', '--epochs', '2',
           '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0', '--mixup', '0.5', '--eval-metric', 'f1',
           '--output', str(tmp_path), '--experiment', 'ddp']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if 'Traceback' not in log.split('train.py')[-1] and any(s in log for s in ENV_FAILURES):
            pytest.skip(f'torchrun could not start processes here: {log[-500:]}')
        pytest.fail(log[-3000:])

    digests = dict(re.findall(r'Rank (\d) final weights sha256: ([0-9a-f]{64})', log))
    assert set(digests) == {'0', '1'}, log[-2000:]
    assert digests['0'] == digests['1']
    assert 'Distributed training: process 1 of 2' in log or 'process 1 of 2' in log

    out = tmp_path / 'ddp'
    ckpt = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)
    with open(out / 'summary.csv') as f:
        last = list(csv.DictReader(f))[-1]

    # independent single-process evaluation of the saved weights over all 9 images, each counted once
    from sklearn.metrics import accuracy_score, f1_score
    cfg = ckpt['pretrained_cfg']
    model = timm.create_model('rsmamba_small', num_classes=3, **ckpt['model_kwargs'])
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    tf = create_transform(cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'],
                          std=cfg['std'], crop_pct=cfg['crop_pct'], is_training=False)
    preds, targets = [], []
    with torch.no_grad():
        for idx, name in enumerate(CLASSES):
            for f in sorted((data / 'val' / name).iterdir()):
                preds.append(int(model(tf(Image.open(f).convert('RGB')).unsqueeze(0)).argmax(1)))
                targets.append(idx)
    acc = accuracy_score(targets, preds)
    f1 = f1_score(targets, preds, average='macro', zero_division=0)
    top1, ef1 = float(last['eval_top1']), float(last['eval_f1'])
    scale = 100. if top1 > 1.0 + 1e-9 or ef1 > 1.0 + 1e-9 else 1.
    assert top1 / scale == pytest.approx(acc, abs=1e-6)
    assert ef1 / scale == pytest.approx(f1, abs=1e-6)
