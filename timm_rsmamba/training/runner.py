"""The training run behind ``train.py``: data, model, optimisation, checkpoints, resume, distributed.

Everything is timm machinery (create_loader, Mixup, create_optimizer_v2, create_scheduler_v2, ModelEmaV3,
NativeScaler, CheckpointSaver, update_summary); what is added is what remote-sensing runs need: class names
from the data kept in every checkpoint, macro F1 for model selection, atomic checkpoints, and exact resume
(the random state is re-derived from (seed, epoch, rank) at every epoch start, so a run stopped after
epoch k and resumed draws the same augmentations, shuffles and dropout masks as one that never stopped).
"""
import argparse
import difflib
import glob
import hashlib
import json
import logging
import os
import time
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as NativeDDP

import timm
from timm import utils
from timm.data import create_loader, resolve_data_config, Mixup, FastCollateMixup
from timm.layers import convert_sync_batchnorm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler

from ..hub import HeadMismatchError, HubUnavailableError, UnknownModelError, create_model
from ..malloc import configure_malloc
from .args import ConfigError
from .checkpoint import (AtomicCheckpointSaver, find_resume_checkpoint, load_initial_checkpoint,
                         restore_training_state)
from .curves import plot_training_curves
from .engine import evaluate, train_one_epoch

CURVES_INTERVAL_S = 20.  # training_curves.png is redrawn after an epoch if it is older than this, and at the end

_logger = logging.getLogger('train')

__all__ = ['train', 'setup_device', 'build_datasets', 'build_model', 'weights_digest', 'epoch_seed']

EVAL_KEYS = ('loss', 'top1', 'top5', 'precision', 'recall', 'f1')


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct seed for every (epoch, rank): the random state then depends on nothing but these three."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2 ** 31)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names and raw bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, tensor in utils.unwrap_model(model).state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup_device(args) -> torch.device:
    """Resolve the device and join the torchrun process group if launched by torchrun (NCCL on GPU, gloo on CPU)."""
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: CUDA is not available on this machine; use --device cpu')
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}, '
                     f'backend {torch.distributed.get_backend()}.')
    else:
        _logger.info(f'Training with a single process on {args.device}.')
    return device


def _in_chans(args) -> int:
    return args.in_chans or (args.input_size[0] if args.input_size else 3)


def build_datasets(args):
    """Train and (optional) validation datasets; the class names come from the training split.

    Multi-band runs (``wants_multiband``) read full-depth tensors: the band selection (``--bands``, ``--sensor``,
    ``--reflectance-scale``) is resolved against the training files, set on both datasets (``dataset.bands``)
    and ``args.in_chans`` becomes its band count.
    """
    from timm_rsmamba.data import create_rs_dataset, image_mode_for_channels, parse_band_list, wants_multiband

    multiband = wants_multiband(_in_chans(args), args.bands, args.reflectance_scale)
    common = dict(class_map=args.class_map, input_key=args.input_key, target_key=args.target_key,
                  skip_corrupt=args.skip_corrupt, batch_size=args.batch_size, seed=args.seed, multiband=multiband,
                  input_img_mode=None if multiband else image_mode_for_channels(_in_chans(args)))
    dataset_train = create_rs_dataset(args.dataset, args.data_dir or None, args.train_split, is_training=True, **common)
    dataset_eval = None
    if args.val_split:
        dataset_eval = create_rs_dataset(args.dataset, args.data_dir or None, args.val_split, is_training=False, **common)
        train_names, eval_names = list(dataset_train.label_names or []), list(dataset_eval.label_names or [])
        if train_names != eval_names:
            only_train = sorted(set(train_names) - set(eval_names))
            only_eval = sorted(set(eval_names) - set(train_names))
            raise ConfigError(
                f'the {args.train_split!r} and {args.val_split!r} splits do not have the same classes in the same '
                f'order (only in train: {only_train}, only in val: {only_eval}); indices would mean different '
                f'classes. Give both the same class folders, or fix the order with --class-map FILE.')
        same = getattr(dataset_train, 'source_folder', None)
        if same and same == getattr(dataset_eval, 'source_folder', None):
            _logger.warning(
                f'train and validation both read every image in {same} (it has no {args.train_split}/ and '
                f'{args.val_split}/ folders): validation scores and model_best measure fit to the training images. '
                f'Make a held-out split with `python -m timm_rsmamba.data.split {same} DST` and train on DST.')
    if multiband:
        from timm_rsmamba.data import resolve_bands
        explicit = args.in_chans or (args.input_size[0] if args.input_size else None)
        spec = resolve_bands(parse_band_list(args.bands), dataset_train.file_bands, args.sensor, explicit,
                             example=dataset_train.example_file(), dtype=dataset_train.dtype,
                             reflectance_scale=args.reflectance_scale)
        if dataset_eval is not None and (dataset_eval.file_bands, dataset_eval.dtype) != (spec.file_bands, spec.dtype):
            raise ConfigError(
                f'the {args.val_split!r} images ({dataset_eval.file_bands}-band {dataset_eval.dtype}, e.g. '
                f'{dataset_eval.example_file()}) differ from the {args.train_split!r} images ({spec.file_bands}-band '
                f'{spec.dtype}, e.g. {dataset_train.example_file()})')
        for ds in (dataset_train, dataset_eval):
            if ds is not None:
                ds.bands = spec
        args.in_chans = spec.count
        if utils.is_primary(args):
            _logger.info(f'Multi-band data: {spec.describe()}.')
    return dataset_train, dataset_eval


