"""The logic behind validate.py and inference.py: model + checkpoint loading with class names, evaluation with
exact multi-process metrics, and per-image prediction tables.

Class names travel with the model: a train.py checkpoint stores ``label_names``; a tagged or hub model
(``rsmamba_base.ucm``, ``hf-hub:...``, ``local-dir:...``, ``--pretrained``) carries them in
``pretrained_cfg['label_names']``. When they are known, evaluation matches data classes to model classes by name
(``timm_rsmamba.data.label_mapping``), so the paper's non-alphabetical class order never mislabels a folder.
"""
import logging
import os
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm import utils
from timm.data import create_loader, resolve_data_config
from timm.models import clean_state_dict, split_model_name_tag
from timm.utils import ParseKwargs

from .data import (BandSpec, DataError, check_num_classes, create_multiband_loader, create_rs_dataset,
                   image_mode_for_channels, label_mapping, load_image, load_multiband, multiband_transform,
                   parse_band_list, resolve_bands, scan_band_layout, wants_multiband)
from .data.bands import add_band_args
from .hub import create_model
from .malloc import MALLOC_CHOICES, MALLOC_HELP, configure_malloc
from .metrics import (drop_sampler_padding, format_per_class_table, gather_across_ranks, metrics_from_logits,
                      save_confusion_matrix_png)

__all__ = ['EvalModel', 'add_eval_input_args', 'read_checkpoint', 'build_eval_model', 'resolve_device',
           'run_validation', 'write_results', 'FileListDataset', 'collect_inputs', 'run_inference', 'save_predictions',
           'eval_bands', 'show_predictions']

_logger = logging.getLogger(__name__)

_HEAD_KEYS = ('head.weight', 'head.fc.weight', 'fc.weight', 'classifier.weight', 'head.fc.fc.weight')


@dataclass
class EvalModel:
    model: torch.nn.Module
    model_name: str
    label_names: Optional[List[str]] = None
    label_source: str = 'none'
    checkpoint: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[int] = None  # the size the model was built for when given explicitly (model kwargs)
    bands: Optional[BandSpec] = None  # the multi-band selection it was trained on (checkpoint or hub config)

    @property
    def in_chans(self) -> int:
        conv = getattr(getattr(self.model, 'patch_embed', None), 'proj', None)
        return getattr(conv, 'in_channels', None) or getattr(self.model, 'in_chans', 3)


