"""Multi-band (Sentinel-2 style) data end to end, on synthetic GeoTIFF chips written here with tifffile.

References are independent of the code under test: the arrays written to the files, numpy statistics, torch
ops applied by hand (resize, flips, rotations, normalisation), timm's adapt_input_conv rule restated, timm's
resample_abs_pos_embed, and PIL pixels.
"""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_rsmamba  # noqa: F401
from timm_rsmamba.data import BandSpec, DataError, create_rs_dataset, multiband_transform, read_bands
from timm_rsmamba.data.bands import SENSORS, resolve_bands
from timm_rsmamba.training import CheckpointError, ConfigError, parse_args, train

tifffile = pytest.importorskip('tifffile')

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import inference  # noqa: E402
import validate  # noqa: E402

CLASSES = ['AnnualCrop', 'Forest', 'River']
TINY = ['--model', 'rsmamba_small', '--model-kwargs', 'depth=2', 'embed_dim=32', 'intermediate_size=64']
TINY_KW = dict(depth=2, embed_dim=32, intermediate_size=64)


def _chip(rng, bands, cls, size, dtype):
    """Values like Sentinel-2 digital numbers, band b offset by 100 b and class by 700 c (something to learn)."""
    a = rng.normal(1000 + 700 * cls, 150, (bands, size, size)) + 100 * np.arange(bands)[:, None, None]
    return np.clip(a, 0, 60000).astype(np.uint16) if dtype == 'uint16' else (a / 10000).astype(np.float32)


def write_folder(root: Path, bands=13, dtype='uint16', size=64, n_train=3, n_val=2, seed=0, layout='separate'):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = _chip(rng, bands, c, size, dtype)
                path = root / split / name / f'{name}_{i}.tif'
                if layout == 'contig':  # pixel-interleaved, as GDAL writes by default
                    tifffile.imwrite(path, np.moveaxis(a, 0, -1), photometric='minisblack', planarconfig='contig')
                else:
                    tifffile.imwrite(path, a, photometric='minisblack', planarconfig='separate')
                arrays[str(path)] = a
    return root, arrays


@pytest.fixture(scope='module')
def ms13(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('ms13') / 'eurosat')


def _run(argv):
    args, text = parse_args([str(a) for a in argv])
    return train(args, text)


def _train_args(data, out, name, *extra):
    return [data, *TINY, '-b', '2', '-j', '0', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '1',
            '--output', out, '--experiment', name, '--log-interval', '1', *extra]


def _ckpt(path):
    from timm.models._helpers import _torch_load
    return _torch_load(path, map_location='cpu', weights_only=True)


# ---------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize('layout', ['separate', 'contig', 'pages'])
def test_reader_keeps_band_order_and_depth(tmp_path, layout):
    a = np.random.default_rng(0).integers(0, 65535, (13, 20, 24), dtype=np.uint16)
    path = tmp_path / 'x.tif'
    if layout == 'contig':
        tifffile.imwrite(path, np.moveaxis(a, 0, -1), photometric='minisblack', planarconfig='contig')
    elif layout == 'separate':
        tifffile.imwrite(path, a, photometric='minisblack', planarconfig='separate')
    else:
        tifffile.imwrite(path, a, photometric='minisblack')  # one page per band
    out = read_bands(path)
    assert out.dtype == np.uint16 and out.shape == (13, 20, 24)
    np.testing.assert_array_equal(out, a)  # band i of the file is channel i - 1, every bit kept


def test_dataset_selection_scaling_and_dtype(tmp_path):
    root, arrays = write_folder(tmp_path / 'd', bands=13, n_train=1, n_val=1, layout='contig')
    ds = create_rs_dataset('', str(root), 'train', multiband=True)
    assert (ds.file_bands, ds.dtype) == (13, 'uint16')
    ds.bands = resolve_bands(['B04', 'B03', 'B02', 8], 13, 'sentinel2-l1c', dtype='uint16', reflectance_scale=10000)
    assert ds.bands.indices == [4, 3, 2, 8] and ds.bands.names == ['B04', 'B03', 'B02', 'B08']
    x, target = ds[0]
    ref = arrays[ds.describe(0)]
    assert x.dtype == torch.float32 and x.shape == (4, 64, 64)
    np.testing.assert_allclose(x.numpy(), ref[[3, 2, 1, 7]].astype(np.float64) / 10000, rtol=1e-6)
    assert CLASSES[target] == Path(ds.describe(0)).parent.name
    # EuroSAT-MS files store B8A last: its names map to other band numbers than ESA's order
    assert resolve_bands(['B8A', 'B12'], 13, 'eurosat-ms').indices == [13, 12]
    assert resolve_bands(['b8a', 'B12'], 13, 'sentinel2-l1c').indices == [9, 13]
    assert len(SENSORS['sentinel2-l2a']) == 12 and 'B10' not in SENSORS['sentinel2-l2a']


