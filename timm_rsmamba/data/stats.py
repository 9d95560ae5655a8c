"""Per-channel mean and std of an image folder, for ``--mean`` / ``--std``.

    python -m timm_rsmamba.data.stats ROOT [--split train] [--method image|pixel] [-j 4]

Two conventions, both computed in one pass on the decoded 8-bit RGB values (``load_image``; 16-bit data is
rescaled as documented there):

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

from .dataset import DataError, _resolve_split_root
from .images import load_image

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


def _sums(path: str, mode: str, high_bit_depth: str):
    try:
        arr = np.asarray(load_image(path, mode, high_bit_depth), dtype=np.float64)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f'cannot read image {path}: {e}') from e
    arr = arr.reshape(-1, arr.shape[-1] if arr.ndim == 3 else 1)
    return arr.sum(0), np.square(arr).sum(0), arr.shape[0], arr.mean(0), arr.std(0)


def channel_stats(files: Sequence[str], mode: str = 'RGB', high_bit_depth: str = 'percentile',
                  workers: Optional[int] = None, log_every: Optional[int] = None) -> Dict[str, object]:
    """Per-channel statistics on the 0-255 scale: 'mean'/'std' pooled over pixels, 'image_mean'/'image_std'
    averaged over images, plus 'num_images' and 'num_pixels'. Progress is logged with an ETA."""
    total = s = sq = im_mean = im_std = 0
    n, start = len(files), time.time()
    log_every = log_every or max(1, n // 20)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for done, (a, b, c, m, d) in enumerate(pool.map(lambda f: _sums(f, mode, high_bit_depth), files), 1):
            s, sq, total, im_mean, im_std = s + a, sq + b, total + c, im_mean + m, im_std + d
            if done % log_every == 0 or done == n:
                rate = done / max(time.time() - start, 1e-6)
                _logger.info(f'stats: [{done:>6d}/{n}]  {rate:.1f} img/s  ETA {(n - done) / rate:.0f}s')
    mean = s / total
    std = np.sqrt(np.maximum(sq / total - np.square(mean), 0.))
    return {'mean': mean.tolist(), 'std': std.tolist(), 'image_mean': (im_mean / n).tolist(),
            'image_std': (im_std / n).tolist(), 'num_images': n, 'num_pixels': int(total)}


def format_stats(stats: Dict[str, object], method: str = 'image') -> str:
    """Human-readable report ending with the ``--mean/--std`` flags for ``method`` ('image' or 'pixel')."""
    def fmt(v, scale, digits):
        return ' '.join(f'{x / scale:.{digits}f}' for x in v)
    if method == 'image':
        mean, std, other, other_std = stats['image_mean'], stats['image_std'], 'pixel', stats['std']
        how = 'mean of per-image statistics, as the paper'
    else:
        mean, std, other, other_std = stats['mean'], stats['std'], 'image', stats['image_std']
        how = 'pooled over all pixels'
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        root = _resolve_split_root(args.root, args.split) if args.split and os.path.isdir(args.root) else args.root
        stats = channel_stats(find_images(root), 'L' if args.gray else 'RGB', args.high_bit_depth, args.workers)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(format_stats(stats, args.method))
    return stats


if __name__ == '__main__':
    main()
