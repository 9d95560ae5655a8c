#!/usr/bin/env python3
"""Images per second of the 13-band data pipeline beside the RGB one, on chips written for the run.

The chips are EuroSAT-like: --count 64x64 images in 10 class folders, once as 13-band uint16 GeoTIFFs
(pixel-interleaved, uncompressed, as GDAL writes by default) and once as RGB JPEGs (EuroSAT's RGB release).
Rows, each for both:
  decode   the dataset alone: file -> float32 (bands, H, W) tensor (multi-band: tifffile, band selection,
           /10000 reflectance) or -> PIL RGB image (timm's PIL pipeline: Pillow, data.images.load_image)
  train    decode + the train transform: multi-band data.transforms.multiband_transform (random resized crop,
           h/v flips, 90-degree rotations, per-band normalisation); RGB timm's create_transform (random resized
           crop, flip, colour jitter 0.4, to tensor, normalisation; the no-prefetcher path, so both end as
           normalised float32 tensors)
  eval     decode + resize / centre crop / normalise
  loader   the train row through timm's create_loader with --workers processes, batches of --batch-size
The single-process rows measure the cost per image on one core; the loader row what a training run gets.

    python benchmarks/bench_data.py                     # 2000 chips, 2 workers, table + benchmarks/results/
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSES = [f'class{i}' for i in range(10)]
MEAN13, STD13 = [0.13] * 13, [0.08] * 13  # reflectance-scale magnitudes; the values do not change the timing


def write_chips(root: str, count: int, size: int, seed: int = 0):
    """count chips per format: 13-band uint16 .tif and RGB .jpg, spread over the class folders."""
    import tifffile
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        for fmt in ('ms', 'rgb'):
            os.makedirs(os.path.join(root, fmt, 'train', cls), exist_ok=True)
        bands = rng.normal(1500, 500, (size, size, 13)).clip(0, 65535).astype(np.uint16)
        tifffile.imwrite(os.path.join(root, 'ms', 'train', cls, f'{i}.tif'), bands, photometric='minisblack',
                         planarconfig='contig')
        rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, 'rgb', 'train', cls, f'{i}.jpg'), quality=95)


def datasets(root: str):
    from timm_rsmamba.data import create_rs_dataset, resolve_bands
    ms = create_rs_dataset('', os.path.join(root, 'ms'), 'train', is_training=True, multiband=True)
    ms.bands = resolve_bands(None, ms.file_bands, 'eurosat-ms', dtype=ms.dtype, reflectance_scale=10000)
    rgb = create_rs_dataset('', os.path.join(root, 'rgb'), 'train', is_training=True)
    return ms, rgb


def transforms(size: int):
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm_rsmamba.data import multiband_transform
    common = dict(hflip=0.5, vflip=0.5)
    return {
        ('ms', 'train'): multiband_transform(size, True, MEAN13, STD13, 'random', scale=(0.5, 1.), rot90=0.5, **common),
        ('ms', 'eval'): multiband_transform(size, False, MEAN13, STD13, 'bilinear', crop_pct=1.),
        ('rgb', 'train'): create_transform(size, is_training=True, interpolation='random', scale=(0.5, 1.),
                                           color_jitter=0.4, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                                           **common),
        ('rgb', 'eval'): create_transform(size, is_training=False, interpolation='bilinear', crop_pct=1.,
                                          mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    }


def time_dataset(ds, transform, seconds: float) -> dict:
    """Samples per second of ds[i] (transform applied), cycling through the dataset for about ``seconds``."""
    ds.transform = transform
    for i in range(min(8, len(ds))):  # warm-up: imports, first allocations
        ds[i]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < len(ds) // 4:
        ds[n % len(ds)]
        n += 1
    elapsed = time.perf_counter() - start
    return dict(img_s=n / elapsed, ms_img=1000 * elapsed / n, images=n)


def time_loader(ds, transform, fmt: str, size: int, workers: int, batch_size: int) -> dict:
    """Images per second over one epoch of timm's create_loader (multi-band: without its prefetcher)."""
    import torch
    from timm.data import create_loader
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm_rsmamba.data import create_multiband_loader
    common = dict(input_size=(13 if fmt == 'ms' else 3, size, size), batch_size=batch_size, is_training=True,
                  num_workers=workers, persistent_workers=False, device=torch.device('cpu'))
    if fmt == 'ms':
        loader = create_multiband_loader(ds, transform, **common)
    else:
        loader = create_loader(ds, use_prefetcher=False, scale=(0.5, 1.), interpolation='random', vflip=0.5,
                               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, **common)
    n, start = 0, time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    elapsed = time.perf_counter() - start
    return dict(img_s=n / elapsed, ms_img=1000 * elapsed / n, images=n, workers=workers, batch_size=batch_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--count', type=int, default=2000, help='chips per format (default: 2000)')
    parser.add_argument('--size', type=int, default=64, help='chip size in px (default: 64, EuroSAT)')
    parser.add_argument('--seconds', type=float, default=3., help='time per single-process row (default: 3)')
    parser.add_argument('--workers', type=int, default=2, help='loader worker processes (default: 2)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--json-out', default=None,
                        help='rows as JSON (default: benchmarks/results/<date>-data.json)')
    args = parser.parse_args(argv)

    import torch
    from bench_throughput import machine_lines
    torch.set_num_threads(1)  # one process = one core; the loader row shows the parallel rate
    header = machine_lines(SimpleNamespace(threads=1, device='cpu'))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_chips(root, args.count, args.size)
        print(f'wrote {args.count} chips per format in {time.perf_counter() - start:.1f} s', file=sys.stderr)
        start = time.perf_counter()
        ms, rgb = datasets(root)
        print(f'datasets (multi-band: every header read once) in {time.perf_counter() - start:.1f} s',
              file=sys.stderr)
        tfs = transforms(args.size)
        for fmt, ds in (('ms', ms), ('rgb', rgb)):
            for stage in ('decode', 'train', 'eval'):
                res = time_dataset(ds, tfs.get((fmt, stage)), args.seconds)
                rows.append(dict(pipeline=fmt, stage=stage, **res))
                print(f'{fmt} {stage}: {res["img_s"]:.0f} img/s', file=sys.stderr)
            res = time_loader(ds, tfs[(fmt, 'train')], fmt, args.size, args.workers, args.batch_size)
            rows.append(dict(pipeline=fmt, stage='loader', **res))
            print(f'{fmt} loader: {res["img_s"]:.0f} img/s', file=sys.stderr)

    names = {'ms': '13-band uint16 GeoTIFF (tifffile)', 'rgb': 'RGB JPEG (Pillow, timm transforms)'}
    for line in header:
        print(line)
    print(f'{args.count} chips of {args.size}x{args.size} px; single-process rows on 1 thread; loader row: '
          f'{args.workers} workers, batch {args.batch_size}\n')
    print('| pipeline | decode img/s | decode + train aug img/s | decode + eval img/s | loader img/s (train) |')
    print('|---|---|---|---|---|')
    for fmt in ('ms', 'rgb'):
        by = {r['stage']: r for r in rows if r['pipeline'] == fmt}
        print(f'| {names[fmt]} | ' + ' | '.join(f'{by[s]["img_s"]:.0f}' for s in ('decode', 'train', 'eval', 'loader'))
              + ' |')
    ms_train = next(r for r in rows if r['pipeline'] == 'ms' and r['stage'] == 'train')['img_s']
    rgb_train = next(r for r in rows if r['pipeline'] == 'rgb' and r['stage'] == 'train')['img_s']
    print(f'\n13-band train pipeline / RGB train pipeline: {ms_train / rgb_train:.2f}x')

    out = args.json_out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                        f'{datetime.date.today().isoformat()}-data.json')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(dict(header=header, args=vars(args), rows=rows), f, indent=1)
    print(f'rows written to {out}')
    return rows


if __name__ == '__main__':
    main()
