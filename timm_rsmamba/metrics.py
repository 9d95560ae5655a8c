"""Classification metrics as the RSMamba paper reports them, plus exact multi-process gathering and plots.

The paper (through mmpretrain) reports macro precision / recall / F1 in percent: per-class values averaged over
*all* ``num_classes`` classes, a class never predicted has precision 0, a class absent from the targets has
recall 0 (scikit-learn's ``labels=range(num_classes), zero_division=0``). Macro F1 is the mean of the per-class
F1 values, not the F1 of macro precision and recall.
"""
from typing import Dict, Optional, Sequence

import torch

__all__ = [
    'confusion_matrix', 'classification_metrics', 'metrics_from_logits', 'topk_accuracy', 'gather_across_ranks',
    'drop_sampler_padding',
    'save_confusion_matrix_png', 'format_per_class_table', 'AVERAGES',
]

AVERAGES = ('macro', 'micro', 'weighted')


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predictions (scikit-learn layout)."""
    preds = torch.as_tensor(preds).reshape(-1).long().cpu()
    targets = torch.as_tensor(targets).reshape(-1).long().cpu()
    if preds.numel() != targets.numel():
        raise ValueError(f'{preds.numel()} predictions but {targets.numel()} targets')
    for what, t in (('prediction', preds), ('target', targets)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f'{what} index out of range [0, {num_classes}): min {int(t.min())}, max {int(t.max())}. '
                f'Does --num-classes match the data and the model?')
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def classification_metrics(
        preds: torch.Tensor,
        targets: torch.Tensor,
        num_classes: int,
        average: str = 'macro',
) -> Dict[str, object]:
    """Accuracy and averaged precision / recall / F1 (in %) plus per-class values and the confusion matrix.

    Returns a dict: ``top1``, ``precision``, ``recall``, ``f1`` (floats, %, averaged as ``average``),
    ``per_class`` (dict of float64 tensors ``precision``, ``recall``, ``f1`` in % and int64 ``support``),
    ``confusion_matrix`` (int64 tensor), ``num_samples``, ``average``.
    """
    if average not in AVERAGES:
        raise ValueError(f'average must be one of {AVERAGES}, got {average!r}')
    cm = confusion_matrix(preds, targets, num_classes)
    cmd = cm.double()
    tp = cmd.diagonal()
    predicted = cmd.sum(0)
    support = cmd.sum(1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = float(support.sum())
    accuracy = float(tp.sum()) / total if total else 0.
    if average == 'macro':
        avg = [float(v.mean()) for v in (precision, recall, f1)]
    elif average == 'weighted':
        w = support / total if total else support
        avg = [float((v * w).sum()) for v in (precision, recall, f1)]
    else:  # micro: single-label, every sample is predicted once, so P = R = F1 = accuracy
        avg = [accuracy] * 3
    return {
        'top1': 100. * accuracy,
        'precision': 100. * avg[0],
        'recall': 100. * avg[1],
        'f1': 100. * avg[2],
        'per_class': {
            'precision': 100. * precision,
            'recall': 100. * recall,
            'f1': 100. * f1,
            'support': cm.sum(1),
        },
        'confusion_matrix': cm,
        'num_samples': int(total),
        'average': average,
    }


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Top-k accuracy in %; k is clipped to the number of classes (as timm's ``accuracy``)."""
    if targets.numel() == 0:
        return 0.
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return 100. * float((top == targets.reshape(-1, 1)).any(dim=1).double().mean())


