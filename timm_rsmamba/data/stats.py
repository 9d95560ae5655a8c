"""Per-channel mean and std of an image folder, for ``--mean`` / ``--std``.

    python -m timm_rsmamba.data.stats ROOT [--split train] [--method image|pixel] [-j 4]
    python -m timm_rsmamba.data.stats ROOT --split train [--bands 2,3,4,8] [--reflectance-scale 10000]

Multi-band images (band counts other than 1 and 3, or any with --bands / --reflectance-scale / --in-chans N)
are measured per band on the values the multi-band pipeline feeds the model (``data.multiband``: full depth,
float32, divided by the reflectance scale), and the flags printed are in those units. RGB and grayscale images
are measured on the decoded 8-bit values (``load_image``; 16-bit data is rescaled as documented there).
Two conventions, both computed in one pass:

* ``--method image`` (default): the mean over images of each image's per-channel mean and (population) std.
  This is how the paper's ``meanstd.txt`` was made (UC Merced: std 44.2 / 41.6 / 39.6; pooled it is ~55).
* ``--method pixel``: mean and std pooled over all pixels of all images (larger images weigh more).

Printed on the 0-255 scale (the paper's) and the 0-1 scale (timm's ``--mean/--std``).
"""
import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from timm.data.readers.img_extensions import get_img_extensions

from .bands import BandSpec, add_band_args, parse_band_list, resolve_bands, wants_multiband
from .dataset import DataError, _resolve_split_root
from .images import load_image
from .multiband import load_multiband, read_band_layout, scan_band_layout

__all__ = ['find_images', 'channel_stats', 'format_stats', 'main']

_logger = logging.getLogger(__name__)