@pytest.mark.parametrize('case,match', [
    ('bands', r'odd\.tif.*|4: 1 file'),
    ('dtype', r'sample type.*float32.*uint16|uint16.*float32'),
    ('corrupt', r'broken\.tif'),
])
def test_bad_files_are_named(tmp_path, case, match):
    root, _ = write_folder(tmp_path / 'd', n_train=2, n_val=1)
    folder = root / 'train' / 'Forest'
    if case == 'bands':
        tifffile.imwrite(folder / 'odd.tif', np.zeros((4, 64, 64), np.uint16), photometric='minisblack',
                         planarconfig='separate')
    elif case == 'dtype':
        tifffile.imwrite(folder / 'odd.tif', np.zeros((13, 64, 64), np.float32), photometric='minisblack',
                         planarconfig='separate')
    else:
        (folder / 'broken.tif').write_bytes(b'II*\x00 not a tiff at all')
    with pytest.raises(DataError, match=match) as e:
        create_rs_dataset('', str(root), 'train', multiband=True)
    if case != 'corrupt':
        assert 'odd.tif' in str(e.value)
    else:  # --skip-corrupt leaves it out and counts it
        ds = create_rs_dataset('', str(root), 'train', multiband=True, skip_corrupt=True)
        assert len(ds) == 6 and ds.skipped_files[0].endswith('broken.tif')


# ---------------------------------------------------------------------------------------------- transforms

def test_eval_transform_matches_hand_computation():
    x = torch.rand(13, 64, 64) * 3000
    mean, std = torch.linspace(900, 2100, 13), torch.linspace(200, 800, 13)
    tf = multiband_transform((13, 56, 56), mean=mean.tolist(), std=std.tolist(), interpolation='bilinear',
                             crop_pct=0.875)
    resized = F.interpolate(x[None], size=(64, 64), mode='bilinear', antialias=True, align_corners=False)[0]
    ref = (resized[:, 4:60, 4:60] - mean[:, None, None]) / std[:, None, None]  # floor(56 / .875) = 64
    torch.testing.assert_close(tf(x), ref, rtol=1e-5, atol=1e-5)


def test_train_transform_flips_and_rotations_are_exact():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(4, 8, 8)
    full = dict(scale=(1, 1), ratio=(1, 1), mean=[0.], std=[1.], interpolation='bilinear')
    torch.testing.assert_close(multiband_transform(8, True, hflip=0, **full)(x), x)  # the crop alone: identity
    torch.testing.assert_close(multiband_transform(8, True, hflip=1., **full)(x), x.flip(-1))
    torch.testing.assert_close(multiband_transform(8, True, hflip=0, vflip=1., **full)(x), x.flip(-2))
    seen = set()
    tf = multiband_transform(8, True, hflip=0, rot90=1., **full)
    for _ in range(40):
        y = tf(x)
        k = next(k for k in (1, 2, 3) if torch.equal(y, torch.rot90(x, k, (-2, -1))))
        seen.add(k)
    assert seen == {1, 2, 3}
    out = multiband_transform(32, True, scale=(0.3, 1.), interpolation='random', re_prob=1.,
                              mean=[1.] * 4, std=[2.] * 4)(x)
    assert out.shape == (4, 32, 32) and out.dtype == torch.float32


def test_rot90_joins_timms_rgb_transform():
    from PIL import Image
    from timm.data import create_transform
    from timm_rsmamba.data.transforms import RandomRotate90, insert_rotate90
    tf = insert_rotate90(create_transform(16, is_training=True, vflip=0.5), 1.)
    names = [type(t).__name__ for t in tf.transforms]
    assert names.index('RandomRotate90') == names.index('RandomVerticalFlip') + 1  # after the crop and flips
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    turned = {np.asarray(RandomRotate90(1.)(img)).tobytes() for _ in range(40)}
    assert turned == {np.rot90(np.asarray(img), k).tobytes() for k in (1, 2, 3)}


