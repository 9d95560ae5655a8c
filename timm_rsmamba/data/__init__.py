"""Remote-sensing data for timm: datasets with label names, robust image decoding, class-order mapping, and
multi-band (e.g. 13-band Sentinel-2) images read at full depth with tensor transforms.

Command-line tools: ``python -m timm_rsmamba.data.split`` (class folders -> train/val[/test], by ratio or from
the paper's split lists) and ``python -m timm_rsmamba.data.stats`` (per-channel mean/std).
"""
from timm.data import add_img_extensions as _add_img_extensions, get_img_extensions as _get_img_extensions

from .dataset import (
    SPLIT_NAMES, CorruptImageError, DataError, RSImageDataset, check_num_classes, create_rs_dataset,
    image_mode_for_channels, label_mapping,
)
from .images import HIGH_BIT_DEPTH_MODES, convert_image, load_image, to_uint8
from .bands import SENSORS, BandSpec, parse_band_list, resolve_bands, wants_multiband
from .multiband import MultibandImageDataset, load_multiband, read_bands, scan_band_layout
from .transforms import create_multiband_loader, multiband_transform, refuse_colour_ops

__all__ = [
    'create_rs_dataset', 'RSImageDataset', 'check_num_classes', 'label_mapping', 'image_mode_for_channels',
    'DataError', 'CorruptImageError',
    'SPLIT_NAMES', 'load_image', 'convert_image', 'to_uint8', 'HIGH_BIT_DEPTH_MODES',
    'SENSORS', 'BandSpec', 'parse_band_list', 'resolve_bands', 'wants_multiband',
    'MultibandImageDataset', 'load_multiband', 'read_bands', 'scan_band_layout',
    'create_multiband_loader', 'multiband_transform', 'refuse_colour_ops',
]

_add_img_extensions(tuple(e for e in ('.tif', '.tiff') if e not in _get_img_extensions()))  # UC Merced ships .tif
