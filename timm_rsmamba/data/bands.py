"""Band selection and band names for multi-band images.

Band numbers are 1-based, as GDAL and rasterio count them: band 1 is the first band stored in the file. Names
are known for a few sensors' band orders (``SENSORS``); ``--bands`` takes numbers, or names once ``--sensor``
says which order the files use. A ``BandSpec`` is what a checkpoint records of the bands a model reads.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from .dataset import DataError

__all__ = ['SENSORS', 'TRUE_COLOUR', 'BandSpec', 'parse_band_list', 'resolve_bands', 'canonical_band_name',
           'wants_multiband', 'add_band_args']

# Band order of the files each name stands for (1-based band i = entry i - 1).
SENSORS = {
    # ESA's order of the 13 Sentinel-2 MSI bands (L1C products, and 13-band stacks made in that order)
    'sentinel2-l1c': ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B10', 'B11', 'B12'),
    # EuroSAT-MS .tif files: the same 13 bands with B8A stored last (phelber/EuroSAT#7; torchgeo fixed its loader
    # to this order in torchgeo/torchgeo#2480)
    'eurosat-ms': ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B09', 'B10', 'B11', 'B12', 'B8A'),
    # the 12 bands of L2A products (no B10, the cirrus band), which BigEarthNet distributes
    'sentinel2-l2a': ('B01', 'B02', 'B03', 'B04', 'B05', 'B06', 'B07', 'B08', 'B8A', 'B09', 'B11', 'B12'),
}
TRUE_COLOUR = ('B04', 'B03', 'B02')  # red, green, blue of every Sentinel-2 order above


def add_band_args(group, from_checkpoint: bool = False):
    """--bands, --sensor and --reflectance-scale (train.py; validate.py and inference.py, which default to what
    the checkpoint recorded)."""
    default = ' (default: the checkpoint\'s)' if from_checkpoint else ''
    group.add_argument('--bands', nargs='+', default=None, metavar='BANDS',
                       help='bands to read from each multi-band image, in model channel order: 1-based numbers as '
                            'GDAL/rasterio count (e.g. 2,3,4,8) or, with --sensor, names (B02,B03,B04,B08)' + default)
    group.add_argument('--sensor', default=None, choices=tuple(SENSORS),
                       help='band order of the files, for band names and true-colour previews' + default)
    group.add_argument('--reflectance-scale', type=float, default=None, metavar='S',
                       help='divide multi-band values by S (10000: Sentinel-2 digital numbers to reflectance); '
                            'not to be confused with --scale, the random-resized-crop range' + default)


def wants_multiband(in_chans: Optional[int], bands=None, reflectance_scale: Optional[float] = None) -> bool:
    """Whether the scripts read images with the multi-band tensor pipeline: for band counts other than 1 and 3,
    and whenever bands are selected or values rescaled (both mean full-depth values); else timm's PIL pipeline."""
    return bool(bands) or bool(reflectance_scale) or (in_chans is not None and in_chans not in (1, 3))


def canonical_band_name(name: str) -> str:
    """'b2', 'B2', 'B02' -> 'B02'; 'b8a', 'B08A' -> 'B8A' (Sentinel-2 spellings)."""
    text = str(name).strip().upper()
    if text.startswith('B') and text[1:].isdigit():
        return f'B{int(text[1:]):02d}'
    if text in ('B8A', 'B08A'):
        return 'B8A'
    return text


def parse_band_list(values: Union[None, str, Sequence[Union[str, int]]]) -> Optional[List[Union[int, str]]]:
    """``--bands`` values ('2,3,4,8', ['2', '3'], 'B04,B03') as a list of ints (band numbers) and names."""
    if values is None:
        return None
    items = [values] if isinstance(values, (str, int)) else list(values)
    out: List[Union[int, str]] = []
    for item in items:
        for part in str(item).replace(' ', ',').split(','):
            if part:
                out.append(int(part) if part.lstrip('-').isdigit() else part)
    if not out:
        raise DataError('--bands is empty: give band numbers (1-based, e.g. --bands 2,3,4,8) or names')
    return out