def test_hf_datasets_are_refused_for_multiband():
    with pytest.raises(DataError, match='image folders'):
        create_rs_dataset('hfds/someone/eurosat', None, 'train', multiband=True)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def trained13(ms13, tmp_path_factory):
    root, _ = ms13
    out = tmp_path_factory.mktemp('run13')
    mean, std = ['0.2'] * 13, ['0.1'] * 13
    res = _run(_train_args(root, out, 'ms13', '--epochs', '2', '--img-size', '64', '--in-chans', '13',
                           '--reflectance-scale', '10000', '--sensor', 'eurosat-ms', '--mean', *mean, '--std', *std,
                           '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--rot90', '0.5',
                           '--vflip', '0.5', '--crop-pct', '1.0', '--interpolation', 'bilinear', '--scale', '0.5', '1'))
    return root, Path(res['output_dir'])


def _reference_logits(ckpt_path, files, indices=None):
    """Logits of the checkpoint's model on the files, with preprocessing done by hand (tifffile, numpy, torch)."""
    ckpt = _ckpt(ckpt_path)
    cfg, bands = ckpt['pretrained_cfg'], ckpt['bands']
    model = timm.create_model(ckpt['arch'], num_classes=len(ckpt['label_names']), **ckpt['model_kwargs']).eval()
    model.load_state_dict(ckpt['state_dict'])
    mean, std = torch.tensor(cfg['mean'])[:, None, None], torch.tensor(cfg['std'])[:, None, None]
    xs = []
    for f in files:
        a = tifffile.imread(f).astype(np.float64)  # written band-planar: (bands, H, W)
        if indices:
            a = a[[i - 1 for i in indices]]
        scale = bands['reflectance_scale'] or 1.
        xs.append((torch.from_numpy(a).float() / scale - mean) / std)  # native size, crop_pct 1: no resize
    with torch.no_grad():
        return model(torch.stack(xs))


def test_train_13_band_records_bands_and_validates(trained13, tmp_path, caplog):
    root, out = trained13
    ckpt = _ckpt(out / 'model_best.pth.tar')
    assert ckpt['bands']['file_bands'] == 13 and ckpt['bands']['count'] == 13
    assert ckpt['bands']['names'] == list(SENSORS['eurosat-ms']) and ckpt['bands']['dtype'] == 'uint16'
    assert ckpt['bands']['reflectance_scale'] == 10000
    assert tuple(ckpt['pretrained_cfg']['input_size']) == (13, 64, 64) and len(ckpt['pretrained_cfg']['mean']) == 13
    assert ckpt['args'].color_jitter == 0.  # the band-aware default: no jitter asked for, none applied
    assert ckpt['state_dict']['patch_embed.proj.weight'].shape[1] == 13

    files = sorted((root / 'val').rglob('*.tif'))
    logits = _reference_logits(out / 'model_best.pth.tar', files)
    targets = np.array([CLASSES.index(f.parent.name) for f in files])
    res = validate.main([str(root), '--split', 'val', '--checkpoint', str(out / 'model_best.pth.tar'), '-j', '0',
                         '--device', 'cpu'])
    assert res['num_images'] == 6
    assert res['top1'] == pytest.approx(100 * np.mean(logits.argmax(1).numpy() == targets), abs=1e-3)

    show = tmp_path / 'show'
    df = inference.main([str(root / 'val'), '--checkpoint', str(out / 'model_best.pth.tar'), '--topk', '2',
                         '-j', '0', '--device', 'cpu', '--results-dir', str(tmp_path / 'p'), '--no-console-results',
                         '--show-dir', str(show), '--show-format', 'jpg'])
    probs = logits.softmax(-1)
    by_name = {f.name: i for i, f in enumerate(files)}
    for _, row in df.iterrows():
        np.testing.assert_allclose(row['prob'], probs[by_name[row['filename']]].topk(2).values.numpy(), rtol=1e-4)
    written = sorted(str(p.relative_to(show)) for p in show.rglob('*.jpg'))
    assert written == sorted(str(f.relative_to(root / 'val').with_suffix('.jpg')) for f in files)

    from timm_rsmamba import hub  # the hub folder carries the bands: the scripts need nothing else
    folder = hub.push(out / 'model_best.pth.tar', 'someone/ms', dry_run=tmp_path / 'hub')
    import json
    config = json.loads((folder / 'config.json').read_text())
    assert config['bands']['reflectance_scale'] == 10000 and config['pretrained_cfg']['input_size'] == [13, 64, 64]
    res2 = validate.main([str(root), '--split', 'val', '--model', f'local-dir:{folder}', '-j', '0', '--device', 'cpu'])
    assert res2['top1'] == res['top1']

    other, _ = write_folder(tmp_path / 'reflectance', dtype='float32', n_train=1, n_val=1)  # not what it learnt on
    with pytest.raises(SystemExit) as e:
        validate.main([str(other), '--split', 'val', '--checkpoint', str(out / 'model_best.pth.tar'), '-j', '0'])
    assert e.value.code == 2 and 'trained on uint16' in caplog.text and '--reflectance-scale' in caplog.text