def _is_rsmamba(model_name: str) -> bool:
    try:
        arch = timm.models.split_model_name_tag(model_name)[0]
        return timm.models.model_entrypoint(arch).__module__.startswith('timm_rsmamba')
    except Exception:  # unknown names are reported by create_model itself
        return False


def _model_user_error(args, err: Exception) -> Optional[ConfigError]:
    """A ConfigError for model-creation failures caused by the flags (unknown name, hub offline, head size)."""
    if isinstance(err, RuntimeError) and str(err).startswith('Unknown model'):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5, cutoff=0.6)
        hint = f' Did you mean: {", ".join(close)}?' if close else ''
        return ConfigError(
            f'--model {args.model!r} is not a known model.{hint} RSMamba models: '
            f'{", ".join(timm.list_models("rsmamba*"))}.')
    if isinstance(err, (UnknownModelError, HubUnavailableError, HeadMismatchError)):
        return ConfigError(f'--model {args.model!r}: {err}')
    from timm_rsmamba.models.rsmamba import InputBandsError
    if isinstance(err, InputBandsError):
        return ConfigError(str(err))
    return None


def _file_input_size(path: str, model_name: str) -> Dict[str, Any]:
    """The band count of a weights file's first conv as a pretrained_cfg input_size, so timm's load_pretrained
    adapts 3-band weights to the model's bands (adapt_input_conv) and loads N-band ones unchanged."""
    arch = timm.models.split_model_name_tag(model_name)[0]
    first = timm.models.get_pretrained_cfg_value(arch, 'first_conv') if timm.models.is_model(arch) else None
    if not isinstance(first, str):
        return {}
    from .checkpoint import CheckpointError
    try:
        weight = timm.models.load_state_dict(path).get(f'{first}.weight')
    except Exception as e:
        raise CheckpointError(f'--pretrained-path {path!r} could not be read ({type(e).__name__}: {e})') from e
    if weight is None or weight.ndim != 4:
        return {}
    size = timm.models.get_pretrained_cfg_value(arch, 'input_size') or (3, 224, 224)
    return dict(input_size=(int(weight.shape[1]), *size[1:]))


