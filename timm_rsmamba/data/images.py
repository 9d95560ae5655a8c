"""Decode remote-sensing images into the 8-bit RGB (or L) PIL images timm's transforms expect.

Stock ``Image.open(f).convert('RGB')`` clips 16-bit and float images to white/black and keeps palette
transparency warnings; this module converts every mode sensibly:

* RGB / L / CMYK / YCbCr / 1: plain ``convert``.
* RGBA / LA / PA: the alpha band is dropped (in remote sensing it is usually a no-data mask, and the colour
  values under it are kept as they are).
* P (palette): expanded through its palette.
* 16-bit, 32-bit integer and float images (``I;16*``, ``I``, ``F``) are rescaled to 0-255 by
  ``high_bit_depth``:
  - ``'percentile'`` (default): linear stretch of each image from its 0.5th to 99.5th percentile (all bands
    together, so colour balance is kept). Good for 11/12-bit sensor data stored in 16-bit containers, which
    would be nearly black when divided by 65535.
  - ``'range'``: divide by the range of the type (65535 for 16-bit data, 1.0 for floats in [0, 1]); keeps
    absolute brightness comparable between images.
* Multi-band 16-bit TIFF (e.g. 16-bit RGB): Pillow decodes them to 8 bits by keeping the high byte (the
  ``'range'`` rule). When ``tifffile`` is installed they are read at full depth and rescaled as above.

Any size is accepted; the eval/train transforms resize and crop to the model's input size.
"""
import io
import logging
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

__all__ = ['HIGH_BIT_DEPTH_MODES', 'load_image', 'convert_image', 'to_uint8']

_logger = logging.getLogger(__name__)

HIGH_BIT_DEPTH_MODES = ('percentile', 'range')
_PERCENTILES = (0.5, 99.5)
_HIGH_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F', 'I;32', 'F;32')
_warned_tifffile = False


def to_uint8(arr: np.ndarray, high_bit_depth: str = 'percentile') -> np.ndarray:
    """Rescale an integer or float array (any number of bands) to uint8 as described in the module docstring."""
    if high_bit_depth not in HIGH_BIT_DEPTH_MODES:
        raise ValueError(f'high_bit_depth must be one of {HIGH_BIT_DEPTH_MODES}, got {high_bit_depth!r}')
    if arr.dtype == np.uint8:
        return arr
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.)
    if high_bit_depth == 'percentile':
        lo, hi = np.percentile(data[finite], _PERCENTILES) if finite.any() else (0., 0.)
        if hi <= lo:  # flat image: map its single value into 0-255 by the range rule instead
            return to_uint8(arr, 'range')
    elif np.issubdtype(arr.dtype, np.floating):
        lo, hi = 0., 1. if data.max(initial=0.) <= 1. else 255.
    else:
        # PIL stores 16-bit PNG/TIFF as int32 ('I'); treat values that fit in 16 bits as 16-bit data
        lo = 0.
        hi = 65535. if data.max(initial=0.) <= 65535 else float(np.iinfo(arr.dtype).max)
    out = (data - lo) * (255. / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _multiband_high_bit_tiff(img: Image.Image) -> bool:
    if img.format != 'TIFF' or img.mode not in ('RGB', 'RGBA', 'CMYK'):
        return False
    bits = img.tag_v2.get(258) if hasattr(img, 'tag_v2') else None
    if bits is None:
        return False
    bits = bits if isinstance(bits, (tuple, list)) else (bits,)
    return max(bits) > 8


def _read_tifffile(fp) -> Union[np.ndarray, None]:
    global _warned_tifffile
    try:
        import tifffile
    except ImportError:
        if not _warned_tifffile:
            _logger.warning(
                'multi-band TIFF with more than 8 bits per sample: Pillow keeps only the high byte of each value '
                '(dark images for 11/12-bit data). `pip install tifffile` to read them at full depth.')
            _warned_tifffile = True
        return None
    fp.seek(0)
    arr = tifffile.imread(fp)
    if arr.ndim == 3 and arr.shape[0] < arr.shape[-1] and arr.shape[0] <= 4:  # planar (bands, H, W)
        arr = np.moveaxis(arr, 0, -1)
    return arr


def convert_image(img: Image.Image, mode: str = 'RGB', high_bit_depth: str = 'percentile') -> Image.Image:
    """Convert a decoded PIL image to ``mode`` ('RGB' or 'L'), handling alpha, palettes and high bit depths."""
    if img.mode in _HIGH_BIT_MODES or img.mode.startswith('I;16'):
        img = Image.fromarray(to_uint8(np.asarray(img), high_bit_depth), 'L')
    elif img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    elif img.mode == 'PA':
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'RGBa'):
        img = img.convert('RGB')  # drops the alpha band, keeps the colour values under it
    elif img.mode in ('LA', 'La'):
        img = img.getchannel(0)
    if img.mode != mode:
        img = img.convert(mode)
    return img


def load_image(
        source: Union[str, os.PathLike, BinaryIO, bytes],
        mode: str = 'RGB',
        high_bit_depth: str = 'percentile',
) -> Image.Image:
    """Open, fully decode (so truncated files fail here, not later) and convert one image; closes the file."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    own = isinstance(source, (str, os.PathLike))
    fp = open(source, 'rb') if own else source
    try:
        with Image.open(fp) as img:
            img.load()
            if _multiband_high_bit_tiff(img):
                arr = _read_tifffile(fp)
                if arr is not None:
                    arr = to_uint8(arr, high_bit_depth)
                    if arr.ndim == 3:
                        arr = np.ascontiguousarray(arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0])
                    return convert_image(Image.fromarray(arr, 'RGB' if arr.ndim == 3 else 'L'), mode)
            return convert_image(img, mode, high_bit_depth)
    finally:
        fp.close()  # readers hand over open handles; closing here avoids leaking one per sample