def find_images(root) -> List[str]:
    """Every image under ``root`` (recursive, symlinks followed), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'folder {str(root)!r} does not exist or is not a folder')
    exts = get_img_extensions(as_set=True)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs
                   if os.path.splitext(f)[1].lower() in exts)
    if not files:
        raise DataError(f'no images under {str(root)!r} (extensions {", ".join(get_img_extensions())})')
    return files


def _sums(path: str, mode: str, high_bit_depth: str, bands: Optional[BandSpec] = None):
    if bands is not None:
        arr = load_multiband(path, bands, path).numpy().astype(np.float64).reshape(bands.count, -1).T
    else:
        try:
            arr = np.asarray(load_image(path, mode, high_bit_depth), dtype=np.float64)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f'cannot read image {path}: {e}') from e
        arr = arr.reshape(-1, arr.shape[-1] if arr.ndim == 3 else 1)
    return arr.sum(0), np.square(arr).sum(0), arr.shape[0], arr.mean(0), arr.std(0)


def channel_stats(files: Sequence[str], mode: str = 'RGB', high_bit_depth: str = 'percentile',
                  workers: Optional[int] = None, log_every: Optional[int] = None,
                  bands: Optional[BandSpec] = None) -> Dict[str, object]:
    """Per-channel statistics: 'mean'/'std' pooled over pixels, 'image_mean'/'image_std' averaged over images,
    plus 'num_images' and 'num_pixels'; on the 0-255 scale, or with ``bands`` per band in the units of the
    multi-band pipeline's values. Progress is logged with an ETA."""
    total = s = sq = im_mean = im_std = 0
    n, start = len(files), time.time()
    log_every = log_every or max(1, n // 20)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for done, (a, b, c, m, d) in enumerate(pool.map(lambda f: _sums(f, mode, high_bit_depth, bands), files), 1):
            s, sq, total, im_mean, im_std = s + a, sq + b, total + c, im_mean + m, im_std + d
            if done % log_every == 0 or done == n:
                rate = done / max(time.time() - start, 1e-6)
                _logger.info(f'stats: [{done:>6d}/{n}]  {rate:.1f} img/s  ETA {(n - done) / rate:.0f}s')
    mean = s / total
    std = np.sqrt(np.maximum(sq / total - np.square(mean), 0.))
    return {'mean': mean.tolist(), 'std': std.tolist(), 'image_mean': (im_mean / n).tolist(),
            'image_std': (im_std / n).tolist(), 'num_images': n, 'num_pixels': int(total)}


def band_flags(bands: BandSpec) -> str:
    """The train.py flags that reproduce a band selection (--in-chans, --bands, --sensor, --reflectance-scale)."""
    flags = [f'--in-chans {bands.count}']
    if bands.indices:
        flags.append('--bands ' + ','.join(map(str, bands.indices)))
    if bands.sensor:
        flags.append(f'--sensor {bands.sensor}')
    if bands.reflectance_scale:
        flags.append(f'--reflectance-scale {bands.reflectance_scale:g}')
    return ' '.join(flags)


def format_stats(stats: Dict[str, object], method: str = 'image', bands: Optional[BandSpec] = None) -> str:
    """Human-readable report ending with the ``--mean/--std`` flags for ``method`` ('image' or 'pixel')."""
    def fmt(v, scale, digits):
        return ' '.join(f'{x / scale:.{digits}f}' for x in v)
    if method == 'image':
        mean, std, other, other_std = stats['image_mean'], stats['image_std'], 'pixel', stats['std']
        how = 'mean of per-image statistics, as the paper'
    else:
        mean, std, other, other_std = stats['mean'], stats['std'], 'image', stats['image_std']
        how = 'pooled over all pixels'
    if bands is not None:
        digits = 6 if bands.reflectance_scale or bands.dtype.startswith('float') else 3
        names = bands.names or [f'band {i}' for i in (bands.indices or range(1, bands.count + 1))]
        rows = [f'  {name:>8s}  mean {m:.{digits}f}  std {d:.{digits}f}' for name, m, d in zip(names, mean, std)]
        return '\n'.join([
            f'{stats["num_images"]} images, {stats["num_pixels"]} pixels; --method {method} ({how})',
            f'{bands.describe()}; statistics in the units of those values:', *rows,
            f'(with --method {other} the std is {fmt(other_std, 1, digits)})',
            f'flags: --mean {fmt(mean, 1, digits)} --std {fmt(std, 1, digits)} {band_flags(bands)}',
        ])
    return '\n'.join([
        f'{stats["num_images"]} images, {stats["num_pixels"]} pixels; --method {method} ({how})',
        f'mean (0-255): {fmt(mean, 1, 3)}',
        f'std  (0-255): {fmt(std, 1, 3)}',
        f'mean (0-1):   {fmt(mean, 255, 4)}',
        f'std  (0-1):   {fmt(std, 255, 4)}',
        f'(with --method {other} the std (0-255) is {fmt(other_std, 1, 3)})',
        f'flags: --mean {fmt(mean, 255, 4)} --std {fmt(std, 255, 4)}',
    ])


def main(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog='python -m timm_rsmamba.data.stats', description=__doc__.split('\n\n')[0])
    p.add_argument('root', metavar='ROOT', help='image folder (class sub-folders, or a split tool output)')
    p.add_argument('--split', default='', help='use ROOT/<split> when it exists, e.g. train (default: all of ROOT)')
    p.add_argument('--method', default='image', choices=('image', 'pixel'),
                   help="image: mean of per-image mean/std, the paper's meanstd.txt; pixel: pooled (default: image)")
    p.add_argument('--gray', action='store_true', help='statistics of the single-channel (L) conversion')
    p.add_argument('--high-bit-depth', default='percentile', choices=('percentile', 'range'),
                   help='rescaling of 16-bit/float images to 0-255 (default: percentile)')
    p.add_argument('-j', '--workers', type=int, default=None, help='decoding threads (default: up to 8)')
    p.add_argument('--in-chans', type=int, default=None, metavar='N',
                   help='bands the model takes (multi-band statistics; default: all bands of the files)')
    add_band_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        root = _resolve_split_root(args.root, args.split) if args.split and os.path.isdir(args.root) else args.root
        files = find_images(root)
        bands = _multiband_spec(args, files)
        stats = channel_stats(files, 'L' if args.gray else 'RGB', args.high_bit_depth, args.workers, bands=bands)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(format_stats(stats, args.method, bands))
    return stats


def _multiband_spec(args, files: Sequence[str]) -> Optional[BandSpec]:
    """The band selection to measure, or None for 8-bit RGB/L statistics (see the module docstring)."""
    if not wants_multiband(args.in_chans, args.bands, args.reflectance_scale):
        try:
            first = read_band_layout(files[0])[0]
        except Exception:  # unreadable: the RGB path names the file
            return None
        if first in (1, 3):
            return None
    file_bands, dtype, _ = scan_band_layout(files, workers=args.workers, what=f'{len(files)}-image folder')
    return resolve_bands(parse_band_list(args.bands), file_bands, args.sensor, args.in_chans, files[0], dtype,
                         args.reflectance_scale)


if __name__ == '__main__':
    main()
