"""Turn a class-per-folder download into train/ + val/ (+ test/) folders that timm's ImageFolder reads.

    python -m timm_rsmamba.data.split SRC DST --ratios 0.7 0.3 --seed 0          # per-class 70/30
    python -m timm_rsmamba.data.split SRC DST --ratios 0.6 0.2 --test-ratio 0.2  # train/val/test
    python -m timm_rsmamba.data.split SRC DST --train-list train.txt --val-list val.txt   # the paper's lists

Ratios are applied per class (every class keeps the same proportions; each split gets at least one image of a
class that has enough). List files hold ``class/file`` lines relative to SRC; an entry whose file is missing
matches a file of the same class and stem (the UC Merced lists say .tif, re-encoded copies are .jpg).
Outputs are symlinks to the source files by default (``--copy`` copies); SRC is only read. A non-empty DST is
refused unless ``--force``, which replaces DST's split folders (train/val/test..., stale ones included) and
leaves anything else there alone.
"""
import argparse
import os
import random
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

from .dataset import SPLIT_NAMES, DataError

__all__ = ['scan_class_folders', 'split_counts', 'split_by_ratio', 'split_from_lists', 'write_split', 'main']


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in get_img_extensions(as_set=True)


def scan_class_folders(src) -> Dict[str, List[str]]:
    """class name -> image paths relative to ``src`` (natural sort), for ``src/<class>/**/<image>``."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f'source folder {str(src)!r} does not exist or is not a folder')
    loose = sorted(p.name for p in src.iterdir() if p.is_file() and _is_image(p))
    if loose:
        raise DataError(f'{len(loose)} image(s) lie directly in {str(src)!r} (e.g. {loose[0]!r}); the source must '
                        f'hold one sub-folder per class')
    classes = OrderedDict()
    for d in sorted((p for p in src.iterdir() if p.is_dir() and not p.name.startswith('.')),
                    key=lambda p: natural_key(p.name)):
        files = [str(p.relative_to(src)) for p in d.rglob('*') if p.is_file() and _is_image(p)]
        if files:
            classes[d.name] = sorted(files, key=natural_key)
    if not classes:
        raise DataError(f'no images found in class sub-folders of {str(src)!r} '
                        f'(extensions {", ".join(get_img_extensions())})')
    if all(c.lower() in SPLIT_NAMES for c in classes):
        raise DataError(f'{str(src)!r} is already split ({", ".join(classes)}); give the folder of class folders')
    return classes


def split_counts(n: int, ratios: Sequence[float]) -> List[int]:
    """Largest-remainder rounding of ``n * ratios``; every split with a ratio > 0 gets one item if n allows."""
    raw = [n * r for r in ratios]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    for i, r in enumerate(ratios):
        if r > 0 and counts[i] == 0 and n >= sum(1 for x in ratios if x > 0):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def split_by_ratio(classes: Dict[str, List[str]], ratios: Sequence[float], seed: int = 0,
                   names: Sequence[str] = ('train', 'val', 'test'),
                   max_per_class: Optional[int] = None) -> Dict[str, Dict[str, List[str]]]:
    """split name -> class -> files; each class is shuffled with its own seeded RNG, independent of the others.

    ``max_per_class`` keeps only that many (randomly chosen) images of each class, to make small samples.
    """
    if len(ratios) not in (2, 3) or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-3:
        raise DataError(f'ratios must be 2 or 3 non-negative numbers summing to 1 (train val [test]), got '
                        f'{list(ratios)}')
    ratios = [r / sum(ratios) for r in ratios]
    out = OrderedDict((name, OrderedDict()) for name in names[:len(ratios)])
    for cls, files in classes.items():
        files = list(files)
        random.Random(f'{seed}/{cls}').shuffle(files)
        files = files[:max_per_class] if max_per_class else files
        start = 0
        for name, count in zip(out, split_counts(len(files), ratios)):
            out[name][cls] = sorted(files[start:start + count], key=natural_key)
            start += count
    return out


def _read_list(path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f'split list {str(path)!r} does not exist')
    lines = [ln.strip().replace('\\', '/') for ln in path.read_text(encoding='utf-8').splitlines()]
    lines = [ln.split()[0] for ln in lines if ln and not ln.startswith('#')]  # mmpretrain lists may add a label
    if not lines:
        raise DataError(f'split list {str(path)!r} is empty')
    return lines


def split_from_lists(classes: Dict[str, List[str]], lists: Dict[str, str]) -> Dict[str, Dict[str, List[str]]]:
    """split name -> class -> files from ``class/file`` list files; stems match when extensions differ."""
    by_path = {f: f for files in classes.values() for f in files}
    by_stem = {}
    for cls, files in classes.items():
        for f in files:
            by_stem.setdefault((cls, Path(f).with_suffix('').as_posix()), []).append(f)
    out, used = OrderedDict(), {}
    for name, list_file in lists.items():
        out[name] = OrderedDict()
        missing, ambiguous = [], []
        for entry in _read_list(list_file):
            cls = entry.split('/')[0]
            found = by_path.get(entry)
            if found is None:
                cands = by_stem.get((cls, Path(entry).with_suffix('').as_posix()), [])
                if len(cands) > 1:
                    ambiguous.append(entry)
                    continue
                found = cands[0] if cands else None
            if found is None:
                missing.append(entry)
                continue
            if found in used:
                raise DataError(f'{found!r} is listed twice: in the {used[found]} list and the {name} list '
                                f'({list_file})')
            used[found] = name
            out[name].setdefault(cls, []).append(found)
        if missing or ambiguous:
            what = []
            if missing:
                what.append(f'{len(missing)} entries match no file (e.g. {", ".join(missing[:3])})')
            if ambiguous:
                what.append(f'{len(ambiguous)} entries match several files of the same stem '
                            f'(e.g. {", ".join(ambiguous[:3])})')
            raise DataError(f'{list_file}: ' + '; '.join(what) + '. Is SRC the dataset root the list refers to?')
        for cls in out[name]:
            out[name][cls].sort(key=natural_key)
    return out


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def write_split(src, dst, plan: Dict[str, Dict[str, List[str]]], copy: bool = False, force: bool = False):
    """Create DST/<split>/<class>/<file> as symlinks (absolute) or copies; never writes inside SRC."""
    src, dst = Path(src), Path(dst)
    if _overlaps(src, dst):
        raise DataError(f'destination {str(dst)!r} overlaps the source {str(src)!r}; choose a folder outside it')
    if dst.exists() and not dst.is_dir():
        raise DataError(f'destination {str(dst)!r} is a file')
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise DataError(f'destination {str(dst)!r} is not empty; pass --force to replace its split folders '
                            f'({"/".join(plan)}), or choose another folder')
        for target in [p for p in dst.iterdir() if p.name in plan or p.name.lower() in SPLIT_NAMES]:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)  # does not follow the symlinks inside, so SRC is untouched
    for name, per_class in plan.items():
        for cls, files in per_class.items():
            for rel in files:
                out = dst / name / cls / Path(rel).relative_to(cls)
                out.parent.mkdir(parents=True, exist_ok=True)
                source = (src / rel).resolve()
                if copy:
                    shutil.copy2(source, out)
                else:
                    os.symlink(source, out)


def _summary(plan) -> str:
    lines = []
    for name, per_class in plan.items():
        counts = [len(v) for v in per_class.values()]
        spread = f'{min(counts)}-{max(counts)} per class' if counts and min(counts) != max(counts) else (
            f'{counts[0]} per class' if counts else 'empty')
        lines.append(f'{name:>5}: {sum(counts):6d} images, {len(counts):3d} classes ({spread})')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(
        prog='python -m timm_rsmamba.data.split', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', metavar='SRC', help='folder with one sub-folder of images per class (read only)')
    p.add_argument('dst', metavar='DST', help='output folder; receives train/ val/ [test/]')
    p.add_argument('--ratios', type=float, nargs='+', default=None, metavar='R',
                   help='train and val fractions per class, optionally a third for test (default: 0.7 0.3)')
    p.add_argument('--test-ratio', type=float, default=None, metavar='R',
                   help='fraction per class for a test/ split (same as a third --ratios value)')
    p.add_argument('--seed', type=int, default=0, help='shuffling seed (default: 0)')
    p.add_argument('--train-list', metavar='FILE', help='list of class/file lines for train/ (the paper\'s format)')
    p.add_argument('--val-list', metavar='FILE', help='list for val/')
    p.add_argument('--test-list', metavar='FILE', help='list for test/')
    p.add_argument('--max-per-class', type=int, default=None, metavar='N',
                   help='use only N randomly chosen images per class (small samples; ratio mode only)')
    p.add_argument('--copy', action='store_true', help='copy files instead of symlinking them')
    p.add_argument('--force', action='store_true', help='replace the split folders of a non-empty DST')
    return p.parse_args(argv)


def run(args) -> Dict[str, Dict[str, List[str]]]:
    classes = scan_class_folders(args.src)
    lists = OrderedDict((n, f) for n, f in (('train', args.train_list), ('val', args.val_list),
                                             ('test', args.test_list)) if f)
    if lists:
        if args.ratios or args.test_ratio is not None or args.max_per_class:
            raise DataError('split lists (--train-list/--val-list/--test-list) fix the split: drop --ratios, '
                            '--test-ratio and --max-per-class')
        plan = split_from_lists(classes, lists)
        listed = sum(len(v) for per in plan.values() for v in per.values())
        total = sum(len(v) for v in classes.values())
        if listed < total:
            print(f'note: {total - listed} of {total} images in {args.src} are in no list and were left out')
    else:
        ratios = list(args.ratios or [0.7, 0.3])
        if args.test_ratio is not None:
            if len(ratios) != 2:
                raise DataError('--test-ratio adds a third split; give exactly two --ratios with it')
            ratios.append(args.test_ratio)
        plan = split_by_ratio(classes, ratios, seed=args.seed, max_per_class=args.max_per_class)
    write_split(args.src, args.dst, plan, copy=args.copy, force=args.force)
    print(f'{"copied" if args.copy else "linked"} {args.src} -> {args.dst}\n{_summary(plan)}')
    return plan


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