def add_eval_input_args(parser, workers: int) -> None:
    """The preprocessing, loader and device flags validate.py and inference.py share (timm's names)."""
    parser.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    parser.add_argument('--img-size', default=None, type=int, metavar='N', help='input image size (model default)')
    parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input dims, e.g. 3 224 224')
    parser.add_argument('--crop-pct', default=None, type=float, metavar='N', help='center crop pct')
    parser.add_argument('--crop-mode', default=None, type=str, metavar='N', help='crop mode (center, squash, border)')
    parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override mean (0-1 scale)')
    parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override std (0-1 scale)')
    parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    parser.add_argument('-b', '--batch-size', default=64, type=int, metavar='N', help='batch size (default: 64)')
    parser.add_argument('-j', '--workers', default=workers, type=int, metavar='N',
                        help=f'data loading workers (default: {workers})')
    parser.add_argument('--log-freq', default=10, type=int, metavar='N', help='batch logging frequency')
    parser.add_argument('--device', default=None, type=str, help='device (default: cuda if available, else cpu)')
    parser.add_argument('--amp', action='store_true', default=False, help='mixed precision inference')
    parser.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    parser.add_argument('--channels-last', action='store_true', default=False, help='channels_last memory layout')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs')
    parser.add_argument('--malloc', default='auto', choices=MALLOC_CHOICES, help=MALLOC_HELP)
    add_band_args(parser, from_checkpoint=True)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint as a dict with 'state_dict' (plain state dicts and .safetensors are wrapped); safe loading."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if path.endswith('.safetensors'):
        import safetensors.torch
        return {'state_dict': safetensors.torch.load_file(path)}
    from timm.models._helpers import _torch_load  # weights_only loading that allows timm's args Namespace
    try:
        ckpt = _torch_load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DataError(f'cannot read checkpoint {path!r} ({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict):
        raise DataError(f'checkpoint {path!r} holds a {type(ckpt).__name__}, not a state dict')
    if not any(k in ckpt for k in ('state_dict', 'model', 'state_dict_ema')):
        ckpt = {'state_dict': ckpt}
    elif 'state_dict' not in ckpt and 'model' in ckpt:
        ckpt['state_dict'] = ckpt['model']
    return ckpt


def _head_classes(state_dict) -> Optional[int]:
    for key in _HEAD_KEYS:
        if key in state_dict and getattr(state_dict[key], 'ndim', 0) == 2:
            return int(state_dict[key].shape[0])
    return None


def _is_rsmamba(model) -> bool:
    return type(model).__module__.startswith('timm_rsmamba')


def _names_are_the_models(model_name: str, pretrained: bool) -> bool:
    """Whether pretrained_cfg['label_names'] describes this model's head. Untagged RSMamba names get the .ucm
    default cfg, so its names only apply when a tag, a hub/local source or --pretrained asked for them."""
    if pretrained or model_name.startswith(('hf-hub:', 'local-dir:')):
        return True
    return bool(split_model_name_tag(model_name)[1])


def build_eval_model(model_name: Optional[str], checkpoint: str = '', pretrained: bool = False,
                     num_classes: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                     img_size: Optional[int] = None, in_chans: Optional[int] = None,
                     use_ema: bool = False) -> EvalModel:
    """Create the model (through timm_rsmamba.hub.create_model, for clear hub errors), load the checkpoint, find names.

    Architecture, model kwargs and number of classes default to what a train.py checkpoint recorded.
    """
    ckpt = read_checkpoint(checkpoint) if checkpoint else {}
    model_name = model_name or ckpt.get('arch')
    if not model_name:
        raise DataError('no model given: pass --model NAME (the checkpoint does not record its architecture)')
    kwargs = dict(ckpt.get('model_kwargs') or {})
    kwargs.update(model_kwargs or {})
    if in_chans:
        kwargs['in_chans'] = in_chans
    state_dict = None
    if ckpt:
        key = 'state_dict_ema' if use_ema and 'state_dict_ema' in ckpt else 'state_dict'
        state_dict = clean_state_dict(ckpt[key])
    ckpt_names = list(ckpt['label_names']) if ckpt.get('label_names') else None
    nc = num_classes or ckpt.get('num_classes') or (len(ckpt_names) if ckpt_names else None)
    if nc is None and state_dict is not None:
        nc = _head_classes(state_dict)
    if nc is not None:
        kwargs['num_classes'] = int(nc)
    if img_size and 'img_size' not in (model_kwargs or {}) and model_name.split(':')[-1].startswith('rsmamba'):
        kwargs['img_size'] = img_size  # RSMamba's position embedding is sized to the input; resampled on load
    model = create_model(model_name, pretrained=pretrained, **kwargs)
    if state_dict is not None:
        if _is_rsmamba(model):
            from .models.rsmamba import checkpoint_filter_fn
            state_dict = checkpoint_filter_fn(state_dict, model)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            head = _head_classes(state_dict)
            if head is not None and head != model.num_classes:
                raise DataError(
                    f'checkpoint {checkpoint!r} has a {head}-class head but the model was built with '
                    f'{model.num_classes} classes; drop --num-classes or set it to {head}') from e
            raise DataError(f'checkpoint {checkpoint!r} does not fit model {model_name!r}: {e}') from e
        if ckpt.get('pretrained_cfg'):
            model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, **ckpt['pretrained_cfg'])
    cfg_names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    names, source = None, 'none'
    if ckpt_names:
        names, source = ckpt_names, 'checkpoint'
    elif cfg_names and _names_are_the_models(model_name, pretrained) and len(cfg_names) == model.num_classes:
        names, source = list(cfg_names), 'pretrained_cfg'
    if names is not None and len(names) != model.num_classes:
        raise DataError(f'the checkpoint lists {len(names)} class names for a {model.num_classes}-class head')
    built = kwargs.get('img_size')
    if isinstance(built, (tuple, list)):
        built = built[-1]
    if ckpt.get('pretrained_cfg', {}).get('input_size'):
        built = None  # the checkpoint's recorded input size wins
    bands = BandSpec.from_dict(ckpt.get('bands') or _source_config(model_name).get('bands'))
    return EvalModel(model, model_name, names, source, ckpt, built, bands)


