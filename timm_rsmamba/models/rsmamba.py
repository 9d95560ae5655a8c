"""RSMamba: remote-sensing scene classification with multi-path Mamba blocks.

Paper: `RSMamba: Remote Sensing Image Classification with State Space Model`
(Chen et al., IEEE GRSL 2024, https://arxiv.org/abs/2403.19654).

Defaults reproduce the authors' mmpretrain backbone exactly: corner-padded overlapping patch
embedding (kernel 16, stride 8), learnable position embedding, one pre-norm shared by every block,
each block running one Mamba mixer over forward, reversed and shuffled token orders at once and
mixing them with a learned softmax gate, then LayerNorm, mean pooling, LayerNorm and a linear head.

Departures from the original, all behind options or documented:
* ``eval_shuffle='fixed'`` (default) uses one seeded permutation per block in eval mode, so an image
  always gets the same logits; ``'random'`` restores the original's fresh permutation in eval too.
* ``cls_token_position='head_tail'`` works (the original checks a misspelt name and raises).
* ``drop_path_rate`` adds stochastic depth on the block residual (0 = original).
* ``dynamic_img_size=True`` (default): any input size runs. At the size the model was built for the position
  embedding is used as is (the original's math, bit for bit); another token grid gets it resampled
  (bicubic, as timm resizes ViT position embeddings), cached per grid outside training. Remote-sensing
  chips come at their sensors' sizes (64 px EuroSAT, 120 px BigEarthNet, 256 px UC Merced), and
  trainers that never pass img_size feed them as they are. ``dynamic_img_size=False`` restores timm's
  fixed-size convention: other sizes are an error.
"""
import math
import pickle
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint

from timm.layers import (DropPath, register_notrace_function, register_notrace_module, resample_abs_pos_embed,
                         trunc_normal_)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from ..modules import MambaMixer
from ..ops.token_orders import restore_token_orders
from ._datasets import DATASETS, normalization

__all__ = ['RSMamba', 'checkpoint_filter_fn', 'convert_mmpretrain', 'check_input_bands', 'InputBandsError']

PATH_TYPES = (
    'forward', 'forward_reverse_mean', 'forward_reverse_gate',
    'forward_reverse_shuffle_mean', 'forward_reverse_shuffle_gate')
CLS_TOKEN_POSITIONS = ('none', 'head', 'tail', 'head_tail', 'middle')
POS_EMBED_TYPES = ('learnable', 'sine', 'none')


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def corner_padded_grid(img_size: Tuple[int, int], kernel: int, stride: int) -> Tuple[int, int]:
    """Token grid of the corner-padded conv: ceil(size / stride) along each axis."""
    return tuple(math.ceil(s / stride) for s in img_size)


@register_notrace_module  # its padding depends on the input's size
class CornerPatchEmbed(nn.Module):
    """Overlapping patch conv; zero-pads only bottom/right so the strided kernel covers the image."""

    def __init__(self, img_size=224, patch_size=16, stride=8, in_chans=3, embed_dim=192, device=None, dtype=None):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.stride = _pair(stride)
        self.grid_size = self.dynamic_grid(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = False  # timm reads it for fixed_input_size; RSMamba sets it from dynamic_img_size
        self.proj = nn.Conv2d(
            in_chans, embed_dim, self.patch_size, self.stride, bias=False, device=device, dtype=dtype)

    def dynamic_grid(self, img_size) -> Tuple[int, int]:
        return tuple(math.ceil(s / st) for s, st in zip(img_size, self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, Gh, Gw, D)."""
        pads = []
        for size, k, st in zip(x.shape[-2:], self.patch_size, self.stride):
            pads.append(max((math.ceil(size / st) - 1) * st + k - size, 0))
        x = F.pad(x, (0, pads[1], 0, pads[0]))
        return self.proj(x).permute(0, 2, 3, 1)


def sincos_pos_embed_2d(grid_size: Tuple[int, int], dim: int, temperature: float = 10000.) -> torch.Tensor:
    """mmpretrain's fixed 2-D sin-cos table (its meshgrid order), shape (1, Gh*Gw, dim)."""
    h, w = grid_size
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing='ij')
    quarter = dim // 4
    omega = 1. / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))[None]


