"""Causal depthwise conv1d (+ SiLU) in Triton: the forward, and a backward that re-computes the pre-activation.

Each op is a ``torch.library.triton_op`` (its body doubles as the fake implementation, torch.compile sees the
kernels) with its autograd formula registered. Tensors are read in their own dtype and strides and the
arithmetic is fp32: the input is a (batch, dim, length) view of a time-major (length, batch, dim) tensor, as
the mixer passes it, and the output is time-major and contiguous, in the input's dtype (bf16 under autocast).

Token orders: with ``order`` (an (L, paths) index, every column a permutation), sequence ``p * B + b`` at
position ``l`` reads row ``order[l, p]`` of source sequence ``b``, so the multi-path block's token orders need
no gathered copy; the input gradient is summed back over the paths (`token_orders.scatter_token_orders`).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .token_orders import scatter_token_orders
from .triton_support import block_size, launches

# Tiles of the conv kernels: positions x channels (channels are contiguous in the time-major layout). The
# backward re-computes K pre-activations per output from K^2 shifted loads: 16 positions keep it in registers
# (sm_90, 4 warps: 158 registers; 32 positions spill).
BLOCK_L = 32
BWD_BLOCK_L = 16
BLOCK_D = 64


@triton.jit
def _rows(order_ptr, t, mask, path, s_ord_l, s_ord_p, ORDERED: tl.constexpr):
    """Source rows of positions ``t``: through the order index of ``path``, or the positions themselves."""
    rows = t
    if ORDERED:
        rows = tl.load(order_ptr + t * s_ord_l + path * s_ord_p, mask=mask, other=0).to(tl.int64)
    return rows


@triton.jit
def _pre_activation(x_ptr, w_ptr, order_ptr, bias, t, d, dmask, length, path, s_x_l, s_x_d, s_w_d, s_w_k,
                    s_ord_l, s_ord_p, KERNEL: tl.constexpr, ORDERED: tl.constexpr):
    """bias + sum_k w[:, k] x[t - (K-1) + k] on a (positions, channels) tile, fp32; zero padding before t = 0."""
    acc = tl.zeros((t.shape[0], d.shape[0]), tl.float32) + bias[None, :]
    for k in tl.static_range(KERNEL):
        src = t - (KERNEL - 1 - k)
        valid = (src >= 0) & (src < length)
        rows = _rows(order_ptr, src, valid, path, s_ord_l, s_ord_p, ORDERED)
        x = tl.load(x_ptr + rows[:, None] * s_x_l + d[None, :] * s_x_d, mask=valid[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d * s_w_d + k * s_w_k, mask=dmask, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, order_ptr, out_ptr, length, dim, source_batch,
                     s_x_b, s_x_d, s_x_l, s_w_d, s_w_k, s_ord_l, s_ord_p, s_o_b, s_o_d, s_o_l,
                     KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ORDERED: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = d < dim
    path, src_seq = seq // source_batch, seq % source_batch
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    pre = _pre_activation(x_ptr + src_seq * s_x_b, w_ptr, order_ptr, bias, t, d, dmask, length, path, s_x_l,
                          s_x_d, s_w_d, s_w_k, s_ord_l, s_ord_p, KERNEL, ORDERED)
    out = pre
    if SILU:
        out = pre * tl.sigmoid(pre)
    tl.store(out_ptr + seq * s_o_b + t[:, None] * s_o_l + d[None, :] * s_o_d, out.to(out_ptr.dtype.element_ty),
             mask=(t < length)[:, None] & dmask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, order_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, length, dim, source_batch,
                     s_x_b, s_x_d, s_x_l, s_w_d, s_w_k, s_ord_l, s_ord_p, s_g_b, s_g_d, s_g_l, s_dx_b, s_dx_d, s_dx_l,
                     KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ORDERED: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (sequence, block of channels), walking the positions tile by tile.

    dx[t] = sum_j w[:, K-1-j] dpre[t + j], with dpre = dout * silu'(pre) and pre re-computed at the shifted
    positions; the weight and bias gradients are summed in registers and written once per program
    (partial sums over sequences, dw_ptr: (sequences, K, dim), db_ptr: (sequences, dim)).
    """
    seq = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = d < dim
    path, src_seq = seq // source_batch, seq % source_batch
    x_seq = x_ptr + src_seq * s_x_b
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    taps = tl.arange(0, BLOCK_K)
    dw = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    db = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, length, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L).to(tl.int64)
        dx = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
        for j in tl.static_range(KERNEL):
            s = t + j
            smask = (s < length)[:, None] & dmask[None, :]
            g = tl.load(dout_ptr + seq * s_g_b + s[:, None] * s_g_l + d[None, :] * s_g_d, mask=smask,
                        other=0.0).to(tl.float32)
            if SILU:
                pre = _pre_activation(x_seq, w_ptr, order_ptr, bias, s, d, dmask, length, path, s_x_l, s_x_d,
                                      s_w_d, s_w_k, s_ord_l, s_ord_p, KERNEL, ORDERED)
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            w = tl.load(w_ptr + d * s_w_d + (KERNEL - 1 - j) * s_w_k, mask=dmask, other=0.0).to(tl.float32)
            dx += g * w[None, :]
            if j == 0:  # the taps' gradients: dpre[t] times the inputs it saw
                db += tl.sum(g, axis=0)
                for k in tl.static_range(KERNEL):
                    src = t - (KERNEL - 1 - k)
                    valid = (src >= 0) & (src < length)
                    rows = _rows(order_ptr, src, valid, path, s_ord_l, s_ord_p, ORDERED)
                    x = tl.load(x_seq + rows[:, None] * s_x_l + d[None, :] * s_x_d,
                                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    dw = tl.where(taps[:, None] == k, dw + tl.sum(g * x, axis=0)[None, :], dw)
        tl.store(dx_ptr + seq * s_dx_b + t[:, None] * s_dx_l + d[None, :] * s_dx_d, dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < length)[:, None] & dmask[None, :])
    tl.store(dw_ptr + (seq * KERNEL + taps[:, None]) * dim + d[None, :], dw,
             mask=(taps < KERNEL)[:, None] & dmask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + seq * dim + d, db, mask=dmask)


