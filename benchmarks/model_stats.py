#!/usr/bin/env python3
"""RSMamba variants table: parameters, tokens and GFLOPs per image, measured rather than quoted.

Dense FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmul, linear and convolution,
2 FLOPs per multiply-add; norms, activations and other elementwise ops are not counted, as for every
timm model). FlopCounterMode cannot see the selective scan (it is elementwise work in a loop, or a
fused kernel), so the model is run with the scan swapped for a no-recurrence 'identity' backend and
the scan is counted analytically from the shapes each call receives, following the spec's recurrence
for every element of (3B, E, L, S):

    dt*A (mul), exp, decay*h (mul), (dt*x)*B (mul), + (add), h*C (mul) and the sum over S (add) = 7

plus 4 per element of (3B, E, L): dt*x, D*x, the + of the skip, the y*silu(z) gate (softplus and
silu, like every activation, are not counted). The depthwise causal conv (kernel K) runs as
elementwise multiply-adds in the pure-PyTorch backend, so it is counted here too: 2K per (3B, E, L).

    python benchmarks/model_stats.py [--img-size 224] [--num-classes 21] [--peers]
"""
import argparse
import sys
import types

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_rsmamba  # noqa: F401  (registers the rsmamba_* models)
from timm_rsmamba.ops.scan import (
    DELTA_PROJECTING_SCANS, ORDER_READING_SCANS, ORDER_WRITING_SCANS, SCAN_BACKENDS, SUMMING_SCANS)

VARIANTS = ('rsmamba_small', 'rsmamba_base', 'rsmamba_large', 'rsmamba_huge')
PEERS = ('deit_tiny_patch16_224', 'deit_small_patch16_224', 'resnet50')
SCAN_FLOPS_PER_STATE = 7
SCAN_FLOPS_PER_CHANNEL = 4

_scan_elements = {'bel': 0, 'bels': 0}  # (3B*E*L) and (3B*E*L*S) seen by identity_scan while counting


def identity_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False, z_order=None, out_order=None, delta_proj_weight=None,
                  return_out_sum=False):
    """A scan backend that returns ``u`` unchanged: the whole selective-scan op (recurrence, D skip and
    SiLU(z) gate) replaced by the identity, the strictest floor for what the scan costs. It takes z's token
    orders (``z_order``) as the C++ scan does, so the floor pays no gathered copy of z either. It takes
    ``out_order`` and ignores it: the C++ scan puts its output back in token order as it writes it, so the floor
    pays no gather for that either. Registered as 'identity', it gets delta projected by dt_proj's weight
    first, as every scan but the C++ one does; as 'identity_no_dt_proj' it gets the low-rank dt and the weight
    (``delta_proj_weight``) instead, as the C++ scan does, and projects nothing: a floor without dt_proj's
    matrix product either, which the C++ scan now does inside its tiles. That one also hands the multi-path
    gate zeros for the output's sums over the positions (``return_out_sum``), which the C++ scan sums as it
    writes its output, where 'identity' leaves them to `selective_scan`'s torch sum: a floor without the
    gate's means either.

    With autograd on, a zero-weighted mean of every other input is added so the backward pass still
    reaches x_proj, dt_proj, A_log, D and the z half of in_proj. Also tallies the scan's element counts
    for the analytic FLOP count.
    """
    batch, dim, length = u.shape
    _scan_elements['bel'] += batch * dim * length
    _scan_elements['bels'] += batch * dim * length * A.shape[1]
    y = u
    if torch.is_grad_enabled():
        touched = [t for t in (delta, A, B, C, D, z, delta_bias, delta_proj_weight) if t is not None]
        y = u + (sum(t.float().mean() for t in touched) * 0).to(u.dtype)
    result = (y, u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)) if return_last_state else (y,)
    if return_out_sum:
        result += (u.new_zeros(batch, dim),)
    return result if len(result) > 1 else y


def original_fallback_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """The published code's CPU path, restated: transformers' MambaMixer slow path.

    It builds the whole (B, E, L, S) discretised decay exp(delta*A) and drive delta*B*u up front, then
    walks the 784 positions one at a time with a batched mat-vec against C. Same math as every backend;
    kept only as the baseline the spec names ("seconds per image, tens of GB to train").
    """
    delta = delta.float() + (0 if delta_bias is None else delta_bias.float()[:, None])
    delta = F.softplus(delta) if delta_softplus else delta
    decay = torch.exp(delta[..., None] * A.float()[None, :, None, :])  # (B, E, L, S)
    drive = (delta * u.float())[..., None] * B.float().transpose(1, 2)[:, None]  # (B, E, L, S)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.matmul(h, C[:, :, t, None].float())[..., 0])
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def original_block_forward(block, x, pre_norm, perm=None):
    """The published block, restated: every token order goes through the pre-norm and the whole mixer,
    projections included, before the orders are merged. timm_rsmamba's MultiPathBlock projects in and out
    once for all orders (the same math, fewer FLOPs); the `original` row runs this instead."""
    orders = [x]
    if block.reverse:
        orders.append(x.flip(1))
    if block.shuffle:
        orders.append(x[:, perm])
    mixed = block.mixer(pre_norm(torch.cat(orders, dim=0))).chunk(block.num_paths, dim=0)
    outs = [mixed[0]]
    if block.reverse:
        outs.append(mixed[1].flip(1))
    if block.shuffle:
        outs.append(mixed[-1][:, torch.argsort(perm)])
    if block.gate is not None:
        weights = block.gate(torch.cat([o.mean(dim=1) for o in outs], dim=-1)).softmax(dim=-1)
        out = sum(weights[:, i, None, None] * o for i, o in enumerate(outs))
    else:
        out = sum(outs) / block.num_paths
    return x + block.drop_path(out)