def _source_config(model_name: str) -> Dict[str, Any]:
    """config.json of a 'local-dir:' or 'hf-hub:' model (timm has read it already: cached), else {}."""
    import json
    from timm.models import parse_model_name
    source, model_id = parse_model_name(model_name)
    if source == 'local-dir':
        path = os.path.join(model_id, 'config.json')
    elif source == 'hf-hub':
        from timm.models._hub import download_from_hf
        path = download_from_hf(model_id, 'config.json')
    else:
        return {}
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def eval_bands(args, em: EvalModel, file_bands: int, dtype: str, example: str) -> BandSpec:
    """The bands to read from files with ``file_bands`` bands of ``dtype``: the checkpoint's selection, changed by
    --bands / --sensor / --reflectance-scale where given; mismatches with the data name a file."""
    recorded = em.bands
    if args.bands or args.sensor or recorded is None:
        requested = parse_band_list(args.bands) if args.bands else (recorded.indices if recorded else None)
        sensor = args.sensor or (recorded.sensor if recorded and not args.bands else None)
        scale = args.reflectance_scale if args.reflectance_scale is not None else (
            recorded.reflectance_scale if recorded else None)
        return resolve_bands(requested, file_bands, sensor, em.in_chans, example, dtype, scale)
    if file_bands != recorded.file_bands:
        raise DataError(f'the model reads {recorded.describe()}, but {example} has {file_bands} band(s): choose '
                        f'its bands with --bands (1-based numbers, in the order the model expects)')
    if args.reflectance_scale is not None:
        return BandSpec(file_bands, recorded.indices, recorded.names, recorded.sensor, dtype, args.reflectance_scale)
    if recorded.dtype and dtype != recorded.dtype:
        raise DataError(f'the model was trained on {recorded.dtype} values ({recorded.describe()}), but {example} '
                        f'stores {dtype}: the values are likely scaled differently. Pass --reflectance-scale to say '
                        f'how to scale these (e.g. 1 for reflectance already in 0-1)')
    return recorded


def _uses_multiband(args, em: EvalModel) -> bool:
    return em.bands is not None or wants_multiband(args.in_chans or em.in_chans, args.bands, args.reflectance_scale)


def _multiband_eval_transform(data_config):
    return multiband_transform(data_config['input_size'], interpolation=data_config['interpolation'],
                               crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
                               mean=data_config['mean'], std=data_config['std'])


def resolve_device(args) -> torch.device:
    """--device (default cuda when available, else cpu); joins the torchrun process group when launched by it."""
    if not getattr(args, 'device', None):
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise DataError(f'--device {args.device}: CUDA is not available here; use --device cpu')
    return utils.init_distributed_device(args)


def _amp(args, device):
    if not getattr(args, 'amp', False):
        return suppress
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _data_config(args, em: EvalModel):
    """timm's resolve_data_config; a model built for another size than its pretrained_cfg says (e.g.
    --model-kwargs img_size=64) is fed at the size it was built for, unless --img-size/--input-size say otherwise."""
    cfg_args = {k: getattr(args, k, None) for k in ('img_size', 'input_size', 'crop_pct', 'crop_mode', 'mean',
                                                     'std', 'interpolation', 'in_chans')}
    if cfg_args['img_size'] is None and cfg_args['input_size'] is None and em.img_size is not None:
        cfg_args['img_size'] = em.img_size
    chans = em.in_chans
    for flag in ('mean', 'std'):
        if cfg_args[flag] is not None and len(cfg_args[flag]) not in (1, chans):
            raise DataError(f'--{flag} has {len(cfg_args[flag])} values; the model takes {chans} band(s): give '
                            f'{chans} values (one per band) or one for all')
    config = resolve_data_config(cfg_args, model=em.model, use_test_size=True)
    for flag in ('mean', 'std'):
        if len(config[flag]) != config['input_size'][0]:
            raise DataError(f'the model takes {config["input_size"][0]} bands but its {flag} has '
                            f'{len(config[flag])} values (RGB statistics); pass --{flag} with '
                            f'{config["input_size"][0]} values (`python -m timm_rsmamba.data.stats` prints them)')
    return config