def build_model(args, num_classes: int):
    """Create the model (and load --initial-checkpoint); returns (model, model_kwargs to rebuild it)."""
    in_chans = _in_chans(args)
    model_kwargs = dict(args.model_kwargs)
    if _is_rsmamba(args.model) and 'img_size' not in model_kwargs:
        # RSMamba's position embedding is sized by img_size, so --img-size/--input-size also build the model.
        if args.input_size is not None:
            model_kwargs['img_size'] = tuple(args.input_size[1:])
        elif args.img_size is not None:
            model_kwargs['img_size'] = args.img_size
    factory_kwargs = {}
    if args.pretrained_path:
        if not os.path.isfile(args.pretrained_path):
            raise ConfigError(f'--pretrained-path {args.pretrained_path!r} does not exist')
        factory_kwargs['pretrained_cfg_overlay'] = dict(
            file=args.pretrained_path, num_classes=-1, **_file_input_size(args.pretrained_path, args.model))
    create_kwargs = dict(in_chans=in_chans, num_classes=num_classes, drop_rate=args.drop, **model_kwargs)
    if args.drop_path is not None:
        create_kwargs['drop_path_rate'] = args.drop_path
    if args.gp is not None:
        create_kwargs['global_pool'] = args.gp

    torch.manual_seed(args.seed)  # the same initial weights on every rank (and for the EMA copy)
    try:
        model = create_model(args.model, pretrained=args.pretrained or bool(args.pretrained_path),
                             **factory_kwargs, **create_kwargs)
    except Exception as e:
        user_error = _model_user_error(args, e)
        if user_error is None:
            raise
        raise user_error from e
    if args.initial_checkpoint:
        filter_fn = None
        if _is_rsmamba(args.model):
            from timm_rsmamba.models.rsmamba import checkpoint_filter_fn
            filter_fn = checkpoint_filter_fn
        load_initial_checkpoint(model, args.initial_checkpoint, filter_fn=filter_fn)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)

    saved_kwargs = dict(model_kwargs, in_chans=in_chans)
    if args.gp is not None:
        saved_kwargs['global_pool'] = args.gp
    return model, saved_kwargs


def run_data_config(args, model) -> Dict[str, Any]:
    """timm's resolve_data_config, with the model's real img_size when the run does not set one.

    Multi-band runs need --mean/--std of the band count (or one value): RGB statistics cannot describe them.
    """
    from timm_rsmamba.data import wants_multiband
    in_chans = _in_chans(args)
    if wants_multiband(in_chans, args.bands, args.reflectance_scale):
        for flag in ('mean', 'std'):
            values = getattr(args, flag)
            if values is None or len(values) not in (1, in_chans):
                got = 'none' if values is None else f'{len(values)} value(s)'
                raise ConfigError(
                    f'--{flag} needs {in_chans} values (one per band, in the units of the values after '
                    f'--reflectance-scale) or one for all; got {got}. `python -m timm_rsmamba.data.stats '
                    f'{args.data_dir or "DATA"} --split {args.train_split} --in-chans {in_chans} ...` prints them.')
    overrides = dict(vars(args))
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if args.img_size is None and args.input_size is None and img_size is not None:
        overrides['input_size'] = (in_chans, *tuple(img_size))
    return resolve_data_config(overrides, model=model, verbose=utils.is_primary(args))


def _run_pretrained_cfg(model, args, data_config, label_names) -> Dict[str, Any]:
    """What inference needs to reproduce this run's preprocessing and class names."""
    base = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg = {k: base[k] for k in ('first_conv', 'classifier', 'fixed_input_size', 'license') if k in base}
    cfg.update(
        architecture=timm.models.split_model_name_tag(args.model)[0],
        input_size=tuple(data_config['input_size']),
        interpolation=data_config['interpolation'],
        mean=tuple(data_config['mean']),
        std=tuple(data_config['std']),
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode', 'center'),
        num_classes=len(label_names),
        label_names=tuple(label_names),
    )
    return cfg


