"""The Mamba mixer between its projections on the Triton kernels, as one autograd function that saves little.

conv1d + SiLU -> x_proj -> dt_proj -> selective scan, as `MambaMixer.mix` computes it, but autograd keeps only
the input xz and the scan's chunk-boundary states. The backward re-computes the conv output, x_proj's output
and delta (a memory-bound kernel and two thin matmuls: dim -> dt_rank + 2 S and dt_rank -> dim) instead of
keeping three (L, N, dim) activations per block; the expensive part, the scan, is never run twice.

With ``order`` (L, paths), xz holds each token once (L, B, 2E): the conv reads x and the scan reads z through the
order index, so the (L, paths * B, 2E) gathered copy of the multi-path block never exists.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_scan
from .token_orders import scatter_token_orders
from .triton_conv import causal_conv1d_bwd, causal_conv1d_fwd
from .triton_scan import selective_scan_bwd, selective_scan_fwd


def _channel_major(t):
    return t.permute(1, 2, 0)


def _sources(xz, dim):
    """x and z halves of time-major xz (L, B, 2E) as (B, E, L) views."""
    return _channel_major(xz[..., :dim]), _channel_major(xz[..., dim:])


def _projections(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_rank):
    """Conv output xc (L, N, E), its projection split into dt (L, N, R), B, C (L, N, S), and delta (L, N, E),
    all in xz's dtype (as autocast runs the mixer's linears: xz is in_proj's output)."""
    dtype = xz.dtype
    x_src, _ = _sources(xz, conv_w.shape[0])
    xc = causal_conv1d_fwd(x_src, conv_w, conv_b, order, True)
    state = (x_proj_w.shape[0] - dt_rank) // 2
    dt, B, C = F.linear(xc, x_proj_w.to(dtype)).split([dt_rank, state, state], dim=-1)
    return xc, dt, B, C, F.linear(dt, dt_proj_w.to(dtype))


def _mix_forward(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank, chunk, save_states):
    """The mix's output y (L, N, E) and the scan's chunk-end states (saved only if ``save_states``)."""
    with torch.autocast(xz.device.type, enabled=False):  # dtypes as stated, in forward and re-computation
        xc, _, B, C, delta = _projections(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_rank)
        y, states, _ = selective_scan_fwd(
            _channel_major(xc), _channel_major(delta), -torch.exp(A_log.float()), _channel_major(B),
            _channel_major(C), D.float(), _sources(xz, conv_w.shape[0])[1], dt_bias.float(), order, True,
            save_states, False, chunk)
    return y, states


class _TritonMix(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank, chunk):
        y, states = _mix_forward(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank, chunk,
                                 any(ctx.needs_input_grad))
        ctx.save_for_backward(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, states)
        ctx.dt_rank, ctx.chunk = dt_rank, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, states = ctx.saved_tensors
        dim, dtype = conv_w.shape[0], xz.dtype
        x_src, z_src = _sources(xz, dim)
        with torch.autocast(xz.device.type, enabled=False):
            xc, dt, B, C, delta = _projections(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, ctx.dt_rank)
            A = -torch.exp(A_log.float())
            du, ddelta, dz, dA, dB, dC, dD, dbias = selective_scan_bwd(
                dy, _channel_major(xc), _channel_major(delta), A, _channel_major(B), _channel_major(C), D.float(),
                z_src, dt_bias.float(), order, states, True, ctx.chunk)
            del delta
            d_dt = F.linear(ddelta, dt_proj_w.to(dtype).t())
            d_dt_proj_w = ddelta.flatten(0, 1).t() @ dt.flatten(0, 1)
            del ddelta
            d_xdbl = torch.cat([d_dt, dB.permute(2, 0, 1).to(dtype), dC.permute(2, 0, 1).to(dtype)], dim=-1)
            dxc = du.add_(F.linear(d_xdbl, x_proj_w.to(dtype).t()))
            d_x_proj_w = d_xdbl.flatten(0, 1).t() @ xc.flatten(0, 1)
            del xc, d_xdbl
            dx, dconv_w, dconv_b = causal_conv1d_bwd(dxc, x_src, conv_w, conv_b, order, True)
        if order is not None:
            dx, dz = scatter_token_orders(dx, order), scatter_token_orders(dz, order)
        return (torch.cat([dx, dz], dim=-1), None, dconv_w.to(conv_w.dtype),
                dconv_b.to(conv_b.dtype) if conv_b is not None else None, d_x_proj_w.to(x_proj_w.dtype),
                d_dt_proj_w.to(dt_proj_w.dtype), dbias.to(dt_bias.dtype), (dA * A).to(A_log.dtype), dD.to(D.dtype),
                None, None)


class _WeighedPaths(torch.autograd.Function):
    """y * weights, y = the mix of (xz, order, params), keeping weights and the mix's inputs (which the mix keeps
    anyway) but not y: the weights' gradient sum(dout * y) re-runs the mix's forward instead."""

    @staticmethod
    def forward(ctx, y, weights, xz, order, params, dt_rank, chunk):
        ctx.save_for_backward(weights, xz, order, *params)
        ctx.dt_rank, ctx.chunk = dt_rank, chunk
        return y * weights

    @staticmethod
    def backward(ctx, dout):
        weights, xz, order, *params = ctx.saved_tensors
        y = _mix_forward(xz, order, *params, ctx.dt_rank, ctx.chunk, False)[0].view(dout.shape)
        return ((dout * weights).to(y.dtype), (dout * y).sum_to_size(weights.shape).to(weights.dtype),
                None, None, None, None, None)


def mamba_mix_triton(xz: torch.Tensor, order: Optional[torch.Tensor], conv_w: torch.Tensor,
                     conv_b: Optional[torch.Tensor], x_proj_w: torch.Tensor, dt_proj_w: torch.Tensor,
                     dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, dt_rank: int,
                     chunk: Optional[int] = None) -> torch.Tensor:
    """xz (L, B, 2E) time-major -> y (L, N, E) time-major, N = B, or paths * B with ``order`` (L, paths), in
    xz's dtype. conv_w (E, K); x_proj_w (dt_rank + 2 S, E); dt_proj_w (E, dt_rank); A_log (E, S); D (E,)."""
    return _TritonMix.apply(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank,
                            chunk or triton_scan.CHUNK)


def weigh_paths_triton(y: torch.Tensor, weights: torch.Tensor, xz: torch.Tensor, order: Optional[torch.Tensor],
                       conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank: int,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """``y * weights`` for y = mamba_mix_triton(xz, order, ...) viewed (L, paths, B, E), without autograd keeping
    y (one (L, N, E) activation per block): backward re-computes it from the mix's inputs."""
    params = (conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D)
    return _WeighedPaths.apply(y, weights, xz, order, params, dt_rank, chunk or triton_scan.CHUNK)