def test_band_selection_4_float32_bands(tmp_path):
    root, _ = write_folder(tmp_path / 'f', bands=4, dtype='float32', size=32, n_train=2, n_val=2)
    res = _run(_train_args(root, tmp_path, 'sel', '--epochs', '2', '--img-size', '32', '--bands', '4,1,2',
                           '--mean', '0.2', '--std', '0.1', '--crop-pct', '1.0'))
    ckpt_path = Path(res['output_dir']) / 'last.pth.tar'
    ckpt = _ckpt(ckpt_path)
    assert ckpt['bands']['indices'] == [4, 1, 2] and ckpt['bands']['dtype'] == 'float32'
    assert ckpt['model_kwargs']['in_chans'] == 3 and ckpt['bands']['reflectance_scale'] is None
    files = sorted((root / 'val').rglob('*.tif'))
    logits = _reference_logits(ckpt_path, files, [4, 1, 2])
    targets = np.array([CLASSES.index(f.parent.name) for f in files])
    out = validate.main([str(root), '--split', 'val', '--checkpoint', str(ckpt_path), '-j', '0', '--device', 'cpu'])
    assert out['top1'] == pytest.approx(100 * np.mean(logits.argmax(1).numpy() == targets), abs=1e-3)


def _cli(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_colour_ops_and_bad_flags_stop_with_a_message(ms13, tmp_path):
    root, _ = ms13
    mean = ['--mean', *(['0.1'] * 13), '--std', *(['0.1'] * 13)]
    proc = _cli(ROOT / 'train.py', root, *TINY, '--img-size', '64', '--in-chans', '13', '-j', '0', '--epochs', '1',
                '--output', tmp_path, '--aa', 'original', *mean)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-1500:]
    assert '--aa original' in proc.stderr and '13-band' in proc.stderr  # names the flag and the band count
    base = _train_args(root, tmp_path, 'x', '--img-size', '64', '--in-chans', '13', '--epochs', '1')
    cases = [
        (['--color-jitter', '0.4', *mean], DataError, r'--color-jitter 0\.4: .*13-band'),
        (['--grayscale-prob', '0.2', *mean], DataError, r'--grayscale-prob 0\.2: .*13-band'),
        (['--mean', '0.1', '0.2', '0.3', '--std', '0.1'], ConfigError, r'--mean needs 13 values .* got 3'),
        (['--bands', '2,3,14', '--mean', '0.1', '--std', '0.1'], DataError, r'--bands 14: .*1\.\.13'),
        (['--bands', 'B02,B03', '--mean', '0.1', '--std', '0.1'], DataError, r'--bands B02: band names need --sensor'),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            _run(base + extra)


# ---------------------------------------------------------------------------------------------- RGB weights

def _adapted_by_hand(w3, n):
    """timm's adapt_input_conv rule for n > 3 bands: the RGB kernels repeated over the bands, times 3 / n."""
    reps = [w3[:, i % 3] for i in range(n)]
    return torch.stack(reps, dim=1) * (3. / n)


def test_rgb_weights_adapt_to_13_bands(ms13, tmp_path, caplog):
    root, _ = ms13
    rgb = timm.create_model('rsmamba_small', num_classes=3, img_size=64, **TINY_KW)
    w3 = rgb.state_dict()['patch_embed.proj.weight'].clone()
    sd_path = tmp_path / 'rgb.pth'
    torch.save(rgb.state_dict(), sd_path)
    mean = ['--mean', '0.2', '--std', '0.1']
    common = ['--epochs', '1', '--img-size', '64', '--in-chans', '13', '--reflectance-scale', '10000', *mean,
              '--lr', '0', '--warmup-lr', '0', '--weight-decay', '0']
    with caplog.at_level(logging.INFO):
        res = _run(_train_args(root, tmp_path, 'init', *common, '--initial-checkpoint', sd_path))
    assert 'to 13 bands' in caplog.text
    got = _ckpt(Path(res['output_dir']) / 'last.pth.tar')['state_dict']['patch_embed.proj.weight']
    torch.testing.assert_close(got, _adapted_by_hand(w3, 13))

    caplog.clear()
    with caplog.at_level(logging.INFO):  # timm's load_pretrained path
        res = _run(_train_args(root, tmp_path, 'pre', *common, '--pretrained-path', sd_path))
    assert 'from 3 to 13 channel' in caplog.text
    got = _ckpt(Path(res['output_dir']) / 'last.pth.tar')['state_dict']['patch_embed.proj.weight']
    torch.testing.assert_close(got, _adapted_by_hand(w3, 13))

    from timm_rsmamba import hub  # a converter / hub folder of RGB weights
    folder = hub.save_pretrained_folder(rgb, tmp_path / 'rgb_dir', label_names=CLASSES)
    m13 = timm.create_model(f'local-dir:{folder}', pretrained=True, in_chans=13)
    torch.testing.assert_close(m13.patch_embed.proj.weight, _adapted_by_hand(w3, 13))

    m4 = timm.create_model('rsmamba_small', num_classes=3, img_size=64, in_chans=4, **TINY_KW)
    torch.save(m4.state_dict(), tmp_path / 'four.pth')
    with pytest.raises(CheckpointError, match='4-band input .* 13 input band'):
        _run(_train_args(root, tmp_path, 'x', *common, '--initial-checkpoint', tmp_path / 'four.pth'))
    with pytest.raises(ConfigError, match='4-band input .* 13 input band'):
        _run(_train_args(root, tmp_path, 'y', *common, '--pretrained-path', tmp_path / 'four.pth'))


# ---------------------------------------------------------------------------------------------- native sizes

def test_default_model_runs_native_chip_sizes():
    from timm.layers import resample_abs_pos_embed
    from timm.models._input import get_model_input_config
    torch.manual_seed(0)
    model = timm.create_model('rsmamba_small', num_classes=10, in_chans=13, **TINY_KW).eval()
    assert model.pretrained_cfg['fixed_input_size'] is False
    assert get_model_input_config(model) == dict(input_size=(13, 224, 224), fixed_input_size=False,
                                                 first_conv='patch_embed.proj')
    with torch.no_grad():
        for size in (64, 120, 224, 256):
            assert model(torch.randn(2, 13, size, size)).shape == (2, 10)
        x224 = torch.randn(1, 13, 224, 224)
        strict = timm.create_model('rsmamba_small', num_classes=10, in_chans=13, dynamic_img_size=False, **TINY_KW)
        strict.load_state_dict(model.state_dict())
        assert torch.equal(model(x224), strict.eval()(x224))  # the native size: today's math exactly
        assert get_model_input_config(strict)['fixed_input_size'] is True
        with pytest.raises(ValueError, match='dynamic_img_size'):
            strict(torch.randn(1, 13, 64, 64))
        # at 64 px: the same as a model built for 64 px holding the 28x28 table resampled by timm (bicubic)
        at64 = timm.create_model('rsmamba_small', num_classes=10, in_chans=13, img_size=64, **TINY_KW).eval()
        sd = dict(model.state_dict())
        sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], [8, 8], [28, 28], num_prefix_tokens=0)
        at64.load_state_dict(sd)
        x64 = torch.randn(2, 13, 64, 64)
        torch.testing.assert_close(model(x64), at64(x64), rtol=1e-5, atol=1e-6)