def _build_loaders(args, device, data_config, dataset_train, dataset_eval, num_classes):
    bands = getattr(dataset_train, 'bands', None)
    if bands is not None:
        from timm_rsmamba.data import refuse_colour_ops
        refuse_colour_ops(bands.count, {'--aa': args.aa, '--color-jitter': args.color_jitter,
                                        '--grayscale-prob': args.grayscale_prob})
        if args.prefetcher and utils.is_primary(args):
            _logger.info('Multi-band data: the loader workers produce normalised float32 tensors without timm\'s '
                         'prefetcher (it assumes uint8 images); Mixup/CutMix run on each batch.')
        args.prefetcher = False
    mixup_fn = None
    collate_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    # Workers are restarted every epoch (not persistent) so their seeds come from the per-epoch random state:
    # that is what makes a resumed run draw the same augmentations as an uninterrupted one with -j > 0.
    common = dict(pin_memory=args.pin_mem, device=device, distributed=args.distributed, persistent_workers=False,
                  num_workers=args.workers)
    eval_kwargs = dict(input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
                       is_training=False, **common)
    if bands is not None:
        from timm_rsmamba.data import create_multiband_loader, multiband_transform
        norm = dict(mean=data_config['mean'], std=data_config['std'])
        train_tf = multiband_transform(
            data_config['input_size'], is_training=True, interpolation=train_interpolation, no_aug=args.no_aug,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, rot90=args.rot90,
            gaussian_blur_prob=args.gaussian_blur_prob or 0., re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, **norm)
        if args.train_crop_mode not in (None, 'rrc'):
            raise ConfigError(f'--train-crop-mode {args.train_crop_mode}: multi-band training crops with rrc '
                              f'(random resized crop) only')
        loader_train = create_multiband_loader(
            dataset_train, train_tf, input_size=data_config['input_size'], batch_size=args.batch_size,
            is_training=True, worker_seeding=args.worker_seeding, **common)
        make_eval = partial(create_multiband_loader, transform=multiband_transform(
            data_config['input_size'], interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode'), **norm))
    else:
        loader_train = create_loader(
            dataset_train,
            input_size=data_config['input_size'],
            batch_size=args.batch_size,
            is_training=True,
            no_aug=args.no_aug,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
            train_crop_mode=args.train_crop_mode,
            scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
            grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
            auto_augment=args.aa,
            interpolation=train_interpolation,
            worker_seeding=args.worker_seeding,
            collate_fn=collate_fn,
            mean=data_config['mean'], std=data_config['std'], use_prefetcher=args.prefetcher,
            **common,
        )
        if args.rot90 > 0:
            from timm_rsmamba.data.transforms import insert_rotate90
            if args.no_aug:
                raise ConfigError('--rot90 is an augmentation; it cannot be combined with --no-aug')
            insert_rotate90(dataset_train.transform, args.rot90)
        make_eval = partial(create_loader, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                            crop_mode=data_config.get('crop_mode'), mean=data_config['mean'], std=data_config['std'],
                            use_prefetcher=args.prefetcher)
    if len(loader_train) == 0:
        raise ConfigError(f'the training split has {len(dataset_train)} images, fewer than one batch')
    loader_eval = make_eval(dataset_eval, **eval_kwargs) if dataset_eval is not None else None
    return loader_train, loader_eval, mixup_fn, mixup_active


def _resolve_lr(args, loader_train):
    if args.lr:
        return
    global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
    batch_ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        on = args.opt.lower()
        args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    args.lr = args.lr_base * batch_ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) and global '
                     f'batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')


def _output_dir(args, data_config, resume_path: Optional[str]) -> str:
    if resume_path and not args.experiment:
        return os.path.dirname(os.path.abspath(resume_path))  # continue the resumed run in its own folder
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    root = args.output or './output/train'
    wanted = os.path.join(root, exp_name)
    if resume_path or not glob.glob(os.path.join(wanted, '*.pth.tar')):
        return utils.get_outdir(root, exp_name)
    # a new run never overwrites an old one's checkpoints: it takes the next free NAME-N folder
    output_dir = utils.get_outdir(root, exp_name, inc=True)
    _logger.warning(f'{wanted} holds checkpoints of an earlier run; this new run writes to {output_dir} '
                    f'(continue the earlier one with --resume {wanted})')
    return output_dir