@register_notrace_function  # FX records the draw as a step of the graph, not its trace-time result
def random_permutations(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """(count, L): fresh permutations of the L positions of (B, L, D) ``tokens``, on their device."""
    return torch.stack([torch.randperm(tokens.shape[1], device=tokens.device) for _ in range(count)])


def insert_extra_tokens(patches: torch.Tensor, extra: Optional[torch.Tensor], position: str) -> torch.Tensor:
    """Place class tokens (B, n_extra, D) into the patch sequence (B, L, D) as the original does."""
    if extra is None or position == 'none':
        return patches
    if position == 'head':
        return torch.cat([extra, patches], dim=1)
    if position == 'tail':
        return torch.cat([patches, extra], dim=1)
    if position == 'head_tail':
        return torch.cat([extra[:, :1], patches, extra[:, 1:]], dim=1)
    mid = patches.shape[1] // 2
    return torch.cat([patches[:, :mid], extra, patches[:, mid:]], dim=1)


def split_extra_tokens(x: torch.Tensor, position: str, num_extra: int) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Inverse of insert_extra_tokens: (extra tokens or None, patch tokens)."""
    if position == 'none' or num_extra == 0:
        return None, x
    if position == 'head':
        return x[:, :1], x[:, 1:]
    if position == 'tail':
        return x[:, -1:], x[:, :-1]
    if position == 'head_tail':
        return torch.cat([x[:, :1], x[:, -1:]], dim=1), x[:, 1:-1]
    mid = (x.shape[1] - 1) // 2
    return x[:, mid:mid + 1], torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1)


@register_notrace_module  # shapes drive its token orders: FX sees a block as one step (timm's feature nodes)
class MultiPathBlock(nn.Module):
    """One mixer over several token orders at once, merged by mean or a learned softmax gate."""

    def __init__(
            self,
            dim: int,
            intermediate_size: int,
            path_type: str = 'forward_reverse_shuffle_gate',
            state_size: int = 16,
            dt_rank: Optional[int] = None,
            conv_kernel: int = 4,
            drop_path: float = 0.,
            scan_backend: Optional[str] = None,
            conv_backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.path_type = path_type
        self.reverse = 'reverse' in path_type
        self.shuffle = 'shuffle' in path_type
        self.num_paths = 1 + self.reverse + self.shuffle
        self.mixer = MambaMixer(
            dim, intermediate_size, state_size=state_size, dt_rank=dt_rank, conv_kernel=conv_kernel,
            scan_backend=scan_backend, conv_backend=conv_backend, device=device, dtype=dtype)
        if path_type.endswith('_gate'):
            self.gate = nn.Linear(self.num_paths * dim, self.num_paths, bias=False, device=device, dtype=dtype)
        else:
            self.gate = None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _token_orders(self, length: int, perm: Optional[torch.Tensor], device) -> torch.Tensor:
        """(L, paths) token indices: forward, then reversed, then shuffled by ``perm``, as present."""
        forward = torch.arange(length, device=device)
        orders = [forward]
        if self.reverse:
            orders.append(forward.flip(0))
        if self.shuffle:
            orders.append(perm)
        return torch.stack(orders, dim=1)

    def forward(self, x: torch.Tensor, pre_norm: nn.Module, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, dim). The original runs pre-norm -> mixer on every token order and merges the results.

        The pre-norm and in_proj act on each token alone, so they run once and the orders are taken of their
        output; out_proj (linear, no bias) runs once too, on the merged orders, and the gate's per-order
        token means go through it as means. Same math, 2.5x fewer projection FLOPs for three orders.
        """
        mixer = self.mixer
        xz = mixer.in_proj(pre_norm(x).transpose(0, 1))  # (L, B, 2E), time-major
        length, batch = xz.shape[:2]
        if self.num_paths == 1:
            return x + self.drop_path(mixer.out_proj(mixer.mix(xz)).transpose(0, 1))
        order = self._token_orders(length, perm, xz.device)  # (L, paths): position l of each order
        # every order at once, each back in token order: the C++ scan writes y so. The Triton mixer's gate
        # re-computes y as the mix made it, so there the orders are put back after the gate. (The gate's means
        # and weights are the same in any token order.)
        restore_after_gate = mixer.on_triton(xz.device)
        restore = not restore_after_gate
        if self.gate is not None:  # y (L, paths * B, E) and its means over the tokens (paths * B, E)
            y, y_means = mixer.mix(xz, order, restore_order=restore, with_means=True)
            means = mixer.out_proj(y_means.unflatten(0, (self.num_paths, batch))).transpose(0, 1)  # (B, paths, dim)
            weights = self.gate(means.flatten(1)).softmax(dim=-1)
            y = y.unflatten(1, (self.num_paths, batch))  # (L, paths, B, E)
            y = mixer.weigh(y, weights.t()[None, :, :, None], xz, order)
        else:
            y = mixer.mix(xz, order, restore_order=restore).unflatten(1, (self.num_paths, batch)) / self.num_paths
        if restore_after_gate:
            y = restore_token_orders(y.flatten(1, 2), order).unflatten(1, (self.num_paths, batch))
        return x + self.drop_path(mixer.out_proj(y.sum(1)).transpose(0, 1))


class RSMamba(nn.Module):
    """RSMamba classifier (see the module docstring for the architecture and its options)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            patch_stride: int = 8,
            in_chans: int = 3,
            num_classes: int = 21,
            global_pool: Optional[str] = None,
            embed_dim: int = 192,
            depth: int = 24,
            intermediate_size: int = 384,
            state_size: int = 16,
            dt_rank: Optional[int] = None,
            conv_kernel: int = 4,
            path_type: str = 'forward_reverse_shuffle_gate',
            cls_token_position: str = 'none',
            pos_embed_type: str = 'learnable',
            eval_shuffle: str = 'fixed',
            shuffle_seed: int = 0,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = True,
            scan_backend: Optional[str] = None,
            conv_backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            patch_stride: 8 gives the paper's overlapping patches; 16 the non-overlapping ablation.
            path_type: one of PATH_TYPES (the paper's Table IV ablation); default all three gated.
            cls_token_position: 'none' (mean pooling, default) or where class tokens go (Table III).
            pos_embed_type: 'learnable' (default), 'sine' (fixed 2-D sin-cos) or 'none'.
            eval_shuffle: 'fixed' = seeded per-block permutation in eval; 'random' = the original.
            drop_rate: dropout after the position embedding (the original's only dropout).
            dynamic_img_size: accept any input size, resampling the position embedding for token grids other
                than img_size's (default); False makes other sizes an error (timm's fixed-size convention).
            global_pool: 'avg' (patch-token mean then LayerNorm) or 'token' (class token(s));
                default 'token' with class tokens, else 'avg'.
            scan_backend / conv_backend: force an ops backend (scan: 'triton', 'cpu_kernel', 'compiled',
                'chunked', 'reference', 'mamba_ssm'; conv: 'triton', 'cpu_kernel', 'torch', 'reference',
                'causal_conv1d'); default picks 'cpu_kernel' on CPU, on CUDA the first usable of
                ops.triton_support.CUDA_AUTO_BACKENDS ('triton' first), else 'chunked' / 'torch'.
                Env: RSMAMBA_SCAN_BACKEND, RSMAMBA_CONV_BACKEND.
        """
        super().__init__()
        if path_type not in PATH_TYPES:
            raise ValueError(f'path_type must be one of {PATH_TYPES}, got {path_type!r}')
        if cls_token_position not in CLS_TOKEN_POSITIONS:
            raise ValueError(f'cls_token_position must be one of {CLS_TOKEN_POSITIONS}, got {cls_token_position!r}')
        if pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f'pos_embed_type must be one of {POS_EMBED_TYPES}, got {pos_embed_type!r}')
        if eval_shuffle not in ('fixed', 'random'):
            raise ValueError(f"eval_shuffle must be 'fixed' or 'random', got {eval_shuffle!r}")
        global_pool = global_pool or ('avg' if cls_token_position == 'none' else 'token')
        self._check_pool(global_pool, cls_token_position)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.cls_token_position = cls_token_position
        self.num_prefix_tokens = {'none': 0, 'head_tail': 2}.get(cls_token_position, 1)
        self.pos_embed_type = pos_embed_type
        self.path_type = path_type
        self.eval_shuffle = eval_shuffle
        self.shuffle_seed = shuffle_seed
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self._perm_cache: Dict[Tuple[int, int], torch.Tensor] = {}
        self._pos_cache: Dict[Tuple[int, int], Tuple[tuple, torch.Tensor]] = {}

        self.patch_embed = CornerPatchEmbed(img_size, patch_size, patch_stride, in_chans, embed_dim, **dd)
        self.patch_embed.strict_img_size = not dynamic_img_size
        grid = self.patch_embed.grid_size
        seq_len = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_prefix_tokens, embed_dim, **dd)) \
            if self.num_prefix_tokens else None
        if pos_embed_type == 'learnable':
            self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, embed_dim, **dd))
        else:
            self.pos_embed = None
            if pos_embed_type == 'sine':
                self.register_buffer('sine_pos_embed', torch.empty(0, **dd), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth ramp
        self.pre_norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd)
        self.blocks = nn.ModuleList([
            MultiPathBlock(
                embed_dim, intermediate_size, path_type, state_size=state_size, dt_rank=dt_rank,
                conv_kernel=conv_kernel, drop_path=dpr[i], scan_backend=scan_backend, conv_backend=conv_backend, **dd)
            for i in range(depth)])
        if self.blocks and self.blocks[0].shuffle:
            # the eval permutations at the native length, as a buffer: they follow .to(device) and torch.export
            # records them as constants (a generator cannot be exported)
            self._native_perm_key = (shuffle_seed, seq_len)
            self.register_buffer('eval_perms', torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.init_non_persistent_buffers()
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_stride, module=f'blocks.{i}') for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd) if global_pool == 'avg' else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @staticmethod
    def _check_pool(global_pool, cls_token_position):
        if global_pool not in ('avg', 'token', ''):
            raise ValueError(f"global_pool must be 'avg', 'token' or '', got {global_pool!r}")
        if global_pool == 'token' and cls_token_position == 'none':
            raise ValueError("global_pool='token' needs class tokens: set cls_token_position")

    def init_weights(self):
        """The original's init: Kaiming-normal (fan_in, linear) patch conv, trunc-normal(0.02) position
        embedding, class tokens at zero, PyTorch defaults elsewhere, A_log = log(1..S), D = 1 (in the mixer)."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        nn.init.kaiming_normal_(self.patch_embed.proj.weight, mode='fan_in', nonlinearity='linear')

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the buffers the state dict leaves out, on their device: after meta-device construction
        (timm's reinit_non_persistent_buffers, transformers' from_pretrained) they hold no values."""
        if hasattr(self, 'eval_perms'):
            self.eval_perms = self._draw_perms(*self._native_perm_key).to(self.eval_perms.device)
        if hasattr(self, 'sine_pos_embed'):
            table = sincos_pos_embed_2d(self.patch_embed.grid_size, self.embed_dim)
            self.sine_pos_embed = table.to(self.sine_pos_embed.device, self.sine_pos_embed.dtype)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Names to spare from weight decay if a user asks for it (timm also skips every 1-D tensor).

        The paper decays every parameter; timm's ``--weight-decay`` with default filtering applies this set.
        """
        return {'pos_embed', 'cls_token', '*.A_log', '*.D'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^cls_token|^pos_embed|^patch_embed|^pre_norm',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool, self.cls_token_position)
            if global_pool == 'avg' and isinstance(self.fc_norm, nn.Identity):
                self.fc_norm = nn.LayerNorm(self.embed_dim, eps=self.pre_norm.eps, device=self.pre_norm.weight.device)
            self.global_pool = global_pool
        device = self.pre_norm.weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()

    # ---- token permutations -------------------------------------------------------------------
    def _draw_perms(self, seed: int, seq_len: int) -> torch.Tensor:
        """(blocks, seq_len): block i's permutation from a CPU generator seeded by (seed, i)."""
        return torch.stack([
            torch.randperm(seq_len, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in range(len(self.blocks))])

    def shuffle_permutations(self, seq_len: int, device=None) -> List[torch.Tensor]:
        """The fixed eval-mode permutation of each block (seeded by ``shuffle_seed`` and block index).

        Drawn on the CPU so CPU and GPU runs agree. The native length's are the ``eval_perms`` buffer; other
        lengths (``dynamic_img_size``) are drawn once per seed and length, and must be drawn before tracing.
        """
        key = (self.shuffle_seed, seq_len)
        if key == getattr(self, '_native_perm_key', None):
            perms = self.eval_perms
        else:
            if key not in self._perm_cache:
                if torch.compiler.is_compiling():
                    raise RuntimeError(
                        f'the eval shuffle permutations for {seq_len} tokens are drawn with a torch.Generator, which '
                        f'cannot be traced: run the model once in eval mode on an input of this size before '
                        f'torch.export / torch.compile, or export at the native size '
                        f'{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]}')
                self._perm_cache[key] = self._draw_perms(*key)
            perms = self._perm_cache[key]
        return list(perms.to(device or perms.device).unbind(0))

    def _block_perms(self, tokens: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Each block's shuffle of the (B, L, D) ``tokens``: fresh ones in training (and eval_shuffle='random'),
        else the fixed ones."""
        n = len(self.blocks)
        if not self.blocks or not self.blocks[0].shuffle:
            return [None] * n
        if self.training or self.eval_shuffle == 'random':
            if torch.compiler.is_exporting():
                why = ('is in training mode: call model.eval()' if self.training else
                       "has eval_shuffle='random': set model.eval_shuffle = 'fixed'")
                raise RuntimeError(
                    f'cannot export this RSMamba: it draws a new token shuffle every forward because it {why}. '
                    f'The fixed eval permutations are constants of the exported graph.')
            perms = random_permutations(tokens, n)
            return [perms[i] for i in range(n)]
        if is_fx_symbolic_tracing():  # at the built size, whose fixed permutations are the buffer's rows
            return [self.eval_perms[i] for i in range(n)]
        return self.shuffle_permutations(tokens.shape[1], tokens.device)

    # ---- forward ------------------------------------------------------------------------------
    def _pos_embed(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, Gh, Gw, D) patch grid -> (B, L, D) sequence with class tokens and position embedding."""
        # FX traces symbolic shapes: it traces the model at the size it was built for
        gh, gw = self.patch_embed.grid_size if is_fx_symbolic_tracing() else patches.shape[1:3]
        D = self.embed_dim
        x = patches.flatten(1, 2)
        extra = self.cls_token.expand(patches.shape[0], -1, -1) if self.cls_token is not None else None
        x = insert_extra_tokens(x, extra, self.cls_token_position)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if (gh, gw) != self.patch_embed.grid_size:
                if not self.dynamic_img_size:
                    raise ValueError(
                        f'input gives a {gh}x{gw} token grid but the model was built for '
                        f'{self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]}; build it with the matching '
                        f'img_size or dynamic_img_size=True')
                pos = self._resampled_pos_embed((gh, gw))
            x = x + pos
        elif self.pos_embed_type == 'sine':
            table = self.sine_pos_embed if (gh, gw) == self.patch_embed.grid_size \
                else sincos_pos_embed_2d((gh, gw), D).to(x.device)
            zeros = table.new_zeros(1, self.num_prefix_tokens, D) if self.num_prefix_tokens else None
            x = x + insert_extra_tokens(table, zeros, self.cls_token_position).to(x.dtype)
        return self.pos_drop(x)

    def _resampled_pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """pos_embed resampled to ``grid``. Training (and any forward that needs its gradient) resamples every
        time; otherwise the result is cached per grid, keyed on the parameter's storage and version so an update
        in place (optimizer step, load_state_dict) or a move recomputes it; never while torch.compile or export
        trace, where a cached tensor would be baked into the graph."""
        pos = self.pos_embed
        cacheable = (not self.training and not (torch.is_grad_enabled() and pos.requires_grad)
                     and not torch.compiler.is_compiling())
        if not cacheable:
            return resample_pos_embed(pos, grid, self.patch_embed.grid_size, self.cls_token_position,
                                      self.num_prefix_tokens)
        key = (pos.data_ptr(), pos._version, pos.device, pos.dtype)
        hit = self._pos_cache.get(grid)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, resample_pos_embed(pos, grid, self.patch_embed.grid_size, self.cls_token_position,
                                               self.num_prefix_tokens))
            self._pos_cache[grid] = hit
        return hit[1]

    def _run_block(self, block, x, perm):
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(block, x, self.pre_norm, perm, use_reentrant=False)
        return block(x, self.pre_norm, perm)

    def _check_input(self, x: torch.Tensor):
        if is_fx_symbolic_tracing():
            return
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f'expected images (batch, {self.patch_embed.proj.in_channels}, H, W), got shape {tuple(x.shape)}; '
                f'set in_chans to the number of bands')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self._pos_embed(self.patch_embed(x))
        for block, perm in zip(self.blocks, self._block_perms(x)):
            x = self._run_block(block, x, perm)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        extra, patches = split_extra_tokens(x, self.cls_token_position, self.num_prefix_tokens)
        if self.global_pool == 'avg':
            return patches.mean(dim=1)
        if self.global_pool == 'token':
            return extra.mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs (patch tokens only) as NCHW maps or NLC sequences.

        Args:
            indices: last n blocks if int, all if None, these block indices if a sequence.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self._check_input(x)
        patches = self.patch_embed(x)
        B, gh, gw, _ = patches.shape
        x = self._pos_embed(patches)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, (block, perm) in enumerate(zip(blocks, self._block_perms(x))):
            x = self._run_block(block, x, perm)
            if i in take_indices:
                _, tokens = split_extra_tokens(self.norm(x) if norm else x, self.cls_token_position,
                                               self.num_prefix_tokens)
                if output_fmt == 'NCHW':
                    tokens = tokens.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices


