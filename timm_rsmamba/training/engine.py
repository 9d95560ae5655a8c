"""One training epoch and one evaluation pass, with timm-style log lines that include an ETA.

Evaluation gathers every logit (across ranks under torchrun) and computes top-1/top-5 plus the paper's
macro precision / recall / F1 on the whole split at once, so the numbers equal a single-process run.
"""
import logging
import math
import time
from collections import OrderedDict
from contextlib import suppress
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from timm import utils

_logger = logging.getLogger('train')

__all__ = ['train_one_epoch', 'evaluate', 'format_eta']


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return '--:--'
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h:d}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def train_one_epoch(
        epoch: int,
        model: torch.nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: torch.nn.Module,
        args,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast=suppress,
        loss_scaler=None,
        model_ema=None,
        mixup_fn=None,
        epochs_after: int = 0,
) -> Dict[str, float]:
    """Train for one epoch; ``epochs_after`` (epochs still to run after this one) feeds the run ETA."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    second_order = getattr(optimizer, 'is_second_order', False)
    has_no_sync = args.distributed and hasattr(model, 'no_sync')
    update_time_m = utils.AverageMeter()
    data_time_m = utils.AverageMeter()
    losses_m = utils.AverageMeter()

    model.train()

    accum_steps = args.grad_accum_steps
    last_accum_steps = len(loader) % accum_steps
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps

        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(accum_steps * (time.time() - data_start_time))

        def _step():
            with amp_autocast():
                output = model(input)
                loss = loss_fn(output, target)
            if accum_steps > 1:
                loss = loss / accum_steps
            if loss_scaler is not None:
                loss_scaler(
                    loss, optimizer,
                    clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode,
                    parameters=utils.model_parameters(model, exclude_head='agc' in args.clip_mode),
                    create_graph=second_order,
                    need_update=need_update,
                )
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(
                            utils.model_parameters(model, exclude_head='agc' in args.clip_mode),
                            value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
            return loss

        if has_no_sync and not need_update:
            with model.no_sync():
                loss = _step()
        else:
            loss = _step()

        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f'loss is {loss.item()} at epoch {epoch} batch {batch_idx}: lower --lr, add --clip-grad, or '
                f'check the data (mean/std, labels)')
        losses_m.update(loss.item() * accum_steps, input.size(0))
        update_sample_count += input.size(0) * args.world_size

        if not need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)

        time_now = time.time()
        update_time_m.update(time_now - update_start_time)
        update_start_time = time_now

        if update_idx % args.log_interval == 0 or last_batch:
            lrl = [pg['lr'] for pg in optimizer.param_groups]
            lr = sum(lrl) / len(lrl)
            loss_avg, loss_now = losses_m.avg, losses_m.val
            if args.distributed:
                loss_avg = utils.reduce_tensor(loss.new([loss_avg]), args.world_size).item()
                loss_now = utils.reduce_tensor(loss.new([loss_now]), args.world_size).item()
            if utils.is_primary(args):
                left_epoch = (updates_per_epoch - update_idx - 1) * update_time_m.avg
                left_run = left_epoch + epochs_after * updates_per_epoch * update_time_m.avg
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                    f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
                    f'Time: {update_time_m.val:.3f}s, {update_sample_count / update_time_m.val:>7.2f}/s  '
                    f'LR: {lr:.3e}  '
                    f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})  '
                    f'ETA: epoch {format_eta(left_epoch)}, run {format_eta(left_run)}'
                )

        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

        update_sample_count = 0
        data_start_time = time.time()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()

    loss_avg = losses_m.avg
    if args.distributed:
        loss_avg = utils.reduce_tensor(torch.tensor([loss_avg], device=device), args.world_size).item()
    return OrderedDict([('loss', loss_avg)])


def evaluate(
        model: torch.nn.Module,
        loader,
        args,
        device: torch.device,
        num_classes: int,
        amp_autocast=suppress,
        log_suffix: str = '',
) -> Tuple[Dict[str, float], dict]:
    """Evaluate on the whole split: returns (scalar metrics for the summary, full metrics incl. per-class)."""
    from timm_rsmamba.metrics import drop_sampler_padding, gather_across_ranks, metrics_from_logits

    batch_time_m = utils.AverageMeter()
    model.eval()
    logits, targets = [], []
    last_idx = len(loader) - 1
    end = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            logits.append(output.float())
            targets.append(target)
            batch_time_m.update(time.time() - end)
            end = time.time()
            if utils.is_primary(args) and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
                _logger.info(
                    f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                    f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                    f'ETA: {format_eta((last_idx - batch_idx) * batch_time_m.avg)}')

    logits = torch.cat(logits) if logits else torch.empty(0, num_classes, device=device)
    targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long, device=device)
    if args.distributed:
        # timm's eval sampler (OrderedDistributedSampler) interleaves samples over ranks and pads with repeats;
        # gathering and dropping the padding counts every image exactly once, in dataset order
        num_samples = len(loader.dataset)
        logits = drop_sampler_padding(gather_across_ranks(logits), num_samples, args.world_size)
        targets = drop_sampler_padding(gather_across_ranks(targets), num_samples, args.world_size)
    loss = F.cross_entropy(logits, targets).item()
    full = metrics_from_logits(logits.cpu(), targets.cpu(), num_classes)
    summary = OrderedDict(loss=loss)
    for key in ('top1', 'top5', 'precision', 'recall', 'f1'):
        summary[key] = float(full[key])
    if utils.is_primary(args):
        _logger.info(
            f'Test{log_suffix}: {targets.numel()} images  Loss: {loss:.4f}  Acc@1: {summary["top1"]:.2f}  '
            f'Acc@5: {summary["top5"]:.2f}  macro P/R/F1: {summary["precision"]:.2f} / {summary["recall"]:.2f} '
            f'/ {summary["f1"]:.2f}')
    return summary, full