INTERPRETED = not isinstance(_conv_fwd_kernel, triton.runtime.JITFunction)
# Triton decides at each function's decoration: its own library (tl.sigmoid, ...) when triton is imported, ours
# when this module is. Interpreted kernels need an interpreted library: TRITON_INTERPRET=1 before triton's import.
LIBRARY_INTERPRETED = not isinstance(tl.sigmoid, triton.runtime.JITFunction)


def _order_args(order: Optional[torch.Tensor], x: torch.Tensor):
    """(order tensor or a dummy, its two strides, sequences, sequences per path) for the kernels."""
    if order is None:
        return x, 0, 0, x.shape[0], x.shape[0]
    return order, order.stride(0), order.stride(1), order.shape[1] * x.shape[0], x.shape[0]


@triton_op('rsmamba::triton_causal_conv1d_fwd', mutates_args=())
def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      order: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    """x: (B, dim, L) with any strides; weight (dim, K); order (L, paths) or None.

    Returns the time-major output (L, paths * B or B, dim), contiguous, in x's dtype.
    """
    source_batch, dim, length = x.shape
    order_t, s_ord_l, s_ord_p, seqs, _ = _order_args(order, x)
    out = torch.empty(length, seqs, dim, device=x.device, dtype=x.dtype)
    if launches(x, INTERPRETED) and out.numel():
        block_d = block_size(dim, BLOCK_D)
        grid = (seqs, triton.cdiv(length, BLOCK_L), triton.cdiv(dim, block_d))
        wrap_triton(_conv_fwd_kernel)[grid](
            x, weight, bias if bias is not None else weight, order_t, out, length, dim, source_batch,
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_ord_l, s_ord_p,
            out.stride(1), out.stride(2), out.stride(0),
            KERNEL=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, ORDERED=order is not None,
            BLOCK_L=BLOCK_L, BLOCK_D=block_d)
    return out


@triton_op('rsmamba::triton_causal_conv1d_bwd', mutates_args=())
def causal_conv1d_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      order: Optional[torch.Tensor], silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout: (L, sequences, dim), any strides. Returns dx time-major (L, sequences, dim) in x's dtype (per token
    order when ``order`` is given), dweight (dim, K) and dbias (dim,) in fp32 (empty when bias is None)."""
    source_batch, dim, length = x.shape
    kernel = weight.shape[1]
    order_t, s_ord_l, s_ord_p, seqs, _ = _order_args(order, x)
    dx = torch.empty(length, seqs, dim, device=x.device, dtype=x.dtype)
    dw_part = torch.zeros(seqs, kernel, dim, device=x.device, dtype=torch.float32)
    db_part = torch.zeros(seqs, dim if bias is not None else 0, device=x.device, dtype=torch.float32)
    if launches(x, INTERPRETED) and dx.numel():
        block_d = block_size(dim, BLOCK_D)
        wrap_triton(_conv_bwd_kernel)[(seqs, triton.cdiv(dim, block_d))](
            x, weight, bias if bias is not None else weight, order_t, dout, dx, dw_part, db_part, length, dim,
            source_batch, x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_ord_l,
            s_ord_p, dout.stride(1), dout.stride(2), dout.stride(0), dx.stride(1), dx.stride(2), dx.stride(0),
            KERNEL=kernel, HAS_BIAS=bias is not None, SILU=silu, ORDERED=order is not None,
            BLOCK_L=BWD_BLOCK_L, BLOCK_D=block_d, BLOCK_K=block_size(kernel, 1 << 30))
    return dx, dw_part.sum(0).t(), db_part.sum(0)


def _setup_conv(ctx, inputs, output):
    x, weight, bias, order, silu = inputs
    ctx.save_for_backward(x, weight, bias, order)
    ctx.silu = silu


def _conv_backward(ctx, dout):
    x, weight, bias, order = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_bwd(dout, x, weight, bias, order, ctx.silu)
    if order is not None:
        dx = scatter_token_orders(dx, order)
    dx = dx.permute(1, 2, 0)
    return (dx if ctx.needs_input_grad[0] else None, dweight.to(weight.dtype),
            dbias.to(bias.dtype) if bias is not None else None, None, None)


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_setup_conv)


def causal_conv1d_triton(x, weight, bias=None, activation=None, order: Optional[torch.Tensor] = None):
    """x: (batch, dim, length) -> (batch or paths * batch, dim, length), a view of a time-major result."""
    if activation not in (None, 'silu', 'swish'):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return causal_conv1d_fwd(x, weight, bias, order, activation is not None).permute(1, 2, 0)
