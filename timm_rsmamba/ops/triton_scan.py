"""Selective scan (Mamba-1 / S6) in Triton: a sequential forward and a chunk-parallel backward.

Forward: one program per (sequence, block of BLOCK_D channels) walks the positions in order with the
(BLOCK_D, S) states in fp32 registers. softplus(delta + delta_bias), the D skip and the SiLU(z) gate are fused;
every input is read in its own dtype and strides (the mixer passes (batch, dim, length) views of time-major
tensors), the output is time-major in u's dtype. When gradients are wanted it also writes the state at the end
of every chunk of CHUNK positions but the last: (sequences, chunks - 1, S, dim) fp32 is all the scan saves
besides its inputs.

Backward: one program per (sequence, block of channels) visits the chunks last to first. For each state n it
re-computes the chunk's states from the saved chunk-start state with a parallel scan over the chunk's positions
(h_t = a_t h_{t-1} + b_t composes associatively), then runs the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} the same
way backwards, carrying g across chunks. Everything stays in registers: a (BLOCK_D, CHUNK) tile per quantity.
a_t h_{t-1} = h_t - delta_t u_t B_t supplies the previous state. dB and dC (sums over channels) go to fp32
buffers by atomic adds; dA, dD and d(delta_bias) (sums over sequences) are per-program partial sums.

Token orders: with ``z_order`` the gate z is read through an (L, paths) index (see triton_conv's docstring).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .token_orders import scatter_token_orders
from .triton_support import block_size, launches

# Positions per chunk (at most; shorter sequences use the power of two covering them): the backward's tile
# length and the spacing of the saved states. The backward holds a dozen (BLOCK_D, CHUNK) fp32 tiles; saved
# states cost (ceil(L / CHUNK) - 1) * S * dim * 4 bytes per sequence.
CHUNK = 128
FWD_BLOCK_D = 32  # channels per forward program: its (32, 16) states are 4 fp32 registers per thread (4 warps)
BWD_BLOCK_D = 16  # channels per backward program: 16 bf16 = one 32-byte sector per position
FWD_WARPS = 4
BWD_WARPS = 8
LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels may read no other globals


@triton.jit
def _softplus(x):
    """max(x, 0) + log1p(exp(-|x|)), log1p(w) = log(1 + w) w / ((1 + w) - 1) (exact to a few ulps, as F.softplus)."""
    w = tl.exp(-tl.abs(x))
    one_plus = 1.0 + w
    tiny = one_plus == 1.0
    return tl.maximum(x, 0.0) + tl.where(tiny, w, tl.log(one_plus) * (w / tl.where(tiny, 1.0, one_plus - 1.0)))


@triton.jit
def _affine_combine(a_first, b_first, a_next, b_next):
    """Compose h -> a h + b maps: first (a_first, b_first), then (a_next, b_next)."""
    return a_first * a_next, b_first * a_next + b_next


@triton.jit
def _column(tile, cols, j):
    """tile[:, j] for a runtime j (registers cannot be indexed; a masked sum over the columns)."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _delta_tile(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """softplus(delta + delta_bias) (or without softplus) on a (channels, positions) tile, zero where masked."""
    pre = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += bias[:, None]
    if SOFTPLUS:
        pre = _softplus(pre)
    return tl.where(mask, pre, 0.0)


@triton.jit
def _z_tile(z_ptr, order_ptr, src_seq, path, t0, pos, d, mask2, tmask, s_z_b, s_z_d, s_z_l, s_ord_l, s_ord_p,
            Z_ORDERED: tl.constexpr):
    """The gate z on a (channels, positions) tile starting at position t0, through the token order if Z_ORDERED."""
    rows = t0 + pos
    if Z_ORDERED:
        rows = tl.load(order_ptr + rows * s_ord_l + path * s_ord_p, mask=tmask, other=0).to(tl.int64)
    return tl.load(z_ptr + src_seq * s_z_b + d[:, None] * s_z_d + rows[None, :] * s_z_l, mask=mask2,
                   other=0.0).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, order_ptr, out_ptr, states_ptr, last_ptr,
        length, dim, state, source_batch,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_a_d, s_a_n, s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l, s_ord_l, s_ord_p, s_o_b, s_o_d, s_o_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        Z_ORDERED: tl.constexpr, SAVE_STATES: tl.constexpr, WANT_LAST: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    dmask, smask = d < dim, s < state
    mask2 = dmask[:, None] & smask[None, :]
    A2 = tl.load(A_ptr + d[:, None] * s_a_d + s[None, :] * s_a_n, mask=mask2, other=0.0).to(tl.float32) * LOG2E
    if HAS_D:
        D = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    path = seq // source_batch
    # pointers to position 0, advanced by one position per step (64-bit pointers: no 32-bit offset overflow)
    u_p = u_ptr + seq * s_u_b + d * s_u_d
    dt_p = delta_ptr + seq * s_dt_b + d * s_dt_d
    B_p = B_ptr + seq * s_B_b + s * s_B_n
    C_p = C_ptr + seq * s_C_b + s * s_C_n
    out_p = out_ptr + seq * s_o_b + d * s_o_d
    if HAS_Z:
        z_p = z_ptr + (seq % source_batch) * s_z_b + d * s_z_d
        ord_p = order_ptr + path * s_ord_p
    h = tl.zeros((BLOCK_D, BLOCK_S), tl.float32)
    n_chunks = tl.cdiv(length, CHUNK)
    for c in range(n_chunks):
        for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, length)):
            u = tl.load(u_p, mask=dmask, other=0.0).to(tl.float32)
            dt = tl.load(dt_p, mask=dmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            B = tl.load(B_p, mask=smask, other=0.0).to(tl.float32)
            C = tl.load(C_p, mask=smask, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * B[None, :]
            y = tl.sum(h * C[None, :], axis=1)
            if HAS_D:
                y += D * u
            if HAS_Z:
                if Z_ORDERED:
                    z = tl.load(z_p + tl.load(ord_p).to(tl.int64) * s_z_l, mask=dmask, other=0.0).to(tl.float32)
                    ord_p += s_ord_l
                else:
                    z = tl.load(z_p, mask=dmask, other=0.0).to(tl.float32)
                    z_p += s_z_l
                y = y * z * tl.sigmoid(z)
            tl.store(out_p, y.to(out_ptr.dtype.element_ty), mask=dmask)
            u_p += s_u_l
            dt_p += s_dt_l
            B_p += s_B_l
            C_p += s_C_l
            out_p += s_o_l
        if SAVE_STATES:
            if c < n_chunks - 1:
                tl.store(states_ptr + ((seq * (n_chunks - 1) + c) * state + s[None, :]) * dim + d[:, None], h,
                         mask=mask2)
    if WANT_LAST:
        tl.store(last_ptr + (seq * dim + d[:, None]) * state + s[None, :], h, mask=mask2)


@triton.jit
def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, order_ptr, states_ptr, dout_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        length, dim, state, source_batch,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_a_d, s_a_n, s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l,
        s_z_b, s_z_d, s_z_l, s_ord_l, s_ord_p, s_g_b, s_g_d, s_g_l, s_o_b, s_o_d, s_o_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        Z_ORDERED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Outputs: du, ddelta, dz time-major (L, sequences, dim), one layout (strides s_o_*); dB, dC (sequences, S, L)
    fp32, added to; per-program partial sums dA (sequences, dim, S), dD and dbias (sequences, dim), fp32."""
    seq = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    cols = tl.arange(0, BLOCK_S)
    pos = tl.arange(0, CHUNK)
    if HAS_D:
        D = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    path, src_seq = seq // source_batch, seq % source_batch
    n_chunks = tl.cdiv(length, CHUNK)
    last_start = (n_chunks - 1).to(tl.int64) * CHUNK
    g_carry = tl.zeros((BLOCK_D, BLOCK_S), tl.float32)  # dL/dh at the first position of the chunk after
    dA = tl.zeros((BLOCK_D, BLOCK_S), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    # (channel, position) offsets within a chunk, 32-bit; each tensor's chunk start is a 64-bit pointer
    u_off = d[:, None] * s_u_d + pos[None, :] * s_u_l
    dt_off = d[:, None] * s_dt_d + pos[None, :] * s_dt_l
    g_off = d[:, None] * s_g_d + pos[None, :] * s_g_l
    o_off = d[:, None] * s_o_d + pos[None, :] * s_o_l
    for back in range(n_chunks):
        c = n_chunks - 1 - back
        t0 = last_start - back * CHUNK
        tmask = pos < length - t0
        mask2 = dmask[:, None] & tmask[None, :]
        next_mask = dmask[:, None] & (pos < length - t0 - 1)[None, :]
        dt_chunk = delta_ptr + seq * s_dt_b + t0 * s_dt_l
        # softplus(delta + bias) here and at the next position (the adjoint's decay a_{t+1}; zero past the end)
        dt = _delta_tile(dt_chunk + dt_off, mask2, bias, HAS_BIAS, SOFTPLUS)
        dt_next = _delta_tile(dt_chunk + s_dt_l + dt_off, next_mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + seq * s_u_b + t0 * s_u_l + u_off, mask=mask2, other=0.0).to(tl.float32)
        dtu = dt * u
        dy = tl.load(dout_ptr + seq * s_g_b + t0 * s_g_l + g_off, mask=mask2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = _z_tile(z_ptr, order_ptr, src_seq, path, t0, pos, d, mask2, tmask, s_z_b, s_z_d, s_z_l, s_ord_l,
                        s_ord_p, Z_ORDERED)
            dy = dy * z * tl.sigmoid(z)
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        gB = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum_n g B: du = gB delta, ddelta has gB u
        gdA = tl.zeros((BLOCK_D, CHUNK), tl.float32)  # sum_n g a h_prev A: ddelta's decay term
        B_chunk = B_ptr + seq * s_B_b + t0 * s_B_l
        C_chunk = C_ptr + seq * s_C_b + t0 * s_C_l
        dBC_chunk = seq * state * length + t0
        for n in range(state):
            A = tl.load(A_ptr + d * s_a_d + n * s_a_n, mask=dmask, other=0.0).to(tl.float32)
            B = tl.load(B_chunk + n * s_B_n + pos * s_B_l, mask=tmask, other=0.0).to(tl.float32)
            C = tl.load(C_chunk + n * s_C_n + pos * s_C_l, mask=tmask, other=0.0).to(tl.float32)
            # the state entering the chunk: saved at the end of the one before (zero before the first)
            h0 = tl.load(states_ptr + ((seq * (n_chunks - 1) + c - 1) * state + n) * dim + d, mask=dmask & (c > 0),
                         other=0.0)
            bx = dtu * B[None, :]
            a_cum, b_cum = tl.associative_scan((tl.exp2(dt * (A * LOG2E)[:, None]), bx), 1, _affine_combine)
            h = b_cum + a_cum * h0[:, None]
            y += h * C[None, :]
            tl.atomic_add(dC_ptr + dBC_chunk + n * length + pos, tl.sum(dy * h, axis=0), mask=tmask)
            r_cum, g_loc = tl.associative_scan((tl.exp2(dt_next * (A * LOG2E)[:, None]), dy * C[None, :]), 1,
                                               _affine_combine, reverse=True)
            g = g_loc + r_cum * _column(g_carry, cols, n)[:, None]
            g_carry = tl.where(cols[None, :] == n, _column(g, pos, 0)[:, None], g_carry)
            tl.atomic_add(dB_ptr + dBC_chunk + n * length + pos, tl.sum(g * dtu, axis=0), mask=tmask)
            g_decay = g * (h - bx)  # g_t a_t h_{t-1}: the gradient of delta_t A
            dA = tl.where(cols[None, :] == n, dA + tl.sum(g_decay * dt, axis=1)[:, None], dA)
            gdA += g_decay * A[:, None]
            gB += g * B[None, :]
        # what the state loop did not need is loaded again rather than held in registers through it
        du = gB * dt
        u = tl.load(u_ptr + seq * s_u_b + t0 * s_u_l + u_off, mask=mask2, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + seq * s_g_b + t0 * s_g_l + g_off, mask=mask2, other=0.0).to(tl.float32)
        if HAS_D:
            y += D[:, None] * u
            du += dy * D[:, None]
            dD += tl.sum(dy * u, axis=1)
        ddelta = gdA + gB * u
        if SOFTPLUS:
            pre = tl.load(dt_chunk + dt_off, mask=mask2, other=0.0).to(tl.float32)
            if HAS_BIAS:
                pre += bias[:, None]
            ddelta = ddelta * tl.sigmoid(pre)
        ddelta = tl.where(mask2, ddelta, 0.0)
        dbias += tl.sum(ddelta, axis=1)
        tl.store(du_ptr + seq * s_o_b + t0 * s_o_l + o_off, du.to(du_ptr.dtype.element_ty), mask=mask2)
        tl.store(ddelta_ptr + seq * s_o_b + t0 * s_o_l + o_off, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask2)
        if HAS_Z:
            z = _z_tile(z_ptr, order_ptr, src_seq, path, t0, pos, d, mask2, tmask, s_z_b, s_z_d, s_z_l, s_ord_l,
                        s_ord_p, Z_ORDERED)
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + seq * s_o_b + t0 * s_o_l + o_off,
                     (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask2)
    smask = dmask[:, None] & (cols < state)[None, :]
    tl.store(dA_ptr + (seq * dim + d[:, None]) * state + cols[None, :], dA, mask=smask)
    if HAS_D:
        tl.store(dD_ptr + seq * dim + d, dD, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + seq * dim + d, dbias, mask=dmask)


INTERPRETED = not isinstance(_scan_fwd_kernel, triton.runtime.JITFunction)


def _block_sizes(dim: int, state: int):
    return block_size(dim, FWD_BLOCK_D), block_size(dim, BWD_BLOCK_D), block_size(state, 1 << 30)


def _z_args(z: Optional[torch.Tensor], order: Optional[torch.Tensor], u: torch.Tensor):
    """(z or a dummy, its strides, order or a dummy, its strides, sequences per token order)."""
    if z is None:
        return u, 0, 0, 0, u, 0, 0, u.shape[0]
    if order is None:
        return z, z.stride(0), z.stride(1), z.stride(2), u, 0, 0, u.shape[0]
    return z, z.stride(0), z.stride(1), z.stride(2), order, order.stride(0), order.stride(1), z.shape[0]


def chunk_length(length: int, chunk: int) -> int:
    """Positions per chunk: ``chunk`` (a power of two), or the smallest power of two covering a shorter sequence."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f'the scan chunk must be a power of two, got {chunk}')
    return block_size(length, chunk)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


@triton_op('rsmamba::triton_selective_scan_fwd', mutates_args=())
def selective_scan_fwd(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
        z_order: Optional[torch.Tensor], softplus: bool, save_states: bool, want_last: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, delta: (N, dim, L); A (dim, S); B, C (N, S, L); D, delta_bias (dim,); z (N, dim, L), or the source
    (N / paths, dim, L) of the token orders in z_order (L, paths). Any strides and dtypes.

    Returns the output time-major (L, N, dim) in u's dtype, the chunk-end states (N, chunks - 1, S, dim) fp32
    (chunks - 1 = 0 unless ``save_states``) and the last state (N, dim, S) fp32 (empty unless ``want_last``).
    """
    seqs, dim, length = u.shape
    state = A.shape[1]
    chunk = chunk_length(length, chunk)
    n_saved = max(triton.cdiv(length, chunk) - 1, 0) if save_states else 0
    out = torch.empty(length, seqs, dim, device=u.device, dtype=u.dtype)
    states = torch.empty(seqs, n_saved, state, dim, device=u.device, dtype=torch.float32)
    last = torch.zeros(seqs if want_last else 0, dim, state, device=u.device, dtype=torch.float32)
    if launches(u, INTERPRETED) and out.numel():
        block_d, _, block_s = _block_sizes(dim, state)
        z_t, s_z_b, s_z_d, s_z_l, order_t, s_ord_l, s_ord_p, source_batch = _z_args(z, z_order, u)
        wrap_triton(_scan_fwd_kernel)[(seqs, triton.cdiv(dim, block_d))](
            u, delta, A, B, C, D if D is not None else A, z_t, delta_bias if delta_bias is not None else A,
            order_t, out, states, last, length, dim, state, source_batch,
            *_strides(u, delta, A, B, C), s_z_b, s_z_d, s_z_l, s_ord_l, s_ord_p,
            out.stride(1), out.stride(2), out.stride(0),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            Z_ORDERED=z_order is not None, SAVE_STATES=n_saved > 0, WANT_LAST=want_last,
            CHUNK=chunk, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=FWD_WARPS)
    return out, states, last


@triton_op('rsmamba::triton_selective_scan_bwd', mutates_args=())
def selective_scan_bwd(
        dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
        z_order: Optional[torch.Tensor], states: torch.Tensor, softplus: bool, chunk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Gradients from dout (L, N, dim) (any strides) and the forward's chunk-end states.

    Returns du, ddelta, dz time-major (L, N, dim) in the inputs' dtypes (dz per token order, empty without z),
    dA (dim, S), dB, dC (N, S, L), dD, d(delta_bias) (dim,) in fp32 (empty when the input is None).
    """
    seqs, dim, length = u.shape
    state = A.shape[1]
    chunk = chunk_length(length, chunk)
    if states.shape[1] != max(triton.cdiv(length, chunk) - 1, 0):
        raise RuntimeError(f'selective_scan_bwd: {states.shape[1]} chunk states for {length} positions in chunks of '
                           f'{chunk}; the forward must run with save_states=True (and the same chunk)')
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(length, seqs, dim, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(length, seqs, dim, device=u.device, dtype=delta.dtype)
    dz = torch.empty(length if z is not None else 0, seqs, dim, device=u.device,
                     dtype=z.dtype if z is not None else u.dtype)
    dB, dC = torch.zeros(seqs, state, length, **f32), torch.zeros(seqs, state, length, **f32)
    dA_part = torch.zeros(seqs, dim, state, **f32)
    dD_part = torch.zeros(seqs, dim if D is not None else 0, **f32)
    dbias_part = torch.zeros(seqs, dim if delta_bias is not None else 0, **f32)
    if launches(u, INTERPRETED) and du.numel():
        _, block_d, block_s = _block_sizes(dim, state)
        z_t, s_z_b, s_z_d, s_z_l, order_t, s_ord_l, s_ord_p, source_batch = _z_args(z, z_order, u)
        wrap_triton(_scan_bwd_kernel)[(seqs, triton.cdiv(dim, block_d))](
            u, delta, A, B, C, D if D is not None else A, z_t, delta_bias if delta_bias is not None else A,
            order_t, states, dout, du, ddelta, dz if z is not None else du, dA_part, dB, dC,
            dD_part if D is not None else dA_part, dbias_part if delta_bias is not None else dA_part,
            length, dim, state, source_batch,
            *_strides(u, delta, A, B, C), s_z_b, s_z_d, s_z_l, s_ord_l, s_ord_p,
            dout.stride(1), dout.stride(2), dout.stride(0), du.stride(1), du.stride(2), du.stride(0),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            Z_ORDERED=z_order is not None, CHUNK=chunk, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=BWD_WARPS)
    return du, ddelta, dz, dA_part.sum(0), dB, dC, dD_part.sum(0), dbias_part.sum(0)


def _setup_scan(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, z_order, softplus, save_states, want_last, chunk = inputs
    _, states, last = output
    ctx.mark_non_differentiable(states, last)
    ctx.set_materialize_grads(False)  # no zeros the size of the saved states for the backward to ignore
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, z_order, states)
    ctx.softplus, ctx.chunk = softplus, chunk


def _scan_backward(ctx, dout, _dstates, _dlast):
    u, delta, A, B, C, D, z, delta_bias, z_order, states = ctx.saved_tensors
    du, ddelta, dz, dA, dB, dC, dD, dbias = selective_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, z_order, states, ctx.softplus, ctx.chunk)
    if z is not None and z_order is not None:
        dz = scatter_token_orders(dz, z_order)
    channel_major = lambda t: t.permute(1, 2, 0)  # noqa: E731
    return (channel_major(du), channel_major(ddelta), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None, channel_major(dz) if z is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None,
            None, None, None, None, None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_scan)


def selective_scan_triton(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        chunk_len: Optional[int] = None, z_order: Optional[torch.Tensor] = None):
    """``mamba_ssm.selective_scan_fn``'s signature on the Triton kernels; the output is a (batch, dim, length)
    view of a time-major tensor. ``z_order``: read z through an (L, paths) token-order index (z is then the
    (batch / paths, dim, L) source). States are saved only when autograd will need them."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    out, _, last = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, z_order, delta_softplus, needs_grad,
                                      return_last_state, chunk_len or CHUNK)
    out = out.permute(1, 2, 0)
    return (out, last) if return_last_state else out
