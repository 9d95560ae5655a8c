"""Checkpoints that are never half-written, carry what inference needs, and resume a run exactly.

timm's CheckpointSaver writes ``last`` through a temporary file but replaces ``model_best`` and
``checkpoint-N`` by unlink-then-link, so a crash at the wrong moment loses them. Here every file
appears by ``os.replace`` of a fully written (and fsynced) temporary, and each checkpoint also stores
the class names, the model arguments and the data config of the run.
"""
import glob
import logging
import os
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models import load_state_dict
from timm.models._helpers import _torch_load
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

_logger = logging.getLogger(__name__)

__all__ = ['atomic_save', 'AtomicCheckpointSaver', 'find_resume_checkpoint', 'restore_training_state',
           'load_initial_checkpoint', 'adapt_input_conv_weights', 'CheckpointError']


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and the way out."""


def _fsync_dir(path: str):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str):
    """``torch.save`` to a temporary in the same folder, fsync, then rename over ``path``."""
    tmp = f'{path}.{os.getpid()}.partial'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver (same files, ranking and history) with atomic writes and extra keys.

    ``extra`` (label_names, model_kwargs, pretrained_cfg, ...) is stored in every checkpoint, along with the
    LR scheduler state, so ``--resume`` restores stateful schedulers (plateau) too.
    """

    def __init__(self, *args, extra: Optional[Dict[str, Any]] = None, lr_scheduler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = dict(extra or {})
        self.lr_scheduler = lr_scheduler

    def _save(self, save_path, epoch, metric=None):
        state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
        }
        if self.args is not None:
            state['args'] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.lr_scheduler is not None:
            state['lr_scheduler'] = self.lr_scheduler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state.update(self.extra)
        atomic_save(state, save_path)

    def _duplicate(self, src, dst):
        tmp = f'{dst}.{os.getpid()}.partial'
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    def save_last(self, epoch):
        """Write ``last`` only (epochs without validation): resumable, but not ranked."""
        self._save(os.path.join(self.checkpoint_dir, 'last' + self.extension), epoch)


def _is_loadable(path: str) -> Tuple[bool, str]:
    try:
        ckpt = _torch_load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle errors, ...: all mean "not a complete checkpoint"
        return False, f'{type(e).__name__}: {e}'
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        return False, 'not a training checkpoint (no state_dict/epoch keys)'
    return True, ''


def find_resume_checkpoint(path: str) -> str:
    """The checkpoint to resume from: ``path`` itself, or for a run folder its ``last.pth.tar``.

    When that file cannot be read (a crash while it was written on a filesystem without atomic rename, a
    copy cut short), the newest readable ``checkpoint-N.pth.tar`` beside it is used and the choice logged,
    so an interrupted run continues from its last complete checkpoint.
    """
    if os.path.isdir(path):
        folder, wanted = path, os.path.join(path, 'last.pth.tar')
    else:
        folder, wanted = os.path.dirname(os.path.abspath(path)), path
    if not os.path.isdir(folder):
        raise CheckpointError(f'--resume {path!r}: folder {folder!r} does not exist')
    problems = []
    if os.path.isfile(wanted):
        ok, why = _is_loadable(wanted)
        if ok:
            return wanted
        problems.append(f'{wanted} ({why})')
    else:
        problems.append(f'{wanted} (missing)')

    def _epoch(p):
        m = re.search(r'checkpoint-(\d+)\.pth\.tar$', p)
        return int(m.group(1)) if m else -1

    for candidate in sorted(glob.glob(os.path.join(folder, 'checkpoint-*.pth.tar')), key=_epoch, reverse=True):
        ok, why = _is_loadable(candidate)
        if ok:
            _logger.warning(f'--resume: {problems[0]} is not usable; resuming from the last complete checkpoint '
                            f'{candidate} instead.')
            return candidate
        problems.append(f'{candidate} ({why})')
    raise CheckpointError(
        f'--resume {path!r}: no complete checkpoint found: ' + '; '.join(problems)
        + '. Start a new run without --resume, or point --resume at a readable .pth.tar file.')