def use_original_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Run every block of an RSMamba model as the published code does (`original_block_forward`)."""
    for block in model.blocks:
        block.forward = types.MethodType(original_block_forward, block)
    return model


def register_benchmark_scans():
    """Make scan_backend='identity' (no recurrence) and 'original_fallback' (the published code's slow
    path) available to timm.create_model('rsmamba_*', scan_backend=...)."""
    for name in ('identity', 'identity_no_dt_proj'):
        SCAN_BACKENDS[name] = identity_scan
        ORDER_READING_SCANS.add(name)
        ORDER_WRITING_SCANS.add(name)
    DELTA_PROJECTING_SCANS.add('identity_no_dt_proj')
    SUMMING_SCANS.add('identity_no_dt_proj')
    SCAN_BACKENDS['original_fallback'] = original_fallback_scan


def is_rsmamba(name: str) -> bool:
    return name.startswith('rsmamba')


def count_flops(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> dict:
    """GFLOPs of one image through ``model`` (eval mode, CPU): dense, scan, conv and total.

    An RSMamba model must have been built with scan_backend='identity' and conv_backend='cpu_kernel' (a C++
    call FlopCounterMode does not see, with nothing to torch.compile under the counter), so that it counts only
    the dense ops and the scan/conv are counted analytically.
    """
    model = model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size)
    _scan_elements.update(bel=0, bels=0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    dense = counter.get_total_flops()
    scan = conv = 0
    if hasattr(model, 'blocks') and hasattr(model.blocks[0], 'mixer'):
        if model.blocks[0].mixer.scan_backend != 'identity':
            raise ValueError('count_flops needs the RSMamba model built with scan_backend="identity"')
        kernel = model.blocks[0].mixer.conv1d.kernel_size[0]
        scan = SCAN_FLOPS_PER_STATE * _scan_elements['bels'] + SCAN_FLOPS_PER_CHANNEL * _scan_elements['bel']
        conv = 2 * kernel * _scan_elements['bel']
    return dict(dense=dense / 1e9, scan=scan / 1e9, conv=conv / 1e9, total=(dense + scan + conv) / 1e9)


def flop_model(name: str, img_size: int, num_classes: int = 21, original_blocks: bool = False,
               **kwargs) -> torch.nn.Module:
    """The model as count_flops wants it (identity scan for RSMamba; img_size for ViTs); ``original_blocks``:
    the published code's per-order projections (`use_original_blocks`)."""
    if is_rsmamba(name):
        register_benchmark_scans()
        kwargs.update(scan_backend='identity', conv_backend='cpu_kernel')
    if is_rsmamba(name) or name.startswith(('deit', 'vit')):
        kwargs['img_size'] = img_size
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    return use_original_blocks(model) if original_blocks else model


def gflops_per_image(name: str, img_size: int, num_classes: int = 21, original_blocks: bool = False,
                     **kwargs) -> dict:
    return count_flops(flop_model(name, img_size, num_classes, original_blocks, **kwargs), img_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=21)
    parser.add_argument('--models', nargs='+', default=list(VARIANTS))
    parser.add_argument('--peers', action='store_true', help=f'also list {", ".join(PEERS)}')
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    names = list(args.models) + (list(PEERS) if args.peers else [])
    print(f'torch {torch.__version__}, timm {timm.__version__}; {args.img_size} px, {args.num_classes} classes; '
          'GFLOPs = 1e9 FLOPs, 2 per multiply-add')
    print()
    print('| model | depth | d | E | S | params | tokens | dense GFLOPs | scan GFLOPs | conv GFLOPs | '
          'total GFLOPs/img |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for name in names:
        model = flop_model(name, args.img_size, args.num_classes)
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, args.img_size)
        if is_rsmamba(name):
            mixer = model.blocks[0].mixer
            shape = (len(model.blocks), model.embed_dim, mixer.intermediate_size, mixer.state_size)
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        else:
            shape = ('-',) * 4
            tokens = getattr(getattr(model, 'patch_embed', None), 'num_patches', '-')
        cells = [name, *shape, f'{params:,}', tokens, f"{flops['dense']:.2f}", f"{flops['scan']:.2f}",
                 f"{flops['conv']:.3f}", f"{flops['total']:.2f}"]
        print('| ' + ' | '.join(str(c) for c in cells) + ' |')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