def train(args: argparse.Namespace, args_text: str) -> Dict[str, Any]:
    """Run training as configured; returns a summary dict (output folder, best metric, last metrics)."""
    device = setup_device(args)
    primary = utils.is_primary(args)
    malloc = configure_malloc(args.malloc, memory_first=args.grad_checkpointing)
    if primary:
        _logger.info(f'malloc thresholds: {malloc} (--malloc {args.malloc})')

    dataset_train, dataset_eval = build_datasets(args)
    from timm_rsmamba.data import check_num_classes
    label_names = dataset_train.label_names
    if label_names is None:  # a source without class names: numbered classes, their count from the flag
        if args.num_classes is None:
            raise ConfigError('the training data has no class names; pass --num-classes (or a --class-map)')
        label_names = [str(i) for i in range(args.num_classes)]
    label_names = [str(n) for n in label_names]
    num_classes = check_num_classes(args.num_classes, label_names)
    args.num_classes = num_classes
    if primary:
        for split, ds in (('train', dataset_train), ('val', dataset_eval)):
            skipped = getattr(ds, 'skipped_files', None)
            if skipped:
                _logger.warning(f'--skip-corrupt: {len(skipped)} unreadable {split} image(s) left out.')

    model, saved_model_kwargs = build_model(args, num_classes)
    data_config = run_data_config(args, model)
    run_cfg = _run_pretrained_cfg(model, args, data_config, label_names)
    model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, **run_cfg)
    if hasattr(model, 'default_cfg'):
        model.default_cfg = model.pretrained_cfg
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}, {num_classes} classes: {label_names}')

    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = convert_sync_batchnorm(model)

    amp_autocast = suppress
    loss_scaler = None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
        if primary:
            _logger.info(f'Using native Torch AMP ({args.amp_dtype}).')

    utils.random_seed(args.seed, args.rank)
    loader_train, loader_eval, mixup_fn, mixup_active = _build_loaders(
        args, device, data_config, dataset_train, dataset_eval, num_classes)
    _resolve_lr(args, loader_train)

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn = train_loss_fn.to(device=device)

    opt_target = model
    if args.weight_decay_all:
        if args.layer_decay is not None:
            raise ConfigError('--weight-decay-all and --layer-decay cannot be combined (layer decay needs groups)')
        opt_target = list(model.parameters())
    optimizer = create_optimizer_v2(opt_target, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if primary:
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: lr {args.lr}, '
                     f'weight decay {args.weight_decay}' + (' on every parameter' if args.weight_decay_all else ''))

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device='cpu' if args.model_ema_force_cpu else None)

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=updates_per_epoch)

    resume_path = None
    start_epoch = 0
    if args.resume:
        resume_path = find_resume_checkpoint(args.resume)
        start_epoch = restore_training_state(
            resume_path, model,
            optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler,
            model_ema=model_ema,
            lr_scheduler=None if args.no_resume_opt else lr_scheduler,
            log_info=primary)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    train_model = model
    if args.distributed:
        device_ids = [device] if device.type == 'cuda' else None
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        train_model = NativeDDP(model, device_ids=device_ids, **ddp_kwargs)

    output_dir = None
    saver = None
    summary_csv = None
    if primary:
        output_dir = _output_dir(args, data_config, resume_path)
        extra = dict(label_names=label_names, num_classes=num_classes, model_kwargs=saved_model_kwargs,
                     pretrained_cfg=run_cfg)
        if getattr(dataset_train, 'bands', None) is not None:  # validate/inference/hub read the same bands
            extra['bands'] = dataset_train.bands.to_dict()
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing_metric,
            max_history=args.checkpoint_hist, extra=extra, lr_scheduler=lr_scheduler)
        summary_csv = os.path.join(output_dir, 'summary.csv')
        if resume_path and os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(output_dir):
            saver.load_state_dict_from_checkpoint(resume_path)
        utils.trim_summary(summary_csv, start_epoch)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        _logger.info(f'Writing checkpoints, summary.csv and training_curves.png to {output_dir}')

    stop_epoch = num_epochs if args.stop_epoch is None else min(args.stop_epoch, num_epochs)
    if primary:
        _logger.info(f'Scheduled epochs: {num_epochs}; running epochs {start_epoch}..{stop_epoch - 1}; '
                     f'{updates_per_epoch} updates per epoch; LR stepped per '
                     f'{"update" if args.sched_on_updates else "epoch"}.')

    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver is not None else (None, None)
    last_eval: Optional[Dict[str, float]] = None
    curves_drawn = -float('inf')
    interrupted = False
    try:
        for epoch in range(start_epoch, stop_epoch):
            utils.random_seed(epoch_seed(args.seed, epoch, args.rank), 0)
            for obj in (loader_train.sampler, getattr(loader_train, 'batch_sampler', None), dataset_train):
                if hasattr(obj, 'set_epoch'):
                    obj.set_epoch(epoch)

            train_metrics = train_one_epoch(
                epoch, train_model, loader_train, optimizer, train_loss_fn, args, device,
                lr_scheduler=lr_scheduler, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                model_ema=model_ema, mixup_fn=mixup_fn, epochs_after=stop_epoch - epoch - 1)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

            epoch_p_1 = epoch + 1
            do_eval = loader_eval is not None and (epoch_p_1 % args.val_interval == 0 or epoch_p_1 == num_epochs
                                                   or epoch_p_1 == stop_epoch)
            eval_metrics = None
            if do_eval:
                eval_metrics, _ = evaluate(model, loader_eval, args, device, num_classes, amp_autocast)
                if model_ema is not None and not args.model_ema_force_cpu:
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        utils.distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
                    eval_metrics, _ = evaluate(
                        model_ema, loader_eval, args, device, num_classes, amp_autocast, log_suffix=' (EMA)')
                last_eval = eval_metrics

            if primary:
                lrs = [pg['lr'] for pg in optimizer.param_groups]
                row_eval = eval_metrics if eval_metrics is not None else (
                    {k: '' for k in EVAL_KEYS} if loader_eval is not None else None)
                utils.update_summary(epoch, train_metrics, row_eval, filename=summary_csv,
                                     lr=sum(lrs) / len(lrs))
                # drawing takes ~0.5 s: every epoch of a long run, at most every CURVES_INTERVAL_S of a quick one
                if epoch == stop_epoch - 1 or time.monotonic() - curves_drawn >= CURVES_INTERVAL_S:
                    plot_training_curves(summary_csv, os.path.join(output_dir, 'training_curves.png'))
                    curves_drawn = time.monotonic()

            if loader_eval is None:
                latest_metric = train_metrics['loss']
            elif eval_metrics is not None:
                latest_metric = eval_metrics[eval_metric]
            else:
                latest_metric = None
            if saver is not None:
                if eval_metrics is not None:  # the epoch's full metrics ride along: model cards need P/R/F1
                    saver.extra['metrics'] = dict(eval_metrics)
                if latest_metric is not None:
                    best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
                else:
                    saver.save_last(epoch)
            if lr_scheduler is not None:
                lr_scheduler.step(epoch_p_1, latest_metric)
    except KeyboardInterrupt:
        interrupted = True
        if primary:
            _logger.warning(f'Interrupted. The last complete epoch is saved; continue with --resume {output_dir}')

    digest = weights_digest(model)
    _logger.info(f'Rank {args.rank} final weights sha256: {digest}')
    if args.distributed:
        torch.distributed.destroy_process_group()

    result = dict(output_dir=output_dir, best_metric=best_metric, best_epoch=best_epoch, eval_metric=eval_metric,
                  last_eval=last_eval, label_names=label_names, weights_sha256=digest, interrupted=interrupted)
    if primary:
        if best_metric is not None:
            _logger.info(f'*** Best {eval_metric}: {best_metric:.4f} (epoch {best_epoch})')
        if last_eval is not None:
            _logger.info('Final validation: ' + json.dumps({k: round(v, 4) for k, v in last_eval.items()}))
    return result
