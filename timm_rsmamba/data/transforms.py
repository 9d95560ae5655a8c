"""Augmentation and evaluation transforms for multi-band float32 tensors (torchvision.transforms.v2).

timm's transforms expect 8-bit PIL images; ``multiband_transform`` builds the same steps for (bands, H, W)
tensors of any band count, with timm's flag semantics: RandomResizedCrop (``--scale``, ``--ratio``,
``--train-interpolation``, 'random' picking bilinear or bicubic per image as timm does), ``--hflip``,
``--vflip``, ``--rot90`` (exact rotations by multiples of 90 degrees), ``--gaussian-blur-prob``, per-band
normalisation (``--mean``/``--std``, one value per band) and timm's RandomErasing (``--reprob``); evaluation
resizes to ``img_size / crop_pct`` and centre-crops (``--crop-mode center`` or ``squash``). Colour operations
(AutoAugment/RandAugment ``--aa``, ``--color-jitter``, ``--grayscale-prob``) are defined for RGB only and are
refused (``refuse_colour_ops``).

The workers produce normalised float32 batches, so the multi-band path runs without timm's prefetcher (which
assumes uint8 images); Mixup/CutMix then run on each batch with timm's ``Mixup``, as with ``--no-prefetcher``.
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from timm.data import create_loader
from timm.data.constants import DEFAULT_CROP_PCT
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import ResizeKeepRatio, str_to_interp_mode
from torchvision.transforms import v2

from .dataset import DataError

__all__ = ['RandomRotate90', 'multiband_transform', 'refuse_colour_ops', 'create_multiband_loader',
           'insert_rotate90']

_TENSOR_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic')
_COLOUR_OPS = {  # flag: what it is
    '--aa': 'AutoAugment / RandAugment / AugMix',
    '--color-jitter': 'colour jitter',
    '--grayscale-prob': 'random grayscale',
}


class RandomRotate90(torch.nn.Module):
    """With probability ``p``, rotate by 90, 180 or 270 degrees (uniformly): exact, no resampling.

    Tensors (..., H, W) and PIL images; non-square images only turn by 180 degrees, so sizes stay the same.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        if self.p <= 0 or torch.rand(1).item() >= self.p:
            return img
        square = img.size[0] == img.size[1] if isinstance(img, Image.Image) else img.shape[-1] == img.shape[-2]
        k = int(torch.randint(1, 4, (1,))) if square else 2
        if isinstance(img, Image.Image):
            turns = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
            return img.transpose(turns[k])
        return torch.rot90(img, k, dims=(-2, -1))

    def extra_repr(self) -> str:
        return f'p={self.p}'


def insert_rotate90(transform, p: float):
    """Put RandomRotate90(p) into one of timm's PIL train transforms, right after its crop and flips."""
    steps = list(transform.transforms)
    flips = [i for i, t in enumerate(steps) if 'Flip' in type(t).__name__]
    steps.insert((flips[-1] if flips else 0) + 1, RandomRotate90(p))
    transform.transforms = steps
    return transform


def refuse_colour_ops(band_count: int, flags: Dict[str, object]):
    """DataError naming the first colour operation asked for (non-zero/non-empty) on multi-band data."""
    for flag, value in flags.items():
        if value:
            raise DataError(
                f'{flag} {value}: {_COLOUR_OPS[flag]} is defined for 8-bit RGB images and cannot apply to '
                f'{band_count}-band data. Drop {flag}; the multi-band pipeline augments with --scale/--ratio '
                f'(random resized crop), --hflip, --vflip, --rot90, --gaussian-blur-prob, --reprob, --mixup, '
                f'--cutmix and --smoothing.')


def _interpolation(name: str, flag: str):
    if name not in _TENSOR_INTERPOLATIONS:
        raise DataError(f'{flag} {name}: multi-band tensors resize with {", ".join(_TENSOR_INTERPOLATIONS)}'
                        + (' (or random, for training)' if flag == '--train-interpolation' else ''))
    return str_to_interp_mode(name)


def _size(input_size) -> Tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    return tuple(input_size[-2:])


def multiband_transform(
        input_size: Union[int, Sequence[int]],
        is_training: bool = False,
        mean: Sequence[float] = (0.,),
        std: Sequence[float] = (1.,),
        interpolation: str = 'bilinear',
        crop_pct: Optional[float] = None,
        crop_mode: Optional[str] = None,
        no_aug: bool = False,
        scale: Optional[Sequence[float]] = None,
        ratio: Optional[Sequence[float]] = None,
        hflip: float = 0.5,
        vflip: float = 0.,
        rot90: float = 0.,
        gaussian_blur_prob: float = 0.,
        re_prob: float = 0.,
        re_mode: str = 'const',
        re_count: int = 1,
) -> v2.Compose:
    """The train or eval transform for (bands, H, W) float32 tensors (see the module docstring).

    ``mean``/``std`` are per band (or one value for all), in the units of the tensors: the stored values divided
    by the reflectance scale, if any.
    """
    size = _size(input_size)
    normalize = v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])
    if is_training and not no_aug:
        if interpolation == 'random':
            modes = [str_to_interp_mode(m) for m in ('bilinear', 'bicubic')]  # timm's 'random' choices
        else:
            modes = [_interpolation(interpolation, '--train-interpolation')]
        crops = [v2.RandomResizedCrop(size, scale=tuple(scale or (0.08, 1.)), ratio=tuple(ratio or (3 / 4, 4 / 3)),
                                      interpolation=m, antialias=True) for m in modes]
        steps = [crops[0] if len(crops) == 1 else v2.RandomChoice(crops)]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
        if rot90 > 0:
            steps.append(RandomRotate90(rot90))
        if gaussian_blur_prob > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=23)], p=gaussian_blur_prob))  # timm's kernel
        steps.append(normalize)
        if re_prob > 0:
            steps.append(RandomErasing(re_prob, mode=re_mode, max_count=re_count, device='cpu'))
        return v2.Compose(steps)
    if is_training:  # --no-aug: timm's resize + centre crop
        mode = _interpolation('bilinear' if interpolation == 'random' else interpolation, '--interpolation')
        return v2.Compose([v2.Resize(size[0] if size[0] == size[1] else size, interpolation=mode, antialias=True),
                           v2.CenterCrop(size), normalize])
    mode = _interpolation(interpolation, '--interpolation')
    scale_size = tuple(math.floor(s / (crop_pct or DEFAULT_CROP_PCT)) for s in size)
    if crop_mode == 'squash':
        resize = v2.Resize(scale_size, interpolation=mode, antialias=True)
    elif crop_mode in (None, 'center'):
        resize = (v2.Resize(scale_size[0], interpolation=mode, antialias=True) if scale_size[0] == scale_size[1]
                  else ResizeKeepRatio(scale_size, interpolation=interpolation))
    else:
        raise DataError(f'--crop-mode {crop_mode}: multi-band evaluation supports center and squash')
    return v2.Compose([resize, v2.CenterCrop(size), normalize])


def create_multiband_loader(dataset, transform, **loader_kwargs):
    """timm's ``create_loader`` (samplers, distributed sharding, worker seeding, collate) without its prefetcher,
    then the dataset's transform replaced by ``transform``: create_loader builds a PIL one, which cannot run
    on tensors."""
    loader = create_loader(dataset, use_prefetcher=False, **loader_kwargs)
    dataset.transform = transform
    return loader
