"""Multi-band images (Sentinel-2 and other GeoTIFF chips) read at full depth into float32 tensors.

Reading uses ``tifffile``: pure Python on numpy, no GDAL, and it reads every layout GDAL writes for chips
(pixel- or band-interleaved, one page per band, tiled or striped, uncompressed or DEFLATE; LZW and other codecs
need ``pip install imagecodecs``). Classification needs the pixels only, so the georeferencing tags are not
read. Other formats (PNG, JPEG) are decoded by Pillow into the same (bands, H, W) array.

Conventions, the same in train.py, validate.py, inference.py and the stats tool:

* band i (1-based, as GDAL/rasterio count) is the file's i-th band: the i-th sample of each pixel for
  pixel-interleaved files, the i-th plane or page otherwise;
* values are the stored numbers converted to float32 (16-bit data is exact), divided by ``reflectance_scale``
  when one is given (10000 turns Sentinel-2 digital numbers into reflectance), and nothing else: no clipping,
  no stretch, no masking of no-data values;
* every file of a dataset must have the same number of bands and the same sample type (a uint16 file among
  float32 ones is usually a different product or scaling).
"""
import io
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .bands import BandSpec
from .dataset import CorruptImageError, DataError, RSImageDataset, _fmt_names

__all__ = ['read_bands', 'read_band_layout', 'scan_band_layout', 'bands_to_tensor', 'load_multiband',
           'MultibandImageDataset', 'TIFF_EXTENSIONS']

_logger = logging.getLogger(__name__)

TIFF_EXTENSIONS = ('.tif', '.tiff')
Source = Union[str, os.PathLike, BinaryIO, bytes]
_PIL_DTYPES = {'I;16': 'uint16', 'I;16L': 'uint16', 'I;16B': 'uint16', 'I;16N': 'uint16', 'I': 'int32', 'F': 'float32'}


def _is_tiff(fp: BinaryIO) -> bool:
    head = fp.read(4)
    fp.seek(0)
    return head[:2] in (b'II', b'MM')


def _band_axis(axes: str, ndim: int) -> Optional[int]:
    """Where the bands are in a tifffile series: none (one band), last ('YXS': pixel-interleaved) or first
    (planar 'SYX', one page per band 'QYX'/'IYX', ImageJ 'CYX')."""
    if ndim == 2:
        return None
    if ndim == 3:
        return -1 if axes.endswith('S') else 0
    raise ValueError(f'a {ndim}-D image (axes {axes}); expected one image of (bands, height, width)')


def _open(source: Source) -> BinaryIO:
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        return open(source, 'rb')
    return source


def _codec_error(err: Exception) -> bool:
    return 'imagecodecs' in str(err)


def read_bands(source: Source) -> np.ndarray:
    """Every band of one image as a (bands, H, W) array of the stored type (closes what it opens)."""
    fp = _open(source)
    try:
        if _is_tiff(fp):
            import tifffile
            with tifffile.TiffFile(fp) as tif:
                series = tif.series[0]
                arr = series.asarray()
                axis = _band_axis(series.axes, arr.ndim)
        else:
            from PIL import Image
            with Image.open(fp) as img:
                img.load()
                if img.mode == 'P':
                    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
                arr = np.asarray(img)
            axis = None if arr.ndim == 2 else -1
    finally:
        fp.close()  # folder readers hand over open handles; closing here avoids leaking one per sample
    if axis is None:
        return arr[None]
    return np.moveaxis(arr, axis, 0) if axis == -1 else arr


def read_band_layout(path: str) -> Tuple[int, str, Tuple[int, int]]:
    """(bands, sample type, (H, W)) of a file from its header, without decoding the pixels."""
    with open(path, 'rb') as fp:
        if _is_tiff(fp):
            import tifffile
            with tifffile.TiffFile(fp) as tif:
                series = tif.series[0]
                shape, axes, dtype = series.shape, series.axes, series.dtype
        else:
            from PIL import Image
            with Image.open(fp) as img:
                bands = 3 if img.mode == 'P' else len(img.getbands())
                shape, dtype = (img.height, img.width, bands), _PIL_DTYPES.get(img.mode, 'uint8')
                axes = 'YXS'
    if len(shape) == 3 and shape[-1] == 1 and axes == 'YXS':
        shape, axes = shape[:2], 'YX'
    axis = _band_axis(axes, len(shape))
    if axis is None:
        return 1, np.dtype(dtype).name, tuple(shape)
    bands = shape[axis]
    hw = tuple(shape[:-1]) if axis == -1 else tuple(shape[1:])
    return int(bands), np.dtype(dtype).name, hw


def _read_error(name: str, err: Exception) -> DataError:
    if _codec_error(err):  # a missing codec is set-up, not a corrupt file: --skip-corrupt must not drop them all
        return DataError(f'cannot decode {name}: {err}. Install it (`pip install imagecodecs`) to read TIFFs '
                         f'compressed with LZW, JPEG, ZSTD or other codecs beyond DEFLATE')
    return CorruptImageError(f'cannot read image {name}: {type(err).__name__}: {err}. Replace or delete the file, '
                             f'or pass --skip-corrupt to leave unreadable images out and count them.')