def metrics_from_logits(
        logits: torch.Tensor,
        targets: torch.Tensor,
        num_classes: Optional[int] = None,
        topk: Sequence[int] = (1, 5),
        average: str = 'macro',
) -> Dict[str, object]:
    """``classification_metrics`` of argmax predictions plus ``top{k}`` accuracies for every k in ``topk``."""
    logits = torch.as_tensor(logits).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().long().cpu().reshape(-1)
    num_classes = num_classes or logits.shape[1]
    if logits.shape[1] != num_classes:
        raise ValueError(f'logits have {logits.shape[1]} classes, expected {num_classes}')
    out = classification_metrics(logits.argmax(dim=1), targets, num_classes, average=average)
    for k in topk:
        out[f'top{k}'] = topk_accuracy(logits, targets, k)
    return out


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (dim 0) from every rank in rank order; sizes may differ between ranks.

    Without an initialised process group this returns the tensor unchanged. Ranks pad to the largest size for
    ``all_gather`` and the padding is cut off again, so the result holds exactly what each rank passed. Samples a
    distributed sampler duplicated to even out the ranks must be removed by the caller (see ``drop_sampler_padding``).
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    tensor = tensor.contiguous()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    max_size = max(sizes)
    padded = tensor.new_zeros((max_size,) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def drop_sampler_padding(gathered: torch.Tensor, num_samples: int, world_size: int, interleaved: bool = True):
    """Recover every sample exactly once, in dataset order, from ``gather_across_ranks`` of per-rank outputs.

    ``interleaved=True`` is the layout of timm's ``OrderedDistributedSampler`` and torch's ``DistributedSampler``
    with ``shuffle=False`` (rank r holds indices r, r + W, ...); both pad the index list by wrapping around to a
    multiple of W, so the padded duplicates are the last entries in dataset order. ``interleaved=False`` is for
    contiguous per-rank shards (rank r holds a block).
    """
    if world_size == 1:
        return gathered[:num_samples]
    if interleaved:
        per_rank = gathered.shape[0] // world_size
        if per_rank * world_size != gathered.shape[0]:
            raise ValueError('interleaved gathering needs the same number of samples on every rank')
        gathered = gathered.reshape(world_size, per_rank, *gathered.shape[1:]).transpose(0, 1)
        gathered = gathered.reshape(world_size * per_rank, *gathered.shape[2:])
    if gathered.shape[0] < num_samples:
        raise ValueError(f'gathered {gathered.shape[0]} samples, the dataset has {num_samples}')
    return gathered[:num_samples]


def save_confusion_matrix_png(cm, label_names: Sequence[str], path, title: Optional[str] = None,
                              normalize: bool = True) -> str:
    """Plot the confusion matrix to ``path`` (PNG): colours are row-normalised (recall per true class) so rare
    classes stay visible, cells show raw counts, tick labels are rotated; the figure grows with the class count
    (readable at 45 classes)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(torch.as_tensor(cm).cpu().numpy(), dtype=np.int64)
    n = cm.shape[0]
    names = list(label_names) if label_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f'{len(names)} label names for a {n}x{n} confusion matrix')
    rows = cm.sum(1, keepdims=True)
    colour = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0) if normalize else cm
    side = max(6., 0.32 * n + 3.)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(colour, cmap='Blues', vmin=0, vmax=1 if normalize else None, interpolation='nearest')
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label('fraction of true class' if normalize else 'count')
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    font = 9 if n <= 25 else 7 if n <= 50 else 5
    ax.set_xticklabels(names, rotation=60, ha='right', rotation_mode='anchor', fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    if n <= 60:
        cell_font = 7 if n <= 25 else 5
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    dark = colour[i, j] > (0.5 if normalize else cm.max() / 2)
                    ax.text(j, i, str(cm[i, j]), ha='center', va='center', fontsize=cell_font,
                            color='white' if dark else 'black')
    total = cm.sum()
    acc = 100. * np.trace(cm) / total if total else 0.
    ax.set_title(title or f'Confusion matrix ({total} images, accuracy {acc:.2f}%)')
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)


def format_per_class_table(metrics: Dict[str, object], label_names: Optional[Sequence[str]] = None) -> str:
    """Fixed-width text table: one row per class (precision / recall / F1 in %, support), then the averages."""
    per = metrics['per_class']
    n = len(per['support'])
    names = list(label_names) if label_names is not None else [str(i) for i in range(n)]
    width = max([len('class'), len(f'{metrics.get("average", "macro")} avg')] + [len(s) for s in names])
    lines = [f'{"class":<{width}}  {"precision":>9}  {"recall":>9}  {"f1":>9}  {"support":>7}']
    lines.append('-' * len(lines[0]))
    for i, name in enumerate(names):
        lines.append(
            f'{name:<{width}}  {float(per["precision"][i]):9.2f}  {float(per["recall"][i]):9.2f}  '
            f'{float(per["f1"][i]):9.2f}  {int(per["support"][i]):7d}')
    lines.append('-' * len(lines[0]))
    avg = f'{metrics.get("average", "macro")} avg'
    lines.append(
        f'{avg:<{width}}  {metrics["precision"]:9.2f}  {metrics["recall"]:9.2f}  {metrics["f1"]:9.2f}  '
        f'{int(sum(int(s) for s in per["support"])):7d}')
    lines.append(f'{"accuracy":<{width}}  {"":9}  {"":9}  {metrics["top1"]:9.2f}  {metrics.get("num_samples", 0):7d}')
    return '\n'.join(lines)