def restore_training_state(checkpoint_path: str, model, optimizer=None, loss_scaler=None, model_ema=None,
                           lr_scheduler=None, log_info: bool = True) -> int:
    """Load model, optimizer, scaler, EMA and scheduler state; return the epoch to start from."""
    ckpt = _torch_load(checkpoint_path, map_location='cpu', weights_only=True)
    target = unwrap_model(model)
    state_dict = {k[7:] if k.startswith('module.') else k: v for k, v in ckpt['state_dict'].items()}
    _check_head(state_dict, target, checkpoint_path, '--resume')
    target.load_state_dict(state_dict)
    if optimizer is not None and 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if model_ema is not None:
        if 'state_dict_ema' in ckpt:
            unwrap_model(model_ema).load_state_dict(ckpt['state_dict_ema'])
        else:
            _logger.warning(f'{checkpoint_path} has no EMA weights; the EMA restarts from the resumed weights.')
    if lr_scheduler is not None and 'lr_scheduler' in ckpt:
        lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
    epoch = ckpt['epoch'] + 1 if ckpt.get('version', 1) > 1 else ckpt['epoch']
    if log_info:
        _logger.info(f"Resumed from '{checkpoint_path}' (completed epoch {ckpt['epoch']}), continuing at epoch {epoch}")
    return epoch


def _classifier_shapes(state_dict: Dict[str, torch.Tensor], model) -> Tuple[Optional[str], Any, Any]:
    """(classifier weight key, shape in the file, shape in the model), or (None, ..) if the model has no head."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if not name or model.num_classes == 0:
        return None, None, None
    key = f'{name}.weight'
    model_sd = model.state_dict()
    if key not in model_sd or key not in state_dict:
        return None, None, None
    return key, tuple(state_dict[key].shape), tuple(model_sd[key].shape)


def _check_head(state_dict, model, path, flag):
    key, got, want = _classifier_shapes(state_dict, model)
    if key is not None and got != want:
        raise CheckpointError(
            f'{flag} {path!r} has a {got[0]}-class head ({key} {list(got)}) but the model has {want[0]} classes '
            f'(from the data or --num-classes). To fine-tune it on these classes use --pretrained-path {path} '
            f'(a new head is made); to continue it, use data with its {got[0]} classes.')


def adapt_input_conv_weights(state_dict: Dict[str, torch.Tensor], model, source: str) -> Dict[str, torch.Tensor]:
    """Give 3-band (RGB) first-conv weights the model's band count as timm's load_pretrained does for its loads
    (``adapt_input_conv``: the RGB kernels repeated over the bands, scaled by 3/N), and say so; a first conv of
    another band count than 3 or the model's is a CheckpointError."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    key = f'{first}.weight' if isinstance(first, str) else None
    if key is None or key not in state_dict or key not in model.state_dict():
        return state_dict
    got, want = state_dict[key].shape, model.state_dict()[key].shape
    if len(got) != 4 or got[1] == want[1]:
        return state_dict
    if got[1] != 3:
        raise CheckpointError(
            f'{source} takes {got[1]}-band input ({key} {list(got)}) but the model has {want[1]} input band(s). Only '
            f'3-band (RGB) weights adapt to other band counts: select {got[1]} bands (--in-chans/--bands), or start '
            f'from RGB weights or from scratch.')
    from timm.models._manipulate import adapt_input_conv
    state_dict = dict(state_dict)
    state_dict[key] = adapt_input_conv(want[1], state_dict[key])
    _logger.info(f'Converted the 3-band {first} weights of {source} to {want[1]} bands (timm adapt_input_conv: the RGB '
                 f'kernels repeated over the bands, scaled by 3/{want[1]})')
    return state_dict


def load_initial_checkpoint(model, path: str, filter_fn=None):
    """``--initial-checkpoint``: weights for the same classes, with a specific error when the head differs;
    3-band weights adapt to a model of other band counts (``adapt_input_conv_weights``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'--initial-checkpoint {path!r} does not exist')
    try:
        state_dict = load_state_dict(path, use_ema=False)
    except Exception as e:
        raise CheckpointError(f'--initial-checkpoint {path!r} could not be read ({type(e).__name__}: {e})') from e
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (ValueError, KeyError) as e:  # the filter's messages name what does not fit
            raise CheckpointError(f'--initial-checkpoint {path!r}: {e}') from e
    state_dict = adapt_input_conv_weights(state_dict, model, f'--initial-checkpoint {path}')
    _check_head(state_dict, model, path, '--initial-checkpoint')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(
            f'--initial-checkpoint {path!r} does not fit model {type(model).__name__}: {e}. Check --model and '
            f'--model-kwargs (depth, embed_dim, img_size) against the run that wrote it.') from e
    _logger.info(f'Loaded initial weights from {path}')