def scan_band_layout(files: Sequence[str], skip_corrupt: bool = False, workers: Optional[int] = None,
                     what: str = 'dataset') -> Tuple[int, str, List[int]]:
    """Read every file's header: (bands per file, sample type, indices of unreadable files).

    Files whose band count or sample type differs from the others are a DataError that names them; unreadable
    headers are too, unless ``skip_corrupt``, which returns their indices to leave out.
    """
    n, start, step = len(files), time.time(), max(1, len(files) // 10)

    def header(path):
        try:
            return read_band_layout(path)
        except Exception as e:  # tifffile, Pillow and the OS raise many types; each means this file is unreadable
            return _read_error(path, e)

    layouts, bad = [], []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for done, res in enumerate(pool.map(header, files), 1):
            if isinstance(res, DataError):
                if skip_corrupt and isinstance(res, CorruptImageError):
                    bad.append(done - 1)
                else:
                    raise res
            else:
                layouts.append((done - 1, res))
            if n > 500 and (done % step == 0 or done == n):
                rate = done / max(time.time() - start, 1e-6)
                _logger.info(f'Reading band layouts: {done}/{n}  ETA {(n - done) / rate:.0f}s')
    if not layouts:
        raise DataError(f'every image of the {what} is unreadable')
    for key, label in ((0, 'band count'), (1, 'sample type')):
        counts = Counter(layout[key] for _, layout in layouts)
        if len(counts) > 1:
            common = counts.most_common(1)[0][0]
            odd = [files[i] for i, layout in layouts if layout[key] != common]
            values = ', '.join(f'{v}: {c} file(s)' for v, c in counts.most_common())
            example = {v: next(files[i] for i, lay in layouts if lay[key] == v) for v in counts}
            hint = ('every file must hold the same bands' if key == 0 else
                    'mixed types usually mean mixed products or scalings (digital numbers next to reflectance); '
                    'convert the odd files to one type')
            raise DataError(
                f'the {what} mixes {label}s ({values}; e.g. {", ".join(f"{v}: {f}" for v, f in example.items())}); '
                f'{hint}. Files differing from the most common {label} ({common}): {_fmt_names(odd, 5)}')
    bands, dtype, _ = layouts[0][1]
    return bands, dtype, bad


def bands_to_tensor(arr: np.ndarray, spec: BandSpec, name: str = 'image') -> torch.Tensor:
    """Select ``spec``'s bands of a (bands, H, W) array, as float32, divided by the reflectance scale."""
    if arr.shape[0] != spec.file_bands:
        raise DataError(f'{name} has {arr.shape[0]} band(s) but the model reads {spec.describe()}')
    if spec.dtype and np.dtype(arr.dtype).name != spec.dtype:
        raise DataError(f'{name} stores {np.dtype(arr.dtype).name} values, the other images {spec.dtype}: '
                        f'mixed sample types in one dataset (convert the file, or leave it out)')
    if spec.indices:
        arr = arr[[i - 1 for i in spec.indices]]
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if spec.reflectance_scale:
        out = out / spec.reflectance_scale
    return out


def load_multiband(source: Source, spec: BandSpec, name: str) -> torch.Tensor:
    """Decode one image into the model's (bands, H, W) float32 tensor; errors name ``name``."""
    try:
        arr = read_bands(source)
    except Exception as e:  # see scan_band_layout
        raise _read_error(name, e) from e
    return bands_to_tensor(arr, spec, name)


class MultibandImageDataset(RSImageDataset):
    """An image folder whose samples are (bands, H, W) float32 tensors of ``bands``' selection.

    Created by ``create_rs_dataset(..., multiband=True)``, which reads every header once: ``file_bands`` and
    ``dtype`` are the dataset's, and files that disagree are an error naming them. ``bands`` (a BandSpec) is set
    by the caller once the selection is resolved (until then: every band, as stored); the transform then works
    on tensors (``data.transforms``).
    """

    def __init__(self, reader, transform=None, target_transform=None):
        super().__init__(reader, input_img_mode='', transform=transform, target_transform=target_transform)
        self.bands: Optional[BandSpec] = None
        self.file_bands: Optional[int] = None
        self.dtype: Optional[str] = None

    def example_file(self) -> str:
        return self.describe(0)

    def scan(self, skip_corrupt: bool = False) -> List[str]:
        """Read the band layout of every file (see scan_band_layout); returns the unreadable files left out."""
        files = [str(s[0]) for s in self.reader.samples]
        self.file_bands, self.dtype, bad = scan_band_layout(files, skip_corrupt, what=f'{len(files)}-image split')
        skipped = [files[i] for i in bad]
        if bad:
            self.reader.samples = [s for i, s in enumerate(self.reader.samples) if i not in set(bad)]
            _logger.warning(f'skipped {len(bad)} unreadable image(s) of {len(files)}: {_fmt_names(skipped, 5)}')
        return skipped

    def load(self, index: int):
        img, target, *_ = self.reader[index]
        spec = self.bands or BandSpec(self.file_bands, dtype=self.dtype)  # until set: every band, as stored
        return load_multiband(img, spec, self.describe(index)), target