def _prepare_model(model, device, args):
    model = model.to(device)
    if getattr(args, 'channels_last', False):
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def _forward_all(model, loader, device, args, amp_autocast, tag='Test'):
    """Logits and targets of the whole loader, with timm-style progress lines (time and ETA)."""
    outs, targets = [], []
    batch_time = utils.AverageMeter()
    last = len(loader) - 1
    log_freq = getattr(args, 'log_freq', 10) or 10
    end = time.time()
    with torch.inference_mode():
        for i, (input, target) in enumerate(loader):
            input, target = input.to(device), target.to(device)
            if getattr(args, 'channels_last', False):
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                out = model(input)
            outs.append(out.float())
            targets.append(target)
            batch_time.update(time.time() - end)
            end = time.time()
            if utils.is_primary(args) and (i % log_freq == 0 or i == last):
                _logger.info(f'{tag}: [{i:>4d}/{last + 1}]  Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, '
                             f'{input.shape[0] / max(batch_time.avg, 1e-9):>7.2f}/s)  '
                             f'ETA: {(last - i) * batch_time.avg:.0f}s')
    n_out = getattr(model, 'num_classes', None) or 0
    logits = torch.cat(outs) if outs else torch.empty(0, n_out, device=device)
    target = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long, device=device)
    return logits, target


def _eval_loader(dataset, data_config, args, device, multiband: bool, distributed: bool = False):
    common = dict(input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
                  num_workers=args.workers, distributed=distributed, device=device)
    if multiband:
        return create_multiband_loader(dataset, _multiband_eval_transform(data_config), **common)
    return create_loader(
        dataset, use_prefetcher=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), **common)


def run_validation(args) -> OrderedDict:
    """Evaluate ``args`` (validate.py's flags); returns timm-style results (top1, top5, macro_* ...).

    Under torchrun each rank evaluates its share; predictions are gathered and the sampler's padding
    duplicates dropped, so the metrics equal a single-process run's exactly.
    """
    configure_malloc(args.malloc, huge_pages=True)
    device = resolve_device(args)
    em = build_eval_model(args.model, args.checkpoint, args.pretrained, args.num_classes, args.model_kwargs,
                          args.img_size, args.in_chans, args.use_ema)
    model = _prepare_model(em.model, device, args)
    data_config = _data_config(args, em)
    root = args.data or args.data_dir
    multiband = _uses_multiband(args, em)
    dataset = create_rs_dataset(
        args.dataset, root, args.split, is_training=False, class_map=args.class_map, input_key=args.input_key,
        target_key=args.target_key, skip_corrupt=args.skip_corrupt, batch_size=args.batch_size, seed=args.seed,
        multiband=multiband,
        input_img_mode=None if multiband else image_mode_for_channels(data_config['input_size'][0]))
    if multiband:
        dataset.bands = eval_bands(args, em, dataset.file_bands, dataset.dtype, dataset.example_file())
        if utils.is_primary(args):
            _logger.info(f'Multi-band data: {dataset.bands.describe()}')
    data_names = list(dataset.label_names) if dataset.label_names else None
    num_classes = em.model.num_classes
    if em.label_names and data_names:
        mapping = label_mapping(em.label_names, data_names)
        names = em.label_names
        if mapping != list(range(len(data_names))) and utils.is_primary(args):
            _logger.info(f'data classes matched to the model\'s by name (class names from the {em.label_source}; '
                         f'the model\'s order differs from the data\'s)')
    else:
        if data_names is not None:
            check_num_classes(num_classes, data_names)
            if utils.is_primary(args):
                _logger.warning('the model carries no class names: assuming its classes are in the data\'s order '
                                f'({", ".join(data_names[:5])}, ...)')
        mapping, names = list(range(num_classes)), data_names
    loader = _eval_loader(dataset, data_config, args, device, multiband, distributed=args.distributed)
    logits, targets = _forward_all(model, loader, device, args, _amp(args, device))
    if args.distributed:
        logits = drop_sampler_padding(gather_across_ranks(logits), len(dataset), args.world_size)
        targets = drop_sampler_padding(gather_across_ranks(targets), len(dataset), args.world_size)
        torch.distributed.destroy_process_group()  # a rank exiting with the group alive aborts under gloo
    targets = torch.as_tensor(mapping, device=targets.device)[targets]
    logits, targets = logits.cpu(), targets.cpu()
    metrics = metrics_from_logits(logits, targets, num_classes, topk=(1, 5), average=args.metrics_avg)
    avg = args.metrics_avg
    results = OrderedDict(
        model=em.model_name, top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4),
        **{f'{avg}_precision': round(metrics['precision'], 4), f'{avg}_recall': round(metrics['recall'], 4),
           f'{avg}_f1_score': round(metrics['f1'], 4)},
        loss=round(F.cross_entropy(logits, targets).item(), 6) if len(targets) else float('nan'),
        num_images=metrics['num_samples'], num_classes=num_classes,
        param_count=round(sum(p.numel() for p in em.model.parameters()) / 1e6, 2),
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'])
    if args.checkpoint:
        results['checkpoint'] = args.checkpoint
    skipped = getattr(dataset, 'skipped_files', [])
    if skipped:
        results['skipped_images'] = len(skipped)
    results['_metrics'], results['_label_names'] = metrics, names
    return results


