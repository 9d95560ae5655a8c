"""Image decoding, datasets, split and stats tools; references are numpy / hand-computed values."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm_rsmamba  # noqa: F401
from timm_rsmamba.data import (CorruptImageError, DataError, check_num_classes, create_rs_dataset, label_mapping,
                               load_image)
from timm_rsmamba.data.split import main as split_main
from timm_rsmamba.data.stats import channel_stats, find_images

REPO = Path(__file__).resolve().parents[1]


def _img(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _tree(root):
    """Every path under root with its size and mtime (to prove a tool never touched it)."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*'))


# ---------------------------------------------------------------- image decoding

def test_rgb_tif_and_odd_size(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    img = load_image(_img(tmp_path / 'a.tif', arr))
    assert img.mode == 'RGB' and img.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = np.asarray(load_image(_img(tmp_path / 'g.png', arr)))
    assert out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_16bit_percentile_and_range(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(100, 4000, (20, 30)).astype(np.uint16)  # 12-bit data in a 16-bit container
    path = tmp_path / 'd16.tif'
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith('I;16')
    lo, hi = np.percentile(arr.astype(np.float64), [0.5, 99.5])
    expect = np.clip(np.rint((arr - lo) * 255. / (hi - lo)), 0, 255).astype(np.uint8)
    out = np.asarray(load_image(path))
    np.testing.assert_array_equal(out[..., 0], expect)
    assert out.max() == 255 and out.min() == 0  # stretched, not the near-black arr / 65535
    out_range = np.asarray(load_image(path, high_bit_depth='range'))[..., 0]
    np.testing.assert_array_equal(out_range, np.rint(arr / 65535. * 255).astype(np.uint8))


def test_float_image_range(tmp_path):
    arr = np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)
    path = tmp_path / 'f.tif'
    Image.fromarray(arr, 'F').save(path)
    out = np.asarray(load_image(path, high_bit_depth='range'))[..., 0]
    np.testing.assert_array_equal(out, np.rint(arr.astype(np.float64) * 255).astype(np.uint8))


def test_palette_with_transparency_and_rgba(tmp_path):
    pal = Image.new('P', (4, 4))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putdata([0, 1] * 8)
    pal.info['transparency'] = 1
    pal.save(tmp_path / 'p.png', transparency=1)
    out = np.asarray(load_image(tmp_path / 'p.png'))
    assert out.shape == (4, 4, 3)
    assert out.reshape(-1, 3)[0].tolist() == [255, 0, 0] and out.reshape(-1, 3)[1].tolist() == [0, 255, 0]
    rgba = np.random.default_rng(2).integers(0, 255, (5, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: colour values must survive (alpha is a no-data mask in RS)
    out = np.asarray(load_image(_img(tmp_path / 'a.png', rgba, 'RGBA')))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_truncated_image_fails_at_load(tmp_path):
    path = _img(tmp_path / 'x.jpg', np.zeros((64, 64, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError):
        load_image(path)


# ---------------------------------------------------------------- datasets

@pytest.fixture
def tif_folder(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / 'ds'
    for split, n in (('train', 3), ('val', 2)):
        for cls in ('river', 'beach', 'airplane'):
            for i in range(n):
                size = (30 + i, 40)  # sizes other than 256, and not all equal
                _img(root / split / cls / f'{cls}{i}.tif', rng.integers(0, 255, size + (3,), dtype=np.uint8))
    return root


def test_folder_dataset_split_search_and_names(tif_folder):
    ds = create_rs_dataset('', str(tif_folder), 'validation')  # timm's synonym search finds val/
    assert ds.label_names == ['airplane', 'beach', 'river']
    assert len(ds) == 6
    img, target = ds[0]
    assert img.mode == 'RGB' and target == 0
    assert len(create_rs_dataset('', str(tif_folder), 'train')) == 9


def test_class_map_sets_order(tif_folder, tmp_path):
    cmap = tmp_path / 'classes.txt'
    cmap.write_text('river\nairplane\nbeach\n')
    ds = create_rs_dataset('', str(tif_folder), 'val', class_map=str(cmap))
    assert ds.label_names == ['river', 'airplane', 'beach']
    files = ds.filenames()
    for i, (_, target) in enumerate(ds.reader.samples):
        assert ds.label_names[target] == Path(files[i]).parent.name


@pytest.mark.parametrize('case,match', [
    ('missing', 'does not exist'),
    ('empty', 'is empty'),
    ('nosplit', "split 'test' not found"),
    ('emptysplit', 'has no images'),
    ('loose', 'directly in'),
])
def test_clear_dataset_errors(tif_folder, tmp_path, case, match):
    root, split = tif_folder, 'val'
    if case == 'missing':
        root = tmp_path / 'nope'
    elif case == 'empty':
        root = tmp_path / 'empty'
        root.mkdir()
    elif case == 'nosplit':
        split = 'test'
    elif case == 'emptysplit':
        (tif_folder / 'test' / 'beach').mkdir(parents=True)
        split = 'test'
    elif case == 'loose':
        root = tmp_path / 'loose'
        _img(root / 'a.png', np.zeros((4, 4, 3), np.uint8))
        split = 'train'
    with pytest.raises(DataError, match=match):
        create_rs_dataset('', str(root), split)


def test_corrupt_image_named_or_skipped(tif_folder):
    bad = tif_folder / 'val' / 'beach' / 'beach1.tif'
    bad.write_bytes(b'II*\x00garbage')
    ds = create_rs_dataset('', str(tif_folder), 'val')
    idx = [i for i, (p, _) in enumerate(ds.reader.samples) if p.endswith('beach1.tif')][0]
    with pytest.raises(CorruptImageError, match='beach1.tif'):
        ds[idx]
    ds = create_rs_dataset('', str(tif_folder), 'val', skip_corrupt=True)
    assert len(ds) == 5 and len(ds.skipped_files) == 1 and ds.skipped_files[0].endswith('beach1.tif')
    assert all(ds[i][0].mode == 'RGB' for i in range(len(ds)))


def test_check_num_classes():
    assert check_num_classes(None, ['a', 'b']) == 2
    assert check_num_classes(2, ['a', 'b']) == 2
    with pytest.raises(DataError, match='--num-classes 5 .* 2 classes'):
        check_num_classes(5, ['a', 'b'])


def test_label_mapping_by_name():
    model = ['harbor', 'parkinglot', 'airplane']
    assert label_mapping(model, ['airplane', 'harbor', 'parkinglot']) == [2, 0, 1]
    assert label_mapping(model, ['Parking_Lot', 'airplane']) == [1, 2]  # loose match, data subset
    with pytest.raises(DataError) as e:
        label_mapping(model, ['airport', 'harbor', 'parking'])
    assert "'airport'" in str(e.value) and "'parking'" in str(e.value) and "'airplane'" in str(e.value)
    with pytest.raises(DataError, match='repeat'):
        label_mapping(['a', 'a'], ['a'])


# ---------------------------------------------------------------- split tool

@pytest.fixture
def class_src(tmp_path):
    src = tmp_path / 'src'
    counts = {'a': 10, 'b': 7, 'c': 3}
    for cls, n in counts.items():
        for i in range(n):
            _img(src / cls / f'{cls}_{i:02d}.jpg', np.full((4, 4, 3), i, np.uint8))
    return src, counts


def _listing(root):
    return {str(p.relative_to(root)) for p in root.rglob('*') if p.is_file() or p.is_symlink()}


def test_split_by_ratio_counts_seed_and_source_untouched(class_src, tmp_path, capsys):
    src, counts = class_src
    before = _tree(src)
    split_main([str(src), str(tmp_path / 'o1'), '--ratios', '0.7', '0.3', '--seed', '0'])
    assert 'train:' in capsys.readouterr().out
    split_main([str(src), str(tmp_path / 'o2'), '--ratios', '0.7', '0.3', '--seed', '0'])
    split_main([str(src), str(tmp_path / 'o3'), '--ratios', '0.7', '0.3', '--seed', '1'])
    assert _tree(src) == before
    o1, o2, o3 = (_listing(tmp_path / o) for o in ('o1', 'o2', 'o3'))
    assert o1 == o2 and o1 != o3
    for cls, n in counts.items():
        train = {f for f in o1 if f.startswith(f'train/{cls}/')}
        val = {f for f in o1 if f.startswith(f'val/{cls}/')}
        assert len(train) == round(0.7 * n) and len(train) + len(val) == n  # 7/3, 5/2, 2/1
        names = {Path(f).name for f in train} | {Path(f).name for f in val}
        assert names == {p.name for p in (src / cls).iterdir()}
    link = next((tmp_path / 'o1' / 'train' / 'a').iterdir())
    assert link.is_symlink() and link.resolve().parent == (src / 'a').resolve()


def test_split_three_way_copy_force(class_src, tmp_path):
    src, counts = class_src
    dst = tmp_path / 'o'
    split_main([str(src), str(dst), '--ratios', '0.6', '0.2', '--test-ratio', '0.2', '--copy'])
    files = _listing(dst)
    assert sum(f.startswith('test/a/') for f in files) == 2 and sum(f.startswith('test/c/') for f in files) == 1
    f = next((dst / 'train' / 'a').iterdir())
    assert f.is_file() and not f.is_symlink()
    with pytest.raises(SystemExit):  # non-empty DST refused
        split_main([str(src), str(dst)])
    split_main([str(src), str(dst), '--force'])
    assert not (dst / 'test').exists()  # a stale split from the earlier 3-way run is not left behind
    assert sum(1 for f in _listing(dst) if f.startswith(('train/', 'val/'))) == sum(counts.values())
    with pytest.raises(SystemExit):  # DST inside SRC refused
        split_main([str(src), str(src / 'out')])


def test_split_from_lists_matches_stems(class_src, tmp_path):
    src, _ = class_src
    before = _tree(src)
    train = tmp_path / 'train.txt'
    val = tmp_path / 'val.txt'
    train.write_text('a/a_00.tif\na/a_01.tif\nb/b_03.tif\n')  # lists say .tif, files are .jpg
    val.write_text('a/a_05.jpg\nc/c_02.tif')
    dst = tmp_path / 'o'
    split_main([str(src), str(dst), '--train-list', str(train), '--val-list', str(val)])
    assert _listing(dst) == {'train/a/a_00.jpg', 'train/a/a_01.jpg', 'train/b/b_03.jpg', 'val/a/a_05.jpg',
                             'val/c/c_02.jpg'}
    assert _tree(src) == before
    val.write_text('a/a_99.tif\n')
    with pytest.raises(SystemExit):
        split_main([str(src), str(tmp_path / 'o2'), '--train-list', str(train), '--val-list', str(val)])


def test_split_cli_subprocess(class_src, tmp_path):
    src, _ = class_src
    r = subprocess.run([sys.executable, '-m', 'timm_rsmamba.data.split', str(src), str(tmp_path / 'o')],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert 'train:' in r.stdout and 'val:' in r.stdout


# ---------------------------------------------------------------- stats tool

def test_stats_vs_numpy(tmp_path):
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((8, 8), (5, 12), (16, 3))]
    for i, a in enumerate(arrays):
        _img(tmp_path / 'd' / 'cls' / f'{i}.png', a)
    stats = channel_stats(find_images(tmp_path / 'd'))
    pixels = np.concatenate([a.reshape(-1, 3).astype(np.float64) for a in arrays])
    np.testing.assert_allclose(stats['mean'], pixels.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats['std'], pixels.std(0), rtol=1e-8)
    np.testing.assert_allclose(stats['image_mean'], np.mean([a.reshape(-1, 3).mean(0) for a in arrays], 0))
    np.testing.assert_allclose(stats['image_std'], np.mean([a.reshape(-1, 3).std(0) for a in arrays], 0))
    r = subprocess.run([sys.executable, '-m', 'timm_rsmamba.data.stats', str(tmp_path / 'd'), '--method', 'pixel'],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    flags = r.stdout.strip().splitlines()[-1].split()
    assert flags[0] == 'flags:' and flags[1] == '--mean'
    np.testing.assert_allclose([float(x) for x in flags[2:5]], pixels.mean(0) / 255, atol=1e-4)
    np.testing.assert_allclose([float(x) for x in flags[6:9]], pixels.std(0) / 255, atol=1e-4)
    r = subprocess.run([sys.executable, '-m', 'timm_rsmamba.data.stats', str(tmp_path / 'nothing')],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and 'does not exist' in r.stderr


# ---------------------------------------------------------------- real data

def _read_list(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def test_split_reproduces_paper_uc_split(shared_data, tmp_path):
    info = shared_data / 'rsmamba_datainfo' / 'UC'
    dst = tmp_path / 'uc'
    split_main([str(shared_data / 'ucmerced'), str(dst), '--train-list', str(info / 'train.txt'),
                '--val-list', str(info / 'val.txt')])
    for split, n in (('train', 1470), ('val', 630)):
        expected = {os.path.splitext(e)[0] for e in _read_list(info / f'{split}.txt')}
        got = {os.path.splitext(str(p.relative_to(dst / split)))[0] for p in (dst / split).rglob('*.jpg')}
        assert len(got) == n
        assert got == expected
    ds = create_rs_dataset('', str(dst), 'val')
    assert len(ds) == 630 and len(ds.label_names) == 21
    # the paper's class order maps onto the folders by name, every class exactly once
    mapping = label_mapping(_read_list(info / 'cls_names.txt'), ds.label_names)
    assert sorted(mapping) == list(range(21))


def test_shipped_sample_data():
    root = REPO / 'sample_data' / 'ucmerced'
    train = create_rs_dataset('', str(root), 'train')
    val = create_rs_dataset('', str(root), 'val')
    assert len(train.label_names) == 21 and train.label_names == val.label_names
    assert len(train) == 84 and len(val) == 42
    assert torch.bincount(torch.tensor([t for _, t in val.reader.samples])).tolist() == [2] * 21
