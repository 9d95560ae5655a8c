"""Datasets for remote-sensing folders and HuggingFace datasets, built through ``timm.data.create_dataset``.

timm resolves the data (ImageFolder with ``split`` sub-folder search, ``hfds/NAME``, local ``hfds//abs/path``
imagefolder or parquet folders); this module adds what remote-sensing data needs on top: .tif/.tiff, 16-bit,
palette and RGBA decoding (``images.load_image``), errors that name the folder or file and say what to do, an
optional skip-and-count of corrupt images, and ``.label_names`` on every dataset.
"""
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from PIL.Image import DecompressionBombError
from timm.data import ImageDataset, create_dataset
from timm.data.readers.img_extensions import get_img_extensions

from .images import load_image

__all__ = ['DataError', 'CorruptImageError', 'RSImageDataset', 'create_rs_dataset', 'check_num_classes',
           'image_mode_for_channels',
           'label_mapping', 'SPLIT_NAMES']

_logger = logging.getLogger(__name__)

# folder names timm's split search (and our split tool) treat as splits rather than classes
SPLIT_NAMES = ('train', 'training', 'val', 'valid', 'validation', 'eval', 'evaluation', 'test')


class DataError(ValueError):
    """Bad data input (missing / empty folder, unknown split, class mismatch); the message says what to do."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def image_mode_for_channels(in_chans: int) -> str:
    """PIL mode timm's (PIL) pipelines decode to for a model with ``in_chans`` input channels: 'L' or 'RGB'.

    Other band counts go through the multi-band tensor pipeline (``create_rs_dataset(..., multiband=True)``).
    """
    if in_chans in (1, 3):
        return 'L' if in_chans == 1 else 'RGB'
    raise DataError(
        f'--in-chans {in_chans}: Pillow decodes 1-channel (grayscale) or 3-channel (RGB) images only; '
        f'{in_chans}-band images are read by the multi-band pipeline (create_rs_dataset(..., multiband=True))')


def _fmt_names(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    more = f', ... ({len(names) - limit} more)' if len(names) > limit else ''
    return ', '.join(repr(n) for n in names[:limit]) + more


class RSImageDataset(ImageDataset):
    """timm ``ImageDataset`` over any map-style timm reader, decoding with ``load_image``.

    A file that fails to decode raises ``CorruptImageError`` naming it (timm would silently substitute the next
    sample, which changes evaluation results); ``remove_corrupt()`` scans once and drops such files instead.
    """

    def __init__(self, reader, input_img_mode: str = 'RGB', high_bit_depth: str = 'percentile',
                 transform=None, target_transform=None):
        super().__init__(None, reader=reader, input_img_mode=input_img_mode, transform=transform,
                         target_transform=target_transform)
        self.high_bit_depth = high_bit_depth
        self.label_names = _label_names(reader)
        self.skipped_files: List[str] = []

    def describe(self, index: int) -> str:
        """The sample's file path (or its position when the dataset holds bare bytes)."""
        samples = getattr(self.reader, 'samples', None)
        if samples is not None:
            return str(samples[index][0])
        try:
            name = self.reader.filename(index, absolute=True)
        except Exception:
            name = None
        return str(name) if name else f'sample {index} of {getattr(self.reader, "split", "the dataset")}'

    def load(self, index: int):
        img, target, *_ = self.reader[index]
        try:
            return load_image(img, self.input_img_mode or 'RGB', self.high_bit_depth), target
        except (OSError, ValueError, SyntaxError, DecompressionBombError) as e:
            raise CorruptImageError(
                f'cannot read image {self.describe(index)}: {e}. Replace or delete the file, or pass '
                f'--skip-corrupt (skip_corrupt=True) to leave unreadable images out and count them.') from e

    def __getitem__(self, index):
        img, target = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def remove_corrupt(self, workers: Optional[int] = None) -> List[str]:
        """Decode every image once (threads), drop the unreadable ones; returns and logs their names."""
        n = len(self)
        bad, start, step = [], time.time(), max(1, n // 10)

        def check(i):
            try:
                self.load(i)
                return None
            except CorruptImageError:
                return i

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            for done, res in enumerate(pool.map(check, range(n)), 1):
                if res is not None:
                    bad.append(res)
                if done % step == 0 or done == n:
                    rate = done / max(time.time() - start, 1e-6)
                    _logger.info(f'Checking images: {done}/{n}  ETA {(n - done) / rate:.0f}s  unreadable: {len(bad)}')
        self.skipped_files = [self.describe(i) for i in bad]
        if bad:
            _drop_samples(self.reader, set(bad))
            _logger.warning(
                f'skipped {len(bad)} unreadable image(s) of {n}: {_fmt_names(self.skipped_files, 5)}')
        return self.skipped_files


def _drop_samples(reader, bad: set):
    if hasattr(reader, 'samples'):
        reader.samples = [s for i, s in enumerate(reader.samples) if i not in bad]
    elif hasattr(reader, 'dataset'):  # HF datasets reader
        reader.dataset = reader.dataset.select([i for i in range(len(reader.dataset)) if i not in bad])
        reader.num_samples = len(reader.dataset)
    else:
        raise DataError(f'cannot skip corrupt images with a {type(reader).__name__} reader')


def _label_names(reader) -> Optional[List[str]]:
    """Names by class index, from the reader's class_to_idx (folder names, ClassLabel names or the class map)."""
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if not class_to_idx:
        return None
    by_index = {}
    for name, idx in class_to_idx.items():
        if idx in by_index:
            raise DataError(f'class map gives index {idx} to both {by_index[idx]!r} and {name!r}')
        by_index[int(idx)] = str(name)
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(
            f'class indices must be 0..{len(by_index) - 1} without gaps, got {sorted(by_index)[:10]}...; '
            f'fix the class map')
    return [by_index[i] for i in range(len(by_index))]


def _resolve_split_root(root: str, split: str) -> str:
    from timm.data.dataset_factory import _search_split  # timm's own rule, so errors describe what it does
    return _search_split(root, split)


def _folder_checks(root: str, split: str) -> str:
    """Clear errors for the ImageFolder cases timm reports vaguely or not at all; returns the resolved folder."""
    if not root:
        raise DataError('no data folder given: pass the dataset folder as the first argument or with --data-dir')
    if not os.path.exists(root):
        raise DataError(f'data folder {root!r} does not exist')
    if os.path.isfile(root):
        if root.endswith('.tar'):
            return root
        raise DataError(f'{root!r} is a file; give the folder that holds one sub-folder per class '
                        f'(or {"/".join(SPLIT_NAMES[:3])}/ split folders)')
    entries = [e for e in os.listdir(root) if not e.startswith('.')]
    if not entries:
        raise DataError(f'data folder {root!r} is empty; it should hold one sub-folder of images per class, or '
                        f'train/ and val/ folders made by `python -m timm_rsmamba.data.split`')
    resolved = _resolve_split_root(root, split)
    if os.path.abspath(resolved) == os.path.abspath(root) and split:
        present = sorted(e for e in entries if e.lower() in SPLIT_NAMES and os.path.isdir(os.path.join(root, e)))
        if present:
            raise DataError(
                f'split {split!r} not found in {root!r} (it has the split folders {", ".join(present)}); '
                f'choose one of them with --split / --train-split / --val-split')
        _logger.info(f'no {split!r} sub-folder in {root!r}: the {split!r} split is all of it (make train/val '
                     f'folders with `python -m timm_rsmamba.data.split`)')
    return resolved


def create_rs_dataset(
        name: str,
        root: Optional[str],
        split: str = 'validation',
        is_training: bool = False,
        class_map=None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        skip_corrupt: bool = False,
        batch_size: int = 1,
        seed: int = 42,
        num_samples: Optional[int] = None,
        input_img_mode: str = 'RGB',
        high_bit_depth: str = 'percentile',
        multiband: bool = False,
        **kwargs,
):
    """A timm dataset for ``name``/``root``/``split`` with ``.label_names`` (None when the source has none).

    ``name``: '' (ImageFolder, timm's split sub-folder search), ``hfds/NAME`` (HF hub dataset, cached offline
    copies work with HF_DATASETS_OFFLINE=1) or ``hfds//abs/path`` (a local imagefolder or parquet folder). Other
    timm prefixes (hfids/, wds/, tfds/, torch/) pass through to ``timm.data.create_dataset`` unchanged.
    ``skip_corrupt``: decode every image once and leave unreadable ones out (their names are logged and kept in
    ``dataset.skipped_files``); otherwise an unreadable image raises ``CorruptImageError`` naming it.
    ``multiband``: a ``MultibandImageDataset`` of full-depth (bands, H, W) float32 tensors (image folders only),
    whose file headers are read once to check that every file has the same bands and sample type.
    """
    name = name or ''
    prefix, sep, rest = name.partition('/')
    prefix = prefix.lower() if sep else ''
    class_map = class_map or None
    if class_map and isinstance(class_map, str) and not os.path.exists(class_map) and not (
            root and os.path.exists(os.path.join(root, class_map))):
        raise DataError(f'class map file {class_map!r} does not exist (--class-map expects a .txt with one class '
                        f'name per line, in index order)')
    if multiband and prefix:
        raise DataError(f'--dataset {name}: multi-band images are read from image folders (class sub-folders of '
                        f'GeoTIFF chips); {prefix}/ datasets decode through Pillow, which holds 1 or 3 channels')
    common = dict(class_map=class_map, input_key=input_key, is_training=is_training,
                  batch_size=batch_size, seed=seed, num_samples=num_samples, **kwargs)

    if not prefix:
        resolved = _folder_checks(root, split)
        try:  # input_key selects file extensions here (timm's ImageFolder); folders have no target key
            base = create_dataset(name, root=root, split=split, input_img_mode=None, **common)
        except (RuntimeError, AssertionError) as e:
            if 'Found 0 images' in str(e):
                where = f'split {split!r} ({resolved})' if resolved != root else f'{resolved}'
                raise DataError(
                    f'{where} has no images: expected <class>/<image> files with extensions '
                    f'{", ".join(get_img_extensions())}') from e
            raise
        reader = base.reader
        samples = getattr(reader, 'samples', [])
        names = _label_names(reader) or []
        if '' in names:
            raise DataError(f'images lie directly in {resolved!r}; put them in one sub-folder per class')
        misplaced = sorted(n for n in names if n.lower() in SPLIT_NAMES)
        if misplaced:
            raise DataError(
                f'{resolved!r} has split folders {misplaced} where class folders are expected; point at one split '
                f'with --split / --train-split / --val-split')
        if class_map and samples is not None:
            _warn_unmapped_folders(resolved, reader)
    elif prefix == 'hfds':
        try:
            base = create_dataset(name, root=root, split=split, input_img_mode=None, target_key=target_key, **common)
        except Exception as e:  # datasets raises many types; all mean "cannot load this name/split"
            raise DataError(_hfds_message(rest, split, e)) from e
        reader = base.reader
        if not getattr(reader, 'class_to_idx', None):
            reader.class_to_idx = _hf_int_labels(reader)
    else:
        base = create_dataset(name, root=root, split=split, input_img_mode=input_img_mode, target_key=target_key,
                              **common)
        reader = getattr(base, 'reader', None)
        base.label_names = _label_names(reader) if reader is not None else None
        return base

    if multiband:
        from .multiband import MultibandImageDataset
        ds = MultibandImageDataset(reader)
    else:
        ds = RSImageDataset(reader, input_img_mode=input_img_mode, high_bit_depth=high_bit_depth)
    ds.source_folder = os.path.abspath(resolved) if not prefix else None  # lets train.py spot train == val
    if len(ds) == 0:
        raise DataError(f'split {split!r} of {name or root!r} has no samples')
    if multiband:
        unreadable = ds.scan(skip_corrupt)
    if skip_corrupt:
        ds.remove_corrupt()
        if multiband:
            ds.skipped_files = unreadable + ds.skipped_files
        if len(ds) == 0:
            raise DataError(f'every image of split {split!r} in {name or root!r} is unreadable')
    return ds


def _warn_unmapped_folders(root: str, reader):
    """timm drops images of folders missing from the class map without a word; say so."""
    mapped = set(reader.class_to_idx)
    folders = set()
    for dirpath, _, files in os.walk(root, followlinks=True):
        if dirpath != root and any(os.path.splitext(f)[1].lower() in get_img_extensions(as_set=True) for f in files):
            folders.add(os.path.basename(dirpath))
    missing = sorted(folders - mapped)
    if missing:
        _logger.warning(f'class folders not in the class map are left out: {_fmt_names(missing)}')
    if not reader.samples:
        raise DataError(f'no class folder in {root!r} matches a class map name ({_fmt_names(sorted(mapped))})')


def _hf_int_labels(reader) -> dict:
    """Class names for an HF dataset whose label column is plain integers: '0', '1', ... up to the max label."""
    key = reader.label_key
    if not key or key not in reader.dataset.column_names:
        return {}
    labels = reader.dataset[key]
    if not labels or not all(isinstance(v, int) for v in labels):
        return {}
    return {str(i): i for i in range(max(labels) + 1)}


def _hfds_message(path: str, split: str, err: Exception) -> str:
    text = f'{type(err).__name__}: {err}'
    if path.startswith('/') and not os.path.exists(path):
        return f'local dataset folder {path!r} (from hfds/{path}) does not exist'
    if 'split' in str(err).lower() and ('unknown' in str(err).lower() or 'should be one of' in str(err).lower()):
        return f'dataset hfds/{path} has no split {split!r} ({text}); choose another with --split'
    if 'offline' in str(err).lower() or 'connect' in str(err).lower() or 'couldn\'t reach' in str(err).lower():
        return (f'dataset hfds/{path} is not in the local HuggingFace cache and the hub cannot be reached ({text}). '
                f'Download it once online, or point at a local folder with hfds//ABSOLUTE/PATH')
    if 'column' in str(err).lower() or isinstance(err, KeyError):
        return (f'dataset hfds/{path}: {text}. Name the image and label columns with --input-key / --target-key')
    return f'cannot load dataset hfds/{path} split {split!r}: {text}'


def check_num_classes(num_classes: Optional[int], label_names: Optional[Sequence[str]]) -> Optional[int]:
    """``num_classes`` if it agrees with the data's classes (or the data's count when None); else DataError."""
    if label_names is None:
        return num_classes
    n = len(label_names)
    if num_classes is None:
        return n
    if int(num_classes) != n:
        raise DataError(
            f'--num-classes {num_classes} does not match the data, which has {n} classes '
            f'({_fmt_names(label_names)}). Drop --num-classes to use {n}, or give a --class-map listing '
            f'{num_classes} classes.')
    return int(num_classes)


def _norm(name: str) -> str:
    return ''.join(ch for ch in str(name).casefold() if ch.isalnum())


def label_mapping(model_label_names: Sequence[str], data_label_names: Sequence[str]) -> List[int]:
    """``m[i]`` = the model's class index for the data's class ``i``, matched by name.

    Names match exactly, or else after lower-casing and dropping spaces/underscores/hyphens when that is
    unambiguous ('Tennis_Court' == 'tenniscourt'). The model may know classes the data lacks (their support is
    0); a data class the model does not know raises DataError listing every unmatched name.
    """
    model, data = [str(n) for n in model_label_names], [str(n) for n in data_label_names]
    for what, names in (('model', model), ('data', data)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f'the {what} label names repeat {dup}; class names must be unique')
    exact = {n: i for i, n in enumerate(model)}
    loose = {}
    for i, n in enumerate(model):
        loose.setdefault(_norm(n), []).append(i)
    mapping, unmatched = [], []
    for n in data:
        if n in exact:
            mapping.append(exact[n])
        elif len(loose.get(_norm(n), [])) == 1:
            mapping.append(loose[_norm(n)][0])
        else:
            unmatched.append(n)
    if unmatched:
        unused = [n for i, n in enumerate(model) if i not in set(mapping)]
        raise DataError(
            f'{len(unmatched)} data class(es) have no class of the same name in the model: '
            f'{_fmt_names(unmatched, 50)}. Model classes without a data match: {_fmt_names(unused, 50)}. '
            f'Rename the folders to the model\'s class names, or pass --class-map with the model\'s names in '
            f'its index order.')
    return mapping