def test_pos_embed_cache_follows_the_parameter(monkeypatch):
    model = timm.create_model('rsmamba_small', num_classes=3, in_chans=4, **TINY_KW)
    x = torch.randn(2, 4, 64, 64)
    model.train()
    model(x).sum().backward()  # training resamples every forward: the gradient reaches pos_embed
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    assert not model._pos_cache
    model.eval()
    with torch.no_grad():
        first = model._resampled_pos_embed((8, 8))
        assert model._resampled_pos_embed((8, 8)) is first  # cached per grid
        before = model(x)
        delta = torch.randn_like(model.pos_embed)
        model.pos_embed.add_(delta)  # an update in place (an optimizer step, load_state_dict)
        assert model._resampled_pos_embed((8, 8)) is not first
        assert not torch.allclose(model(x), before)
        model.pos_embed.sub_(delta)
        torch.testing.assert_close(model(x), before)
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)  # never cache while tracing
        model._pos_cache.clear()
        model._resampled_pos_embed((8, 8))
        assert not model._pos_cache


def test_chip_size_agnostic_trainer_step():
    """What torchgeo-style trainers do: create_model(name, num_classes, in_chans) and feed native 64 px chips."""
    model = timm.create_model('rsmamba_small', num_classes=10, in_chans=13, **TINY_KW)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 13, 64, 64), torch.randint(0, 10, (4,))
    before = model.pos_embed.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.pos_embed.detach())