@dataclass
class BandSpec:
    """The bands a model reads, and how their values were stored and scaled.

    ``indices``: 1-based band numbers taken from each file, in model channel order (None: all of them).
    ``names``: the names of those channels, when the sensor is known. ``file_bands``: bands per file.
    ``dtype``: the files' sample type ('uint16', 'float32', ...). ``reflectance_scale``: values are divided by it
    (10000 turns Sentinel-2 digital numbers into reflectance); None keeps them as stored.
    """
    file_bands: int
    indices: Optional[List[int]] = None
    names: Optional[List[str]] = None
    sensor: Optional[str] = None
    dtype: Optional[str] = None
    reflectance_scale: Optional[float] = None
    count: int = field(init=False)

    def __post_init__(self):
        self.count = len(self.indices) if self.indices else self.file_bands

    def file_band_names(self) -> Optional[Sequence[str]]:
        return SENSORS.get(self.sensor) if self.sensor else None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> Optional['BandSpec']:
        if not d:
            return None
        keys = ('file_bands', 'indices', 'names', 'sensor', 'dtype', 'reflectance_scale')
        return cls(**{k: d.get(k) for k in keys})

    def describe(self) -> str:
        picked = ','.join(map(str, self.indices)) if self.indices else f'all {self.file_bands}'
        names = f' ({",".join(self.names)})' if self.names else ''
        scale = f', divided by {self.reflectance_scale:g}' if self.reflectance_scale else ', as stored'
        return f'bands {picked}{names} of {self.file_bands}-band {self.dtype or ""} files, float32 values{scale}'


def resolve_bands(requested: Optional[Sequence[Union[int, str]]], file_bands: int, sensor: Optional[str] = None,
                  in_chans: Optional[int] = None, example: str = 'the files',
                  dtype: Optional[str] = None, reflectance_scale: Optional[float] = None) -> BandSpec:
    """Turn ``--bands`` (numbers or names), ``--sensor`` and ``--in-chans`` into a BandSpec for files with
    ``file_bands`` bands; every inconsistency is a DataError that names the flag and, via ``example``, a file."""
    if sensor and sensor not in SENSORS:
        raise DataError(f'--sensor {sensor!r} is not known; choose one of {", ".join(SENSORS)} (or leave it out '
                        f'and select bands by number)')
    order = SENSORS.get(sensor) if sensor else None
    if order is not None and len(order) != file_bands:
        raise DataError(f'--sensor {sensor} has {len(order)} bands but {example} has {file_bands}')
    indices = None
    if requested:
        indices = []
        for item in requested:
            if isinstance(item, int):
                if not 1 <= item <= file_bands:
                    raise DataError(f'--bands {item}: band numbers are 1-based (1 = the first band in the file, as '
                                    f'GDAL/rasterio count) and {example} has bands 1..{file_bands}')
                indices.append(item)
            else:
                if order is None:
                    raise DataError(f'--bands {item}: band names need --sensor to say the files\' band order '
                                    f'({", ".join(SENSORS)}); or give 1-based band numbers')
                name = canonical_band_name(item)
                if name not in order:
                    raise DataError(f'--bands {item}: {sensor} has the bands {", ".join(order)}')
                indices.append(order.index(name) + 1)
        if len(set(indices)) != len(indices):
            raise DataError(f'--bands {",".join(map(str, requested))} names a band twice')
    spec = BandSpec(file_bands, indices, None, sensor, dtype, reflectance_scale)
    if order is not None:
        spec.names = [order[i - 1] for i in (indices or range(1, file_bands + 1))]
    if in_chans is not None and in_chans != spec.count:
        if indices:
            raise DataError(f'--in-chans {in_chans} but --bands selects {spec.count} band(s); drop --in-chans or '
                            f'make them agree')
        raise DataError(f'{example} has {file_bands} bands but --in-chans is {in_chans}: pick {in_chans} of them '
                        f'with --bands (1-based numbers), or set --in-chans {file_bands}')
    return spec