def write_results(path: str, results: Dict[str, Any], fmt: str = 'csv'):
    """Summary as csv (one row, timm's layout) or json (summary plus a per-class list)."""
    public = OrderedDict((k, v) for k, v in results.items() if not k.startswith('_'))
    if fmt == 'json':
        import json
        metrics, names = results.get('_metrics'), results.get('_label_names')
        if metrics is not None:
            per = metrics['per_class']
            n = len(per['support'])
            names = names or [str(i) for i in range(n)]
            public['per_class'] = [
                {'class': names[i], 'precision': round(float(per['precision'][i]), 4),
                 'recall': round(float(per['recall'][i]), 4), 'f1': round(float(per['f1'][i]), 4),
                 'support': int(per['support'][i])} for i in range(n)]
            public['confusion_matrix'] = metrics['confusion_matrix'].tolist()
        with open(path, 'w') as f:
            json.dump(public, f, indent=4)
    elif fmt == 'csv':
        import csv
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(public))
            w.writeheader()
            w.writerow(public)
    else:
        raise DataError(f'--results-format {fmt!r}: use csv or json')


def report_validation(results: Dict[str, Any], confusion_matrix: Optional[str] = None) -> str:
    """Log lines people read: the timm summary line, the per-class table; optionally the confusion-matrix PNG."""
    metrics, names = results['_metrics'], results['_label_names']
    avg = metrics['average']
    line = (f' * Acc@1 {results["top1"]:.3f} ({results["top1_err"]:.3f}) Acc@5 {results["top5"]:.3f} '
            f'({results["top5_err"]:.3f}) | Precision({avg}) {metrics["precision"]:.3f} | Recall({avg}) '
            f'{metrics["recall"]:.3f} | F1-score({avg}) {metrics["f1"]:.3f}')
    table = format_per_class_table(metrics, names)
    if confusion_matrix:
        os.makedirs(os.path.dirname(os.path.abspath(confusion_matrix)), exist_ok=True)
        save_confusion_matrix_png(metrics['confusion_matrix'], names or [str(i) for i in
                                                                          range(len(metrics['per_class']['support']))],
                                  confusion_matrix)
    return f'{line}\n{table}'