def resample_pos_embed(
        pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int], cls_token_position: str,
        num_prefix_tokens: int, interpolation: str = 'bicubic', antialias: bool = True) -> torch.Tensor:
    """Resize the patch part of a (1, L, D) position embedding; class-token rows keep their places."""
    extra, patches = split_extra_tokens(pos_embed, cls_token_position, num_prefix_tokens)
    patches = resample_abs_pos_embed(
        patches, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias, verbose=False)
    return insert_extra_tokens(patches, extra, cls_token_position)


_MMPRETRAIN_RENAMES = (
    ('backbone.patch_embed.projection.', 'patch_embed.proj.'),
    ('backbone.pos_embed', 'pos_embed'),
    ('backbone.cls_token', 'cls_token'),
    ('backbone.pre_norm.', 'pre_norm.'),
    ('backbone.ln1.', 'norm.'),
    ('backbone.ln2.', 'fc_norm.'),
    ('head.fc.', 'head.'),
)


def convert_mmpretrain(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename an original mmpretrain ``ImageClassifier`` state dict to ours.

    Returns (converted, unmatched) where unmatched lists the original keys no rule knows.
    """
    out, unmatched = {}, []
    for key, value in state_dict.items():
        new_key = None
        parts = key.split('.')
        if key.startswith('backbone.layers.') and len(parts) > 3:
            new_key = f'blocks.{parts[2]}.mixer.' + '.'.join(parts[3:])
        elif key.startswith('backbone.gate_layers.') and parts[3:] == ['0', 'weight']:
            new_key = f'blocks.{parts[2]}.gate.weight'
        else:
            for old, new in _MMPRETRAIN_RENAMES:
                if key == old or (old.endswith('.') and key.startswith(old)):
                    new_key = new + key[len(old):]
                    break
        if new_key is None:
            unmatched.append(key)
        else:
            out[new_key] = value
    return out, unmatched


def _check_against_model(state_dict: Dict[str, torch.Tensor], model: RSMamba, shown: int = 6):
    """Name what an original checkpoint lacks or sizes differently from ``model`` (e.g. a base file for a large
    model), instead of leaving it to load_state_dict's message. The head, pos_embed and the patch conv's input
    channels are left to timm, which adapts them."""
    adapted = ('head.', 'pos_embed', 'patch_embed.proj.weight')
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(adapted)]
    wrong = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
             if k in state_dict and not k.startswith(adapted) and state_dict[k].shape != v.shape]
    problems = []
    for what, keys in (('missing from the checkpoint', missing), ('shaped differently (file vs model)', wrong)):
        if keys:
            more = f' and {len(keys) - shown} more' if len(keys) > shown else ''
            problems.append(f'{len(keys)} {what}: {", ".join(keys[:shown])}{more}')
    if problems:
        raise ValueError(
            'the original RSMamba checkpoint does not fit this model (another variant, depth or path type?): '
            + '; '.join(problems))


class InputBandsError(ValueError):
    """Weights for one number of input bands loaded into a model with another (other than 3 into N)."""


def check_input_bands(state_dict: Dict[str, torch.Tensor], model: RSMamba, source: str = 'the checkpoint'):
    """Allow a patch conv of the model's band count, or a 3-band (RGB) one, which timm's adapt_input_conv turns
    into N bands; anything else has no sensible mapping (which of 13 bands is which of 4?) and is an error."""
    weight = state_dict.get('patch_embed.proj.weight')
    want = model.patch_embed.proj.in_channels
    if weight is not None and weight.ndim == 4 and weight.shape[1] not in (want, 3):
        raise InputBandsError(
            f'{source} takes {weight.shape[1]}-band input (patch_embed.proj.weight {list(weight.shape)}) but the model '
            f'has {want} input band(s). Only 3-band (RGB) weights adapt to other band counts; build the model with '
            f'in_chans={weight.shape[1]} (--in-chans/--bands selecting {weight.shape[1]} bands), or start from '
            f'RGB weights or from scratch.')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RSMamba) -> Dict[str, torch.Tensor]:
    """Accept our checkpoints and the authors' mmpretrain ones; resample pos_embed to the model's grid; refuse
    a patch conv of another band count than the model's or RGB's (timm adapts RGB ones after this filter)."""
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict, unmatched = convert_mmpretrain(state_dict)
        if unmatched:
            raise KeyError(
                'these keys of the original RSMamba checkpoint have no counterpart in timm_rsmamba: '
                + ', '.join(sorted(unmatched)))
        _check_against_model(state_dict, model)
    check_input_bands(state_dict, model)
    pos = state_dict.get('pos_embed')
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        old_patches = pos.shape[1] - model.num_prefix_tokens
        side = int(round(math.sqrt(old_patches)))
        if side * side != old_patches:
            raise ValueError(f'cannot infer the token grid of a pos_embed with {old_patches} patch rows')
        state_dict = dict(state_dict)
        state_dict['pos_embed'] = resample_pos_embed(
            pos, model.patch_embed.grid_size, (side, side), model.cls_token_position, model.num_prefix_tokens)
    return state_dict


def _cfg(dataset: str = 'ucm', **kwargs):
    mean, std = normalization(dataset)
    info = DATASETS[dataset]
    return {
        'url': '',
        'num_classes': len(info['label_names']),
        'label_names': info['label_names'],
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 224 / 256,
        'crop_mode': 'center',
        'interpolation': 'bicubic',
        'fixed_input_size': False,  # dynamic_img_size=True: any size runs (timm reads the instance's own value)
        'mean': mean,
        'std': std,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2403.19654',
        'paper_name': 'RSMamba: Remote Sensing Image Classification with State Space Model',
        'origin_url': 'https://github.com/KyanChen/RSMamba',
        'notes': (f"Describes the authors' {info['title']} checkpoint (class order of their cls_names.txt). "
                  'No weights are hosted for this tag: convert the released .pth with '
                  '`python -m timm_rsmamba.convert` and pass pretrained_cfg_overlay=dict(file=...).',),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'rsmamba_small.ucm': _cfg('ucm'),
    **{f'rsmamba_{size}.{ds}': _cfg(ds) for size in ('base', 'large', 'huge') for ds in ('ucm', 'aid', 'nwpu')},
})

_VARIANTS = dict(
    small=dict(embed_dim=192, depth=16, intermediate_size=384),
    base=dict(embed_dim=192, depth=24, intermediate_size=384),
    large=dict(embed_dim=256, depth=36, intermediate_size=512),
    huge=dict(embed_dim=320, depth=48, intermediate_size=640),
)


def _has_weight_source(cfg) -> bool:
    return bool(cfg and (cfg.file or cfg.url or cfg.hf_hub_id or cfg.state_dict))


def _create_rsmamba(variant: str, pretrained: bool = False, **kwargs) -> RSMamba:
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not _has_weight_source(cfg):
            raise RuntimeError(
                f"no weights are hosted for '{variant}': convert the authors' checkpoint with "
                f"`python -m timm_rsmamba.convert ORIGINAL.pth --config hf_configs/<name>` and load the result with "
                f"timm.create_model('local-dir:DIR', pretrained=True), or pass "
                f"pretrained_cfg_overlay=dict(file='weights.safetensors')")
    out_indices = kwargs.pop('out_indices', 3)
    try:
        return build_model_with_cfg(
            RSMamba, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    except (pickle.UnpicklingError, RuntimeError) as err:  # timm loads with weights_only=True
        if not (isinstance(err, pickle.UnpicklingError) or 'weights_only' in str(err)):
            raise
        raise RuntimeError(
            f"the weights file holds pickled objects that timm's safe loader refuses (the authors' mmpretrain "
            f"checkpoints keep numpy/mmengine metadata). Convert it once: `python -m timm_rsmamba.convert FILE "
            f"--config hf_configs/<name> --out DIR`, then timm.create_model('local-dir:DIR', pretrained=True). "
            f"Loader said: {str(err).splitlines()[0]}") from err


def _variant(size: str, variant: str, pretrained: bool, kwargs) -> RSMamba:
    return _create_rsmamba(variant, pretrained=pretrained, **dict(_VARIANTS[size], **kwargs))


@register_model
def rsmamba_small(pretrained: bool = False, **kwargs) -> RSMamba:
    """RSMamba-S: 16 blocks, d 192 (in the authors' code, not the paper)."""
    return _variant('small', 'rsmamba_small', pretrained, kwargs)


@register_model
def rsmamba_base(pretrained: bool = False, **kwargs) -> RSMamba:
    """RSMamba-B: 24 blocks, d 192, 6.4M parameters."""
    return _variant('base', 'rsmamba_base', pretrained, kwargs)


@register_model
def rsmamba_large(pretrained: bool = False, **kwargs) -> RSMamba:
    """RSMamba-L: 36 blocks, d 256, 16.2M parameters."""
    return _variant('large', 'rsmamba_large', pretrained, kwargs)


@register_model
def rsmamba_huge(pretrained: bool = False, **kwargs) -> RSMamba:
    """RSMamba-H: 48 blocks, d 320, 33.1M parameters."""
    return _variant('huge', 'rsmamba_huge', pretrained, kwargs)