# ---------------------------------------------------------------------------------------------- previews

def test_composite_picks_true_colour_and_stretches():
    from timm_rsmamba.visualize import composite_bands, rgb_composite
    a = np.zeros((13, 10, 10), np.uint16)
    for b in range(13):
        a[b] = np.arange(100).reshape(10, 10) * (b + 1)
    assert composite_bands(SENSORS['eurosat-ms'], 13) == [3, 2, 1]
    assert composite_bands(None, 13) == [0, 1, 2] and composite_bands(None, 1) == [0, 0, 0]
    rgb = np.asarray(rgb_composite(a, SENSORS['sentinel2-l1c']))
    for ch, band in enumerate((3, 2, 1)):
        lo, hi = np.percentile(a[band].astype(np.float64), [2, 98])
        ref = np.clip(np.rint((a[band] - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(rgb[..., ch], ref)


def test_annotate_small_chip_keeps_pixels_and_writes_text(tmp_path):
    from PIL import Image
    from timm_rsmamba.visualize import annotate, prediction_lines
    chip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = annotate(chip, prediction_lines(['Forest', 'River'], [0.8, 0.15]))
    arr = np.asarray(out)
    assert out.width == 256 and out.height > 256  # 4x enlarged, strip under it
    np.testing.assert_array_equal(arr[:256:4, ::4], np.asarray(chip))  # the picture itself, unchanged
    strip = arr[256:]
    assert (strip != strip[0, 0]).any(axis=-1).sum() > 100  # text drawn on the strip
    big = Image.new('RGB', (400, 300), (10, 200, 30))
    assert annotate(big, ['1. x  50.0%']).width == 400  # full resolution, never shrunk


# ---------------------------------------------------------------------------------------------- stats tool

def test_stats_per_band_against_numpy(tmp_path):
    root, arrays = write_folder(tmp_path / 's', bands=13, n_train=2, n_val=1, size=16)
    train = [a for p, a in arrays.items() if '/train/' in p]
    proc = _cli('-m', 'timm_rsmamba.data.stats', root, '--split', 'train', '--reflectance-scale', '10000',
                '--sensor', 'eurosat-ms', '--bands', 'B04,B03,B02,B8A', '--method', 'pixel')
    assert proc.returncode == 0, proc.stderr
    flags = proc.stdout.strip().splitlines()[-1].split()
    assert flags[:2] == ['flags:', '--mean'] and flags[6] == '--std'
    pixels = np.concatenate([a[[3, 2, 1, 12]].reshape(4, -1) for a in train], axis=1).astype(np.float64) / 10000
    np.testing.assert_allclose([float(v) for v in flags[2:6]], pixels.mean(1), atol=2e-6)
    np.testing.assert_allclose([float(v) for v in flags[7:11]], pixels.std(1), atol=2e-6)
    assert ' '.join(flags[11:]) == '--in-chans 4 --bands 4,3,2,13 --sensor eurosat-ms --reflectance-scale 10000'
    auto = _cli('-m', 'timm_rsmamba.data.stats', root, '--split', 'train')  # 13 bands: per band, as stored
    assert auto.returncode == 0, auto.stderr
    means = [float(v) for v in auto.stdout.strip().splitlines()[-1].split()[2:15]]
    np.testing.assert_allclose(means, np.mean([a.reshape(13, -1).mean(1) for a in train], 0), rtol=1e-6)
