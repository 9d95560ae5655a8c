"""Predictions drawn on the images they were made for (``inference.py --show-dir``).

Each image is shown as it is, at full resolution: RGB and grayscale files as Pillow decodes them (16-bit ones
stretched to 8 bits as ``data.images`` documents), multi-band files as an RGB composite. Chips narrower than
``MIN_WIDTH`` are enlarged by a whole factor (nearest neighbour: every pixel stays a visible square), and the top-k
labels with their probabilities are written in a strip under the image, so they never hide pixels and stay
readable on a 64 px chip.

The composite: the true-colour bands (B04, B03, B02) when the band order is known (``--sensor``), else the first
three bands (one band: grey), each stretched linearly from its 2nd to its 98th percentile to 0-255 (the
cumulative-cut stretch GIS viewers apply by default; the band's own range, so colours are balanced per band).
"""
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.bands import TRUE_COLOUR

__all__ = ['MIN_WIDTH', 'STRETCH_PERCENTILES', 'composite_bands', 'rgb_composite', 'prediction_lines', 'annotate',
           'save_annotated']

MIN_WIDTH = 256
STRETCH_PERCENTILES = (2., 98.)
_BACKGROUND, _TEXT = (20, 20, 20), (255, 255, 255)


def composite_bands(band_names: Optional[Sequence[str]], count: int) -> List[int]:
    """0-based bands shown as red, green, blue: true colour when the names have it, else the first three."""
    if band_names and all(b in band_names for b in TRUE_COLOUR):
        return [list(band_names).index(b) for b in TRUE_COLOUR]
    return [0, 1, 2] if count >= 3 else [0, 0, 0]


def _stretch(band: np.ndarray, percentiles: Tuple[float, float]) -> np.ndarray:
    data = band.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(data[finite], percentiles)
    if hi <= lo:  # a flat band: mid grey rather than a division by zero
        return np.full(band.shape, 128, np.uint8)
    out = (np.where(finite, data, lo) - lo) * (255. / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def rgb_composite(bands: np.ndarray, band_names: Optional[Sequence[str]] = None,
                  percentiles: Tuple[float, float] = STRETCH_PERCENTILES) -> Image.Image:
    """An RGB picture of a (bands, H, W) array (see the module docstring)."""
    picks = composite_bands(band_names, bands.shape[0])
    return Image.fromarray(np.stack([_stretch(bands[i], percentiles) for i in picks], axis=-1), 'RGB')


def prediction_lines(labels: Sequence[str], probs: Sequence[float]) -> List[str]:
    return [f'{i + 1}. {label}  {100 * float(p):.1f}%' for i, (label, p) in enumerate(zip(labels, probs))]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def annotate(image: Image.Image, lines: Sequence[str], min_width: int = MIN_WIDTH) -> Image.Image:
    """``image`` (enlarged by a whole factor up to ``min_width``) above a strip holding ``lines``."""
    image = image.convert('RGB')
    factor = max(1, math.ceil(min_width / image.width))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    font = _font(max(12, min(32, image.width // 16)))
    ascent, descent = font.getmetrics() if hasattr(font, 'getmetrics') else (11, 3)
    line_height, pad = ascent + descent + 4, max(4, image.width // 64)
    canvas = Image.new('RGB', (image.width, image.height + 2 * pad + line_height * len(lines)), _BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, image.height + pad + i * line_height), line, fill=_TEXT, font=font)
    return canvas


def save_annotated(image: Image.Image, lines: Sequence[str], path: str, fmt: str = 'png') -> str:
    """Write the annotated image as PNG or JPEG (quality 95) to ``path`` (its folders made); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = annotate(image, lines)
    if fmt == 'png':
        out.save(path, format='PNG')
    else:
        out.save(path, format='JPEG', quality=95)
    return path
