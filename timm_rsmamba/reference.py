"""Independent functional forward of the ORIGINAL RSMamba layout, written from the spec's math.

Given an original mmpretrain state dict (``backbone.*`` / ``head.fc.*`` keys) it computes logits with plain
tensor ops and a sequential selective scan. It deliberately imports nothing from ``timm_rsmamba.models`` or
``timm_rsmamba.ops``: the converter uses it to check that the converted timm model computes the same thing.
"""
import math
import re
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['reference_forward', 'num_layers', 'token_count']

PREFIX = 'backbone.'


def num_layers(state_dict: Dict[str, torch.Tensor]) -> int:
    """Number of Mamba layers in an original state dict (backbone.layers.{i}.*)."""
    ids = {int(m.group(1)) for k in state_dict for m in [re.match(r'backbone\.layers\.(\d+)\.', k)] if m}
    return max(ids) + 1 if ids else 0


def _layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f'{PREFIX}{name}.weight'], sd[f'{PREFIX}{name}.bias'], eps)


def _sincos_table(grid_h: int, grid_w: int, dim: int, dtype, temperature: float = 10000.) -> torch.Tensor:
    """mmpretrain's build_2d_sincos_position_embedding: meshgrid(w, h) in 'ij' order, [sin w, cos w, sin h, cos h]."""
    if dim % 4:
        raise ValueError(f'sine position embedding needs a width divisible by 4, got {dim}')
    rows = []
    quarter = dim // 4
    omega = [1. / temperature ** (j / quarter) for j in range(quarter)]
    for w in range(grid_w):          # first meshgrid axis is w ...
        for h in range(grid_h):      # ... so h varies fastest along the flattened sequence
            rows.append([math.sin(w * o) for o in omega] + [math.cos(w * o) for o in omega]
                        + [math.sin(h * o) for o in omega] + [math.cos(h * o) for o in omega])
    return torch.tensor(rows, dtype=dtype)[None]


def _insert_cls(x: torch.Tensor, cls: torch.Tensor, position: str) -> torch.Tensor:
    if position == 'head':
        return torch.cat([cls, x], 1)
    if position == 'tail':
        return torch.cat([x, cls], 1)
    if position == 'head_tail':
        return torch.cat([cls[:, :1], x, cls[:, 1:]], 1)
    if position == 'middle':
        half = x.shape[1] // 2
        return torch.cat([x[:, :half], cls, x[:, half:]], 1)
    raise ValueError(f'unknown cls_position {position!r}')


def _mixer(sd: Dict[str, torch.Tensor], i: int, u: torch.Tensor) -> torch.Tensor:
    """Mamba-1 mixer of layer i on u (B, L, d), with a plain per-position recurrence."""
    p = lambda name: sd[f'{PREFIX}layers.{i}.{name}']  # noqa: E731
    E = p('D').shape[0]
    S = p('A_log').shape[1]
    R = p('dt_proj.weight').shape[1]
    B, L, _ = u.shape
    xz = u @ p('in_proj.weight').t()
    x, z = xz[..., :E], xz[..., E:]
    # causal depthwise conv: out[t] = bias + sum_j w[j] * x[t - (K-1) + j], zeros before the start
    w, K = p('conv1d.weight')[:, 0, :], p('conv1d.weight').shape[-1]
    padded = torch.cat([x.new_zeros(B, K - 1, E), x], dim=1)
    conv = p('conv1d.bias').expand(B, L, E).clone()
    for j in range(K):
        conv = conv + padded[:, j:j + L] * w[:, j]
    x = conv * torch.sigmoid(conv)
    proj = x @ p('x_proj.weight').t()
    dt_low, Bm, Cm = proj[..., :R], proj[..., R:R + S], proj[..., R + S:R + 2 * S]
    dt = F.softplus(dt_low @ p('dt_proj.weight').t() + p('dt_proj.bias'))
    A = -torch.exp(p('A_log'))
    h = x.new_zeros(B, E, S)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t, :, None] * x[:, t, :, None]) * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + p('D') * x[:, t])
    y = torch.stack(ys, dim=1)
    return (y * (z * torch.sigmoid(z))) @ p('out_proj.weight').t()