class FileListDataset(torch.utils.data.Dataset):
    """Images from a list of paths (no labels), decoded with ``load_image``, or with ``bands`` set, as multi-band
    tensors (``load_multiband``); timm's create_loader sets the transform."""

    def __init__(self, files: Sequence[str], input_img_mode: str = 'RGB', bands: Optional[BandSpec] = None):
        self.files = list(files)
        self.input_img_mode = input_img_mode
        self.bands = bands
        self.transform = None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        if self.bands is not None:
            img = load_multiband(path, self.bands, path)
        else:
            try:
                img = load_image(path, self.input_img_mode)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f'cannot read image {path}: {e}') from e
        return (self.transform(img) if self.transform is not None else img), 0

    def filenames(self, basename: bool = False, absolute: bool = False):
        if basename:
            return [os.path.basename(f) for f in self.files]
        return [os.path.abspath(f) for f in self.files] if absolute else list(self.files)


def collect_inputs(inputs: Sequence[str], relative: bool = False):
    """Image paths from files, folders (recursive) and .txt lists of paths (one per line), in the given order.

    With ``relative``, (path, name) pairs: the name relative to the folder given, to the list file's folder for
    listed paths under it, else the file name (what ``--show-dir`` writes under).
    """
    from .data.stats import find_images
    from timm.data.readers.img_extensions import get_img_extensions
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found.extend((f, os.path.relpath(f, item)) for f in find_images(item))
        elif os.path.isfile(item) and item.lower().endswith('.txt'):
            base = os.path.dirname(item)
            with open(item) as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith('#'):
                        path = line if os.path.isabs(line) or os.path.exists(line) else os.path.join(base, line)
                        rel = os.path.relpath(path, base or '.')
                        found.append((path, os.path.basename(path) if rel.startswith('..') else rel))
        elif os.path.isfile(item):
            found.append((item, os.path.basename(item)))
        else:
            raise DataError(f'input {item!r} does not exist')
    if not found:
        raise DataError(f'no images found in {", ".join(inputs)} (extensions {", ".join(get_img_extensions())})')
    missing = [f for f, _ in found if not os.path.isfile(f)]
    if missing:
        raise DataError(f'{len(missing)} listed image(s) do not exist, e.g. {missing[0]!r}')
    return found if relative else [f for f, _ in found]


