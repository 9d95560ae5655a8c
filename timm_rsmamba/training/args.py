"""Command-line flags of ``train.py``: timm's training flags (same names, same defaults) plus a few for
remote-sensing data (``--skip-corrupt``), the paper's recipe (``--weight-decay-all``) and long runs
(``--stop-epoch``). ``-c/--config`` YAML files set defaults that explicit flags still override.
"""
import argparse
import os
from typing import List, Optional, Tuple

import yaml
from timm import utils

from ..data.bands import add_band_args, wants_multiband
from ..malloc import MALLOC_CHOICES, MALLOC_HELP

__all__ = ['build_parser', 'parse_args', 'ConfigError']

EVAL_METRICS = ('top1', 'top5', 'loss', 'f1', 'precision', 'recall')


class ConfigError(ValueError):
    """A bad flag value or config file; the message says which and what to do."""


def _config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file of flag defaults (keys as in args.yaml: underscores); flags given on '
                             'the command line override it')
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The full parser. Defaults are timm's ``train.py`` defaults; the paper's recipe lives in ``configs/``."""
    parser = argparse.ArgumentParser(
        description='Train RSMamba (or any timm model) on remote-sensing scene folders or HF datasets',
        parents=[_config_parser()])

    # Dataset
    group = parser.add_argument_group('Dataset parameters')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset root (same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset root (folder with train/ and val/)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("hfds/<name or /abs/path>"); ImageFolder if empty')
    group.add_argument('--train-split', metavar='NAME', default='train', help='train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='validation split (default: validation; a folder named val/valid/validation is found); '
                            'empty string to train without validation')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='class to index mapping file (one class name per line, in index order)')
    group.add_argument('--input-key', default=None, type=str, help='HF dataset column holding the images')
    group.add_argument('--target-key', default=None, type=str, help='HF dataset column holding the labels')
    group.add_argument('--skip-corrupt', action='store_true', default=False,
                       help='skip (and count) unreadable images instead of stopping with an error naming the file')
    add_band_args(group)

    # Model
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='rsmamba_base', type=str, metavar='MODEL',
                       help='model name (default: "rsmamba_base")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the pretrained weights of the model tag (if available)')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='load this file as the pretrained weights (a new head is made when classes differ)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load these weights (same classes) into the model after creation')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume model, optimizer, scheduler, EMA and scaler from a checkpoint file or an '
                            'output folder (its last complete checkpoint); the run continues in that folder '
                            'unless --experiment names another')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not resume optimizer / scaler state when resuming the model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes (default: from the data; must agree with it)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if None)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels (default: 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input dimensions (c h w, e.g. --input-size 3 224 224)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='center crop fraction for validation (224/256 = 0.875 in the paper)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='dataset mean (0-1 scale)')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='dataset std (0-1 scale)')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='resize interpolation for validation (overrides the model\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='batch size per process (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='number of steps to accumulate gradients over (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through the model blocks')
    group.add_argument('--malloc', default='auto', choices=MALLOC_CHOICES, help=MALLOC_HELP)
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra model arguments, e.g. --model-kwargs depth=4 img_size=64')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='torch.compile the model with this backend (default when given: inductor)')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')

    # Device & distributed
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str,
                       help='device (default: cuda if available, else cpu); under torchrun each process takes '
                            'the device of its local rank')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='do not broadcast buffers in DistributedDataParallel')
    group.add_argument('--local_rank', '--local-rank', default=0, type=int, help=argparse.SUPPRESS)

    # Optimizer
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--weight-decay-all', action='store_true', default=False,
                       help='decay every parameter (norms, biases, pos_embed, A_log, D) as the paper does, instead '
                            'of timm\'s exclusion of 1-d and no_weight_decay() parameters')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--clip-mode', type=str, default='norm', help='clipping mode: "norm", "value" or "agc"')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra optimizer arguments')

    # Schedule
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: cosine)')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the LR schedule every optimizer update instead of every epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate; overrides --lr-base when set')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='batch size of --lr-base')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='lr scaling with batch size ("linear", "sqrt"; by optimizer if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='lr noise limit percent')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='lr noise std-dev')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='lr cycle length multiplier')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='lr decay per cycle')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='lr cycle limit')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='lr k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warm-up start lr (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual start epoch (restarts)')
    group.add_argument('--stop-epoch', default=None, type=int, metavar='N',
                       help='end this run after N epochs in total while the schedule still spans --epochs '
                            '(split a long run over job time limits; continue with --resume)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='decay epochs for the multistep scheduler')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='warm-up epochs (default: 5)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude the warm-up period from the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at min_lr after the cyclic schedule ends (default: 0)')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience of the plateau scheduler')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

    # Augmentation & regularization
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop mode in training')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random-resized-crop scale range (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random-resized-crop aspect ratio range (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (default: 0.5)')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability (default: 0)')
    group.add_argument('--rot90', type=float, default=0., metavar='PCT',
                       help='probability of a random rotation by 90, 180 or 270 degrees (default: 0)')
    group.add_argument('--color-jitter', type=float, default=None, metavar='PCT',
                       help='color jitter factor (default: 0.4 for RGB, 0 for multi-band data, which cannot take it)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying color jitter')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='random grayscale probability')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='gaussian blur probability')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment policy ("original" = the ImageNet policy, "v0", "rand-m9-mstd0.5", ...)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False, help='do not random erase first split')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, enabled if > 0 (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, enabled if > 0 (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of mixup or cutmix per batch when enabled (default: 1.0)')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are enabled (default: 0.5)')
    group.add_argument('--mixup-mode', type=str, default='batch', help='mixup mode: "batch", "pair" or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn mixup off after this epoch')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (random, bilinear, bicubic; default: "random")')

    # Batch norm
    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm in distributed runs')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='share BatchNorm statistics after each epoch ("broadcast", "reduce" or "")')

    # EMA
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='track an EMA of the weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on the CPU (rank 0 only); disables EMA validation')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='warm up the EMA decay')

    # Misc
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='epochs between validations (the last checkpoint is still written every epoch)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of best checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in the DataLoader')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable the fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='parent folder of the run folder (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='run folder name (default: date-model-size)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', choices=EVAL_METRICS,
                       help='metric that picks model_best: top1, top5, loss, f1 (macro), precision, recall')
    return parser


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path!r} (-c/--config) does not exist')
    with open(path, 'r') as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'config file {path!r} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'config file {path!r} must be a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k.replace('-', '_') not in known)
    if unknown:
        raise ConfigError(
            f'config file {path!r} has unknown keys {unknown}; keys are flag names with underscores, '
            f'e.g. "weight_decay" for --weight-decay')
    return {k.replace('-', '_'): v for k, v in cfg.items() if k != 'config'}


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse flags with YAML defaults; returns the args and their YAML text (written to args.yaml)."""
    config_args, remaining = _config_parser().parse_known_args(argv)
    parser = build_parser()
    if config_args.config:
        try:
            parser.set_defaults(**_load_config(config_args.config, parser))
        except ConfigError as e:
            parser.error(str(e))
    args = parser.parse_args(remaining)
    args.config = config_args.config
    if args.data_dir is None:
        args.data_dir = args.data
    if args.color_jitter is None:  # timm's 0.4 where it applies; an explicit value on multi-band data is refused
        in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
        args.color_jitter = 0. if wants_multiband(in_chans, args.bands, args.reflectance_scale) else 0.4
    args_text = yaml.safe_dump(vars(args), default_flow_style=False)
    return args, args_text