def reference_forward(
        state_dict: Dict[str, torch.Tensor],
        images: torch.Tensor,
        path_type: str = 'forward_reverse_shuffle_gate',
        cls_position: str = 'none',
        pe_type: str = 'learnable',
        perms: Optional[Sequence[torch.Tensor]] = None,
        out_type: Optional[str] = None,
        patch_stride: int = 8,
        eps: float = 1e-6,
        progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Logits of the original RSMamba ImageClassifier.

    Args:
        state_dict: original keys (``backbone.*``, ``head.fc.*``); a {'state_dict': ...} wrapper is accepted.
        images: (B, C, H, W); the computation runs in its dtype (use float64 for a tight reference).
        path_type / cls_position / pe_type: the original backbone's options.
        perms: one permutation of the token sequence per layer (shuffle paths only).
        out_type: 'avg_featmap' (mean of patch tokens + ln2) or 'cls_token'; default: 'avg_featmap' when the
            state dict has backbone.ln2, else 'cls_token'.
        progress: called as progress(layer_index, n_layers) after each layer (full-size runs take minutes).
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    sd = {k: v.to(images.dtype) for k, v in state_dict.items() if torch.is_tensor(v)}
    if out_type is None:
        out_type = 'avg_featmap' if f'{PREFIX}ln2.weight' in sd else 'cls_token'
    n_layers = num_layers(sd)
    if 'shuffle' in path_type and (perms is None or len(perms) < n_layers):
        raise ValueError(f'path_type {path_type!r} needs one token permutation per layer ({n_layers})')

    # 1. corner-padded overlapping patch embedding
    weight = sd[f'{PREFIX}patch_embed.projection.weight']
    kh, kw = weight.shape[-2:]
    H, W = images.shape[-2:]
    gh, gw = math.ceil(H / patch_stride), math.ceil(W / patch_stride)
    pad_h, pad_w = max((gh - 1) * patch_stride + kh - H, 0), max((gw - 1) * patch_stride + kw - W, 0)
    x = F.conv2d(F.pad(images, (0, pad_w, 0, pad_h)), weight, stride=patch_stride)
    B, d = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, d), row-major

    # 2. class tokens and position embedding
    if cls_position != 'none':
        x = _insert_cls(x, sd[f'{PREFIX}cls_token'].expand(B, -1, -1), cls_position)
    if pe_type == 'learnable':
        x = x + sd[f'{PREFIX}pos_embed']
    elif pe_type == 'sine':
        table = _sincos_table(gh, gw, d, x.dtype)
        if cls_position != 'none':  # class tokens get no position signal
            n_cls = sd[f'{PREFIX}cls_token'].shape[1]
            table = _insert_cls(table, table.new_zeros(1, n_cls, d), cls_position)
        x = x + table

    # 3. multi-path blocks sharing one pre_norm
    for i in range(n_layers):
        residual = x
        paths = [x]
        if 'reverse' in path_type:
            paths.append(torch.flip(x, [1]))
        if 'shuffle' in path_type:
            paths.append(x[:, perms[i]])
        out = _mixer(sd, i, _layer_norm(torch.cat(paths, 0), sd, 'pre_norm', eps))
        outs = list(torch.split(out, B, dim=0))
        if 'reverse' in path_type:
            outs[1] = torch.flip(outs[1], [1])
        if 'shuffle' in path_type:
            outs[2] = outs[2][:, torch.argsort(perms[i])]
        if path_type.endswith('gate'):
            gate_in = torch.cat([o.mean(dim=1) for o in outs], dim=-1)
            g = torch.softmax(gate_in @ sd[f'{PREFIX}gate_layers.{i}.0.weight'].t(), dim=-1)
            mixed = sum(g[:, k:k + 1, None] * o for k, o in enumerate(outs))
        else:
            mixed = sum(outs) / len(outs)
        x = residual + mixed
        if progress is not None:
            progress(i, n_layers)
    x = _layer_norm(x, sd, 'ln1', eps)

    # 4. pooling and head
    L = x.shape[1]
    if out_type == 'cls_token':
        feats = {'head': lambda: x[:, 0], 'tail': lambda: x[:, -1], 'middle': lambda: x[:, L // 2],
                 'head_tail': lambda: x[:, [0, -1]].mean(dim=1)}[cls_position]()
    else:
        keep = torch.ones(L, dtype=torch.bool)
        if cls_position == 'head':
            keep[0] = False
        elif cls_position == 'tail':
            keep[-1] = False
        elif cls_position == 'head_tail':
            keep[0] = keep[-1] = False
        elif cls_position == 'middle':
            keep[L // 2] = False
        feats = _layer_norm(x[:, keep].mean(dim=1), sd, 'ln2', eps)
    return feats @ sd['head.fc.weight'].t() + sd['head.fc.bias']


def token_count(images_hw: Sequence[int], n_cls: int = 0, patch_stride: int = 8) -> int:
    """Sequence length the blocks see (patch tokens + class tokens), for drawing permutations."""
    return math.ceil(images_hw[0] / patch_stride) * math.ceil(images_hw[1] / patch_stride) + n_cls