def _class_map_names(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise DataError(f'class map {path!r} does not exist')
    if not path.endswith('.txt'):
        from timm.data.readers.class_map import load_class_map
        by_idx = {v: k for k, v in load_class_map(path).items()}
        return [str(by_idx[i]) for i in sorted(by_idx)]
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def run_inference(args):
    """Predict every input image; returns a pandas DataFrame with one row per image (timm inference layout)."""
    import numpy as np
    import pandas as pd
    configure_malloc(args.malloc, huge_pages=True)
    device = resolve_device(args)
    em = build_eval_model(args.model, args.checkpoint, args.pretrained, args.num_classes, args.model_kwargs,
                          args.img_size, args.in_chans)
    model = _prepare_model(em.model, device, args)
    num_classes = em.model.num_classes
    names = em.label_names
    if args.class_map:
        names = _class_map_names(args.class_map)
        if len(names) != num_classes:
            raise DataError(f'--class-map {args.class_map} lists {len(names)} classes, the model has {num_classes}')
    if args.label_type in ('name', 'description', 'detailed') and names is None:
        raise DataError('class names unknown: the checkpoint has no label_names; pass --class-map FILE (one name '
                        'per line, in the model\'s index order) or --label-type index / none')
    data_config = _data_config(args, em)
    inputs = list(args.data or []) + ([args.data_dir] if args.data_dir else [])
    found = collect_inputs(inputs, relative=True)
    files = [f for f, _ in found]
    multiband = _uses_multiband(args, em)
    if multiband:
        file_bands, dtype, _ = scan_band_layout(files, what=f'{len(files)} input image(s)')
        bands = eval_bands(args, em, file_bands, dtype, files[0])
        _logger.info(f'Multi-band data: {bands.describe()}')
        dataset = FileListDataset(files, bands=bands)
    else:
        dataset = FileListDataset(files, image_mode_for_channels(data_config['input_size'][0]))
    loader = _eval_loader(dataset, data_config, args, device, multiband)
    logits, _ = _forward_all(model, loader, device, args, _amp(args, device), tag='Predict')
    if getattr(args, 'show_dir', None):
        show_predictions(found, logits.softmax(-1).cpu(), names, args.show_dir, getattr(args, 'show_format', 'png'),
                         min(max(args.topk, 1), num_classes), dataset.bands)
    out = logits.softmax(-1) if args.output_type == 'prob' else logits
    k = min(args.topk, num_classes)
    values, indices = out.topk(k) if k else (out, None)
    values, indices = values.cpu().numpy(), (indices.cpu().numpy() if indices is not None else None)
    filenames = dataset.filenames(basename=not args.fullname)
    if len(set(filenames)) < len(filenames):
        _logger.warning('some images share a file name: writing full paths (as --fullname)')
        filenames = dataset.filenames()
    data = OrderedDict(filename=filenames)
    cols = OrderedDict()
    if indices is not None and (args.include_index or args.label_type == 'index'):
        cols['index'] = indices
    if indices is not None and args.label_type in ('name', 'description', 'detailed'):
        cols['label'] = np.vectorize(lambda i: names[i], otypes=[object])(indices)
    if not args.exclude_output:
        cols[args.output_type] = values
    for col, arr in cols.items():
        if args.results_separate_col and arr.shape[-1] > 1:
            for j in range(arr.shape[-1]):
                data[f'{col}_{j}'] = arr[:, j]
        else:
            data[col] = arr[:, 0] if arr.shape[-1] == 1 else arr.tolist()
    df = pd.DataFrame(data)
    df.attrs['model_name'] = em.model_name
    df.attrs['img_size'] = data_config['input_size'][-1]
    return df


def show_predictions(found, probs: torch.Tensor, names: Optional[Sequence[str]], out_dir: str, fmt: str = 'png',
                     topk: int = 1, bands: Optional[BandSpec] = None) -> List[str]:
    """Save every input with its top-k labels and probabilities drawn under it (``timm_rsmamba.visualize``), at
    ``out_dir/<its relative name>`` with the format's extension; multi-band inputs as an RGB composite."""
    from .data.multiband import read_bands
    from .visualize import rgb_composite, prediction_lines, save_annotated
    ext = {'png': '.png', 'jpg': '.jpg', 'jpeg': '.jpg'}[fmt]
    targets, seen = [], set()
    for i, (_, rel) in enumerate(found):
        target = os.path.splitext(rel)[0] + ext
        if target in seen:  # two inputs with one name (e.g. a.tif and a.png, or files from two folders)
            target = f'{os.path.splitext(rel)[0]}-{i}{ext}'
        seen.add(target)
        targets.append(os.path.join(out_dir, target))
    values, indices = probs.topk(topk)
    start, written = time.time(), []
    for i, ((path, _), target) in enumerate(zip(found, targets)):
        if bands is not None:
            image = rgb_composite(read_bands(path), bands.file_band_names())
        else:
            image = load_image(path, 'RGB')
        labels = [names[j] if names else str(j) for j in indices[i].tolist()]
        written.append(save_annotated(image, prediction_lines(labels, values[i].tolist()), target, fmt))
        if (i + 1) % 100 == 0:
            eta = (len(found) - i - 1) * (time.time() - start) / (i + 1)
            _logger.info(f'--show-dir: {i + 1}/{len(found)} images  ETA {eta:.0f}s')
    _logger.info(f'--show-dir: {len(written)} annotated image(s) written to {out_dir}')
    return written


_FMT_EXT = {'csv': '.csv', 'json': '.json', 'json-split': '.json', 'json-records': '.json', 'parquet': '.parquet'}


def save_predictions(df, filename: str, fmt: str) -> str:
    """Write the prediction table as csv, json (keyed by filename), json-split, json-records or parquet."""
    if fmt not in _FMT_EXT:
        raise DataError(f'--results-format {fmt!r}: use one of {", ".join(_FMT_EXT)}')
    path = filename + _FMT_EXT[fmt]
    if fmt == 'parquet':
        df.set_index('filename').to_parquet(path)
    elif fmt == 'json':
        df.set_index('filename').to_json(path, indent=4, orient='index')
    elif fmt == 'json-records':
        df.to_json(path, lines=True, orient='records')
    elif fmt == 'json-split':
        df.to_json(path, indent=4, orient='split', index=False)
    else:
        df.to_csv(path, index=False)
    return path
