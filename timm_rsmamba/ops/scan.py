"""Selective scan (Mamba-1 / S6) behind one call, with interchangeable backends.

Shapes follow `mamba_ssm.selective_scan_fn` so the fused kernel drops in unchanged:
``u, delta, z: (batch, dim, length)``, ``A: (dim, state)``, ``B, C: (batch, state, length)``,
``D, delta_bias: (dim,)``. The recurrence per channel ``d`` and state ``n`` is::

    delta = softplus(delta + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t = <h_t, C_t> + D * u_t ;  out = y * silu(z)

Backends:
* ``triton``: Triton kernels (ops/triton_scan.py), the default on CUDA: a sequential forward with the states
  in registers, a chunk-parallel backward from chunk-boundary states; nothing to build ahead.
* ``mamba_ssm``: the fused CUDA kernel (optional ``[cuda]`` extra, CUDA tensors only).
* ``cpu_kernel``: the default on CPU. Forward and backward are hand-written C++ (csrc/mamba_cpu.cpp, built
  on first use in seconds, no torch.compile): one pass over the sequence per block of channels, states in
  vector registers; the backward re-computes states chunk by chunk like ``compiled``'s. Custom ops
  (``torch.ops.rsmamba.cpu_selective_scan_fwd/bwd``), so torch.compile traces through them. ``compiled`` runs
  where the kernels cannot be built (``chunked`` if there is no C++ compiler at all).
* ``compiled``: pure PyTorch, the default on CUDA without the extra. The sequence is cut
  into chunks of 8 positions; each chunk's forward and backward is a plain loop over positions that
  torch.compile (inductor) turns into generated kernels: no Python and no dispatcher per position. The
  forward unrolls the state too, so it is a single loop nest with each channel's states in registers.
  Its autograd backward re-computes the states chunk by chunk from saved chunk-boundary states, so
  training keeps O(batch * length * dim) activations instead of O(batch * length * dim * state).
  Small problems, states larger than 16, and machines where compiling fails run ``chunked`` instead.
* ``chunked``: eager, no compiler needed, vectorised across chunks: each op covers one position of every
  chunk at once, about 3 sqrt(length) ops per scan instead of a dozen per position. Made for devices where
  each op launch costs (MPS, XPU); on CPU its full-size temporaries make it slower than ``compiled``.
* ``reference``: a plain sequential loop, the independent yardstick for tests and benchmarks.
* ``loop``: the same recurrence as one step body run by torch's ``scan`` operator; what ``auto`` picks under
  torch.export, so exported graphs (and ONNX files) hold plain ops and an ONNX ``Scan``.

The multi-path block's token orders (``z_order``, ops/token_orders.py): ``cpu_kernel`` and ``triton`` read the
gate's z through the index; the other backends get a gathered copy. ``out_order`` puts every sequence's output
back in token order: ``cpu_kernel`` as it writes it, the others by a gather after.
"""
import contextlib
import math
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from . import triton_support
from .compiled import CompiledKernels
from .cpu_kernel import CPU_KERNELS, cpu_kernels_available, selective_scan_fwd
from .fused_cuda import fused_selective_scan, mamba_ssm_fn
from .token_orders import gather_channel_major, restore_channel_major

BACKEND_ENV_VAR = 'RSMAMBA_SCAN_BACKEND'

# Positions per chunk of the compiled scan: one forward and one backward kernel call per chunk. Backward
# re-computes and holds the chunk's (chunk, batch, dim, state) states; at 8 positions they stay in cache
# (16 made backward 1.7x slower on a 2-core EPYC) and autograd keeps one state per 8 positions.
DEFAULT_CHUNK_LEN = 8
# The compiled forward unrolls the state dimension, one vector register per state; larger states run `chunked`.
MAX_COMPILED_STATE = 16
# inductor fuses at most 64 nodes into one kernel by default; the unrolled forward chunk has a few hundred,
# and cut into pieces it stores and re-reads every state between them. (Backward is faster with the default.)
_FORWARD_COMPILE_OPTIONS = {'max_fusion_size': 4096}
# Positions per chunk of the C++ backward: it re-computes a chunk's states and decays into a buffer (16 states
# x 16 positions x 64 bytes, twice) and autograd keeps one state per chunk. 16 is as fast as 8 and halves those
# states (29 MB instead of 58 per rsmamba_base block at batch 8, under glibc's pinned mmap threshold).
CPU_CHUNK_LEN = 16
# Below this many state elements (batch * dim * state * length) compiling costs more than it saves.
MIN_COMPILE_ELEMENTS = 2 ** 22
# States the eager chunked backward keeps at once (elements, fp32: 128 MiB, twice: states and decays).
PARALLEL_STATE_BUDGET = 2 ** 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 stays fp64 so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def _delta_pre(delta_raw, delta_bias):
    return delta_raw if delta_bias is None else delta_raw + delta_bias


def _softplus(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(w) = log(1 + w) w / ((1 + w) - 1) (Goldberg).

    Within a few ulps of the exact value like F.softplus, but built from exp and log: on CPU the vectorised
    log1p behind F.softplus costs ten times a log, and it was half the time of a compiled scan chunk.
    """
    w = torch.exp(-x.abs())
    one_plus = 1 + w
    exact = one_plus == 1  # there the branch not taken would be 0/0, and its gradient a NaN through the where
    return x.clamp(min=0) + torch.where(exact, w, torch.log(one_plus) * (w / torch.where(exact, 1, one_plus - 1)))


def _positive_delta(delta_raw, delta_bias, softplus):
    delta = _delta_pre(delta_raw, delta_bias)
    return _softplus(delta) if softplus else delta


def selective_scan_reference(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """Plain sequential scan, one position at a time: slow, obvious, used to check the others."""
    ct = _compute_dtype(u.dtype)
    u_c, A_c, B_c, C_c = (t.to(ct) for t in (u, A, B, C))
    delta_c = delta.to(ct) if delta_bias is None else delta.to(ct) + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    batch, dim, length = u.shape
    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta_c[:, :, t, None] * A_c)
        h = decay * h + (delta_c[:, :, t] * u_c[:, :, t])[:, :, None] * B_c[:, None, :, t]
        ys.append((h * C_c[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


def _scan_operator():
    try:
        from torch._higher_order_ops.scan import scan
    except ImportError:  # torch before 2.6
        return None
    return scan


def selective_scan_loop(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The sequential scan as one step function looped over positions by torch's ``scan`` operator.

    What ``auto`` runs under torch.export: the exported graph holds one step body instead of a Python loop
    unrolled over every position (or a custom op), and the ONNX exporter turns it into an ONNX ``Scan``, which
    onnxruntime runs. Eager calls work too (torch compiles the step on first use).
    """
    scan = _scan_operator()
    if scan is None:
        raise RuntimeError(f"scan backend 'loop' needs torch >= 2.6 (torch._higher_order_ops.scan); "
                           f"this is torch {torch.__version__}")
    ct = _compute_dtype(u.dtype)
    A_c = A.to(ct)
    D_c = None if D is None else D.to(ct)
    bias = None if delta_bias is None else delta_bias.to(ct)

    def time_major(t):
        return t.permute(2, 0, 1).to(ct)

    def step(h, xs):
        u_t, delta_t, B_t, C_t, *z_t = xs  # z_t: [] without a gate (the operator takes tensors only)
        delta_t = _delta_pre(delta_t, bias)
        if delta_softplus:
            delta_t = F.softplus(delta_t)
        _, h = _state_step(h, delta_t, u_t, A_c, B_t)
        y = _readout(h, C_t, u_t, D_c)
        return h, y * F.silu(z_t[0]) if z_t else y

    # no autocast region unless one is active: torch.export cannot serialise the region's markers
    fp32_region = torch.autocast(u.device.type, enabled=False) if torch.is_autocast_enabled(u.device.type) \
        else contextlib.nullcontext()
    with fp32_region:
        h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=ct)
        xs = [time_major(t) for t in (u, delta, B, C, z) if t is not None]
        last, ys = scan(step, h0, xs)
        out = ys.permute(1, 2, 0).to(u.dtype)
    return (out, last) if return_last_state else out


def _state_step(h, delta, u_t, A, B_t):
    """One position of the recurrence: decay = exp(delta A), h' = decay h + delta u B. Returns (decay, h').

    Any leading dims: h (..., d, n); delta, u_t (..., d); B_t (..., n).
    """
    decay = torch.exp(delta[..., None] * A)
    return decay, decay * h + (delta * u_t)[..., None] * B_t.unsqueeze(-2)


def _readout(h, C_t, u_t, D):
    """y = <h, C> + D u, before the SiLU(z) gate."""
    y = (h * C_t.unsqueeze(-2)).sum(-1)
    return y if D is None else y + D * u_t


def _sum_leading(t, keep: int):
    """Sum over every dim but the last ``keep`` (batch and chunk dims of a parameter's gradient)."""
    return t.sum(tuple(range(t.dim() - keep))) if t.dim() > keep else t


def _chunk_forward(h, u, delta_raw, z, A, B, C, D, delta_bias, softplus: bool):
    """One chunk of T positions, time-major: u, delta_raw, z (T, ..., d); B, C (T, ..., n); h (..., d, n).

    Returns the chunk's output (T, ..., d) and its last state. The eager ``chunked`` backend runs it on every
    chunk at once (the leading dims then hold chunk and batch); the compiled backend uses
    `_chunk_forward_by_state`, the same steps in a layout the compiler keeps in registers.
    """
    ys = []
    for t in range(u.shape[0]):
        delta = _positive_delta(delta_raw[t], delta_bias, softplus)
        _, h = _state_step(h, delta, u[t], A, B[t])
        y = _readout(h, C[t], u[t], D)
        ys.append(y if z is None else y * F.silu(z[t]))
    return torch.stack(ys), h


def _chunk_forward_by_state(h, u, delta_raw, z, A_t, B, C, D, delta_bias, softplus: bool):
    """`_chunk_forward` for torch.compile: the state dimension unrolled and the state kept state-major.

    h (n, batch, d) and A_t (n, d); the rest as in `_chunk_forward`. Every op is then elementwise over
    (batch, d), so inductor emits one loop nest over (batch, d) that holds a channel's n states in vector
    registers for the whole chunk. With the state as the last dim, each position's readout is a reduction
    that inductor puts in a loop of its own, storing and re-reading every state: 1.8x slower.
    Returns the chunk's output (T, batch, d) and its last state (n, batch, d).
    """
    hs = list(h.unbind(0))
    ys = []
    for t in range(u.shape[0]):
        delta = _positive_delta(delta_raw[t], delta_bias, softplus)
        drive = delta * u[t]
        y = None
        for i in range(len(hs)):
            hs[i] = torch.exp(delta * A_t[i]) * hs[i] + drive * B[t, :, i, None]
            y = hs[i] * C[t, :, i, None] if y is None else y + hs[i] * C[t, :, i, None]
        y = y if D is None else y + D * u[t]
        ys.append(y if z is None else y * F.silu(z[t]))
    return torch.stack(ys), torch.stack(hs)


def _recompute_states(h0, u, delta_raw, A, B, delta_bias, softplus: bool):
    """The chunk's deltas, decays and states h_0..h_T (h0 first), kept for the adjoint pass."""
    deltas, decays, hs = [], [], [h0]
    for t in range(u.shape[0]):
        delta = _positive_delta(delta_raw[t], delta_bias, softplus)
        decay, h = _state_step(hs[-1], delta, u[t], A, B[t])
        hs.append(h)
        deltas.append(delta)
        decays.append(decay)
    return deltas, decays, hs


def _output_grads(dout, hs, u, z, C, D):
    """Through out = y * silu(z): dL/dy (T, ..., d) and dL/dz (or None)."""
    if z is None:
        return dout, None
    y = torch.stack([_readout(hs[t + 1], C[t], u[t], D) for t in range(u.shape[0])])
    sig = torch.sigmoid(z)
    return dout * z * sig, dout * y * sig * (1 + z * (1 - sig))


def _adjoint_pass(deltas, decays, hs, dy, u, delta_raw, A, B, C, D, delta_bias, softplus: bool, carry):
    """Reverse pass over a chunk: g_t = dy_t C_t + decay_{t+1} g_{t+1}, with g_t = dL/dh_t.

    ``carry`` = decay_{T} g_{T}: the state gradient flowing back from the following positions.
    Returns du, ddelta_raw (T, ..., d); dB, dC (T, ..., n); dA (d, n); dD (d,) or None; the carry for the
    positions before the chunk.
    """
    n = u.shape[0]
    du, ddelta_raw, dB, dC = ([None] * n for _ in range(4))
    dA = torch.zeros_like(A)
    dD = torch.zeros_like(D) if D is not None else None
    for t in reversed(range(n)):
        h_prev, h, delta, decay = hs[t], hs[t + 1], deltas[t], decays[t]
        if D is not None:
            dD = dD + _sum_leading(dy[t] * u[t], 1)
        dC[t] = (dy[t][..., None] * h).sum(-2)
        g = dy[t][..., None] * C[t].unsqueeze(-2) + carry
        gd = g * h_prev * decay  # dL/d(delta_t A)
        dA = dA + _sum_leading(delta[..., None] * gd, 2)
        g_b = (g * B[t].unsqueeze(-2)).sum(-1)
        dB[t] = (g * (delta * u[t])[..., None]).sum(-2)
        ddelta = (gd * A).sum(-1) + g_b * u[t]
        du[t] = g_b * delta if D is None else g_b * delta + dy[t] * D
        if softplus:
            ddelta = ddelta * torch.sigmoid(_delta_pre(delta_raw[t], delta_bias))
        ddelta_raw[t] = ddelta
        carry = decay * g
    stack = torch.stack
    return stack(du), stack(ddelta_raw), stack(dB), stack(dC), dA, dD, carry


def _chunk_backward(h0, u, delta_raw, z, A, B, C, D, delta_bias, softplus: bool, dout, carry):
    """Gradients of one chunk, its states re-computed from the chunk's start state h0.

    ``carry``: the state gradient from the following chunk (zeros for the last), see `_adjoint_pass`.
    Returns du, ddelta_raw, dz (or None), dB, dC, dA, dD, carry.
    """
    deltas, decays, hs = _recompute_states(h0, u, delta_raw, A, B, delta_bias, softplus)
    dy, dz = _output_grads(dout, hs, u, z, C, D)
    du, ddelta_raw, dB, dC, dA, dD, carry = _adjoint_pass(
        deltas, decays, hs, dy, u, delta_raw, A, B, C, D, delta_bias, softplus, carry)
    return du, ddelta_raw, dz, dB, dC, dA, dD, carry


# Each chunk's forward and backward, one generated kernel per call.
_CHUNK_KERNELS = CompiledKernels("scan backend 'compiled'", options={'forward': _FORWARD_COMPILE_OPTIONS},
                                 forward=_chunk_forward_by_state, backward=_chunk_backward)


def _chunk_slices(length: int, chunk_len: int):
    """The positions of each chunk, the last one possibly shorter."""
    return [slice(t0, min(t0 + chunk_len, length)) for t0 in range(0, length, chunk_len)]


class _ChunkedScan(torch.autograd.Function):
    """The whole selective scan on time-major tensors, chunk by chunk of positions.

    Inputs: u, delta_raw, z (L, b, d) (any strides); A (d, n); B, C (L, b, n); D, delta_bias (d,) or None.
    Forward: one chunk kernel call per chunk. Autograd keeps only the inputs plus the state at each chunk start
    (state-major, (n, b, d)), not the (L, b, d, n) states: backward re-computes each chunk's states from its
    start state. ``compiled``: whether the chunk kernels run compiled (else eagerly: problems too small to
    repay compiling).
    """

    @staticmethod
    def forward(ctx, u, delta_raw, A, B, C, D, z, delta_bias, softplus, chunk_len, compiled):
        length, batch, dim = u.shape
        states = [u.new_zeros(A.shape[1], batch, dim)]
        outs = []
        A_t = A.t().contiguous()
        for sl in _chunk_slices(length, chunk_len):
            y, h = _CHUNK_KERNELS('forward', states[-1], u[sl], delta_raw[sl], _slice(z, sl), A_t, B[sl], C[sl],
                                  D, delta_bias, softplus, compiled=compiled)
            outs.append(y)
            states.append(h)
        out, last, chunk_starts = torch.cat(outs), states[-1], states[:-1]
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, *chunk_starts)  # no copy into one tensor
        ctx.softplus, ctx.chunk_len, ctx.compiled = softplus, chunk_len, compiled
        last = last.permute(1, 2, 0).contiguous()
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta_raw, A, B, C, D, z, delta_bias, *chunk_starts = ctx.saved_tensors
        length = u.shape[0]
        du, ddelta_raw = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dz = torch.empty_like(u) if z is not None else None
        dA = torch.zeros_like(A)
        dD = torch.zeros_like(D) if D is not None else None
        carry = u.new_zeros(u.shape[1], u.shape[2], A.shape[1])
        for sl, start in zip(reversed(_chunk_slices(length, ctx.chunk_len)), reversed(chunk_starts)):
            h0 = start.permute(1, 2, 0).contiguous()  # strided, it slows the whole kernel 2x
            du[sl], ddelta_raw[sl], dz_c, dB[sl], dC[sl], dA_c, dD_c, carry = _CHUNK_KERNELS(
                'backward', h0, u[sl], delta_raw[sl], _slice(z, sl), A, B[sl], C[sl], D,
                delta_bias, ctx.softplus, dout[sl].contiguous(), carry, compiled=ctx.compiled)
            dA += dA_c
            if dz is not None:
                dz[sl] = dz_c
            if dD is not None:
                dD += dD_c
        d_bias = ddelta_raw.sum((0, 1)) if delta_bias is not None else None
        return du, ddelta_raw, dA, dB, dC, dD, dz, d_bias, None, None, None


def _parallel_chunk_len(length: int) -> int:
    """About sqrt(length): the loops over positions within a chunk and the one across chunks balance."""
    return max(1, math.isqrt(length - 1) + 1) if length > 1 else 1


def _to_chunks(t, chunk_len: int):
    """(L, ...) -> (T, n_chunks, ...), zero-padded at the end: position j of every chunk is ``[j]``."""
    if t is None:
        return None
    pad = -t.shape[0] % chunk_len
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.unflatten(0, (-1, chunk_len)).transpose(0, 1)


def _from_chunks(t, length: int):
    return t.transpose(0, 1).flatten(0, 1)[:length]


class _ParallelChunkScan(torch.autograd.Function):
    """The eager scan, vectorised across chunks: every op covers one position of all chunks at once.

    Forward: (1) each chunk's end state from a zero start, all chunks together (T steps); (2) a short
    recurrence across chunks, start_{k+1} = exp(A sum(delta_k)) start_k + end_k (L/T steps); (3) the
    outputs, re-running the chunks from their true start states (T steps). With T ~ sqrt(L) that is about
    3 sqrt(L) vectorised steps instead of L single-position ones: the point on devices where each op
    launch costs (MPS, XPU, GPUs without a compiler).
    Backward re-computes states group by group of chunks (bounded by ``state_budget`` elements), first a
    local adjoint pass for the carries across the group's chunks, then the full adjoint pass.
    Padded positions have u = B = C = 0 and zero output gradient, so they change nothing before them.
    """

    @staticmethod
    def forward(ctx, u, delta_raw, A, B, C, D, z, delta_bias, softplus, chunk_len, state_budget, want_last):
        length = u.shape[0]
        cu, cdr, cB, cC, cz = (_to_chunks(t, chunk_len) for t in (u, delta_raw, B, C, z))
        delta = _positive_delta(cdr, delta_bias, softplus)
        h = u.new_zeros(*cu.shape[1:], A.shape[1])
        for t in range(chunk_len):
            _, h = _state_step(h, delta[t], cu[t], A, cB[t])
        # padding's decays never reach a real position: the padded chunk is the last one
        chunk_decay = torch.exp(delta.sum(0)[..., None] * A)
        starts = torch.empty_like(h)
        state = torch.zeros_like(h[0])
        for k in range(h.shape[0]):
            starts[k] = state
            state = chunk_decay[k] * state + h[k]
        out, _ = _chunk_forward(starts, cu, cdr, cz, A, cB, cC, D, delta_bias, softplus)
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, starts)
        ctx.softplus, ctx.chunk_len, ctx.state_budget = softplus, chunk_len, state_budget
        if not want_last:
            return _from_chunks(out, length), None
        last = _last_real_state(starts[-1], cu, cdr, A, cB, delta_bias, softplus, length)
        ctx.mark_non_differentiable(last)
        return _from_chunks(out, length), last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta_raw, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        length, chunk_len, softplus = u.shape[0], ctx.chunk_len, ctx.softplus
        cu, cdr, cB, cC, cz, cdout = (_to_chunks(t, chunk_len) for t in (u, delta_raw, B, C, z, dout))
        chunk_decay = torch.exp(_positive_delta(cdr, delta_bias, softplus).sum(0)[..., None] * A)
        n_chunks = starts.shape[0]
        du, ddelta_raw, dB, dC = (torch.empty_like(t) for t in (cu, cu, cB, cC))
        dz = torch.empty_like(cu) if z is not None else None
        dA = torch.zeros_like(A)
        dD = torch.zeros_like(D) if D is not None else None
        carry = torch.zeros_like(starts[0])
        group = max(1, ctx.state_budget // (chunk_len * starts[0].numel()))
        for k0 in reversed(range(0, n_chunks, group)):
            ks = slice(k0, min(k0 + group, n_chunks))
            g_u, g_dr, g_B, g_C, g_z, g_dout = (None if t is None else t[:, ks] for t in (cu, cdr, cB, cC, cz, cdout))
            deltas, decays, hs = _recompute_states(starts[ks], g_u, g_dr, A, g_B, delta_bias, softplus)
            dy, dz_g = _output_grads(g_dout, hs, g_u, g_z, g_C, D)
            # each chunk's carry: a local adjoint pass (zero carry in), then back across the group's chunks
            local = torch.zeros_like(hs[0])
            for t in reversed(range(chunk_len)):
                local = decays[t] * (local + dy[t][..., None] * g_C[t].unsqueeze(-2))
            carries = torch.empty_like(local)
            for k in reversed(range(local.shape[0])):
                carries[k] = carry
                carry = local[k] + chunk_decay[k0 + k] * carry
            du[:, ks], ddelta_raw[:, ks], dB[:, ks], dC[:, ks], dA_g, dD_g, _ = _adjoint_pass(
                deltas, decays, hs, dy, g_u, g_dr, A, g_B, g_C, D, delta_bias, softplus, carries)
            dA += dA_g
            if dz is not None:
                dz[:, ks] = dz_g
            if dD is not None:
                dD += dD_g
        ddelta_raw = _from_chunks(ddelta_raw, length)
        d_bias = ddelta_raw.sum((0, 1)) if delta_bias is not None else None
        return (_from_chunks(du, length), ddelta_raw, dA, _from_chunks(dB, length), _from_chunks(dC, length), dD,
                None if dz is None else _from_chunks(dz, length), d_bias, None, None, None, None)


def _last_real_state(start, cu, cdr, A, cB, delta_bias, softplus, length):
    """The state after position L-1: the last chunk run up to its last real position."""
    h = start
    for t in range((length - 1) % cu.shape[0] + 1):
        _, h = _state_step(h, _positive_delta(cdr[t, -1], delta_bias, softplus), cu[t, -1], A, cB[t, -1])
    return h


def _slice(t, sl):
    return None if t is None else t[sl]


def _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_len,
                  compiled: bool):
    """Layout and precision around the two chunked scans: chunk by chunk (`_ChunkedScan`, compiled kernels),
    or all chunks at once, eagerly (`_ParallelChunkScan`)."""
    ct = _compute_dtype(u.dtype)
    batch, dim, length = u.shape
    state = A.shape[1]

    def time_major(t):
        return None if t is None else t.permute(2, 0, 1).to(ct)

    def vector(t):
        return None if t is None else t.to(ct).contiguous()

    with torch.autocast(u.device.type, enabled=False):
        if length == 0:
            out, last = u.new_zeros(0, batch, dim, dtype=ct), u.new_zeros(batch, dim, state, dtype=ct)
        else:
            args = (time_major(u), time_major(delta), A.to(ct).contiguous(), time_major(B), time_major(C),
                    vector(D), time_major(z), vector(delta_bias), delta_softplus)
            if compiled:
                out, last = _ChunkedScan.apply(*args, min(chunk_len or DEFAULT_CHUNK_LEN, length), compiled)
            else:
                chunk = min(chunk_len or _parallel_chunk_len(length), length)
                out, last = _ParallelChunkScan.apply(*args, chunk, PARALLEL_STATE_BUDGET, return_last_state)
        out = out.to(u.dtype).permute(1, 2, 0)
    return (out, last) if return_last_state else out


def selective_scan_chunked(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        chunk_len: Optional[int] = None):
    """Pure-PyTorch scan for every device, eager and vectorised across chunks (`_ParallelChunkScan`).

    ``chunk_len`` defaults to about sqrt(length). Works time-major inside: callers that hold
    (length, batch, dim) tensors and pass ``.permute(1, 2, 0)`` views (as the mixer does) pay no layout
    copies, and the result is such a view too.
    """
    return _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_len, False)


def selective_scan_compiled(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        chunk_len: Optional[int] = None, min_compile_elements: Optional[int] = None):
    """The chunked scan with each chunk's forward and backward fused by torch.compile.

    One generated kernel per chunk instead of a dozen eager ops per position: on a 2-core CPU rsmamba_base
    evaluates 4.7x faster than with ``chunked`` (run J in benchmarks/RESULTS.md).
    Problems smaller than ``min_compile_elements`` state elements (default MIN_COMPILE_ELEMENTS), states
    larger than MAX_COMPILED_STATE, and machines where compiling fails run the eager ``chunked`` scan instead.
    """
    compiled = _compiles(u, A, min_compile_elements)
    return _chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_len, compiled)


def _compiles(u, A, min_compile_elements: Optional[int]) -> bool:
    """Whether the chunk kernels run compiled: inductor works here, the problem repays compiling, and the
    state is small enough to unroll."""
    threshold = MIN_COMPILE_ELEMENTS if min_compile_elements is None else min_compile_elements
    return _CHUNK_KERNELS.usable and u.numel() * A.shape[1] >= threshold and A.shape[1] <= MAX_COMPILED_STATE


def selective_scan_cpu_kernel(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        chunk_len: Optional[int] = None, z_order: Optional[torch.Tensor] = None,
        out_order: Optional[torch.Tensor] = None, delta_proj_weight: Optional[torch.Tensor] = None,
        return_out_sum: bool = False):
    """The C++ scan (csrc/mamba_cpu.cpp), forward and backward, as the custom op ``rsmamba::cpu_selective_scan_fwd``.

    One pass over the sequence with the states in vector registers and inlined exp/log; the backward
    re-computes each chunk of ``chunk_len`` positions (default CPU_CHUNK_LEN) from the state the forward saved
    at its start. CPU tensors; fp32 (fp16/bf16 are computed in fp32) and fp64. Where the kernels cannot be
    built this runs `selective_scan_compiled`, or `selective_scan_chunked` if there is no C++ compiler (which
    torch.compile would need too). ``z_order``: read z through an (L, paths) token-order index (z is then the
    (batch / paths, dim, L) source), with no gathered copy; ``out_order``: write the output back in token order
    through one (see `selective_scan`), with no gather after. ``delta_proj_weight``: delta is the low-rank dt,
    projected inside the kernel (see `selective_scan`). ``return_out_sum``: the kernel's sums of out over the
    positions come last in the result (see `selective_scan`).
    """
    if u.device.type != 'cpu':
        raise RuntimeError(f"scan backend 'cpu_kernel' runs on CPU tensors only, got {u.device.type}; "
                           f"use 'auto', 'compiled' or 'mamba_ssm' on this device")
    if not cpu_kernels_available():
        fallback = selective_scan_compiled if CPU_KERNELS.compiler_found else selective_scan_chunked
        if z is not None and z_order is not None:
            z = gather_channel_major(z, z_order)
        if delta_proj_weight is not None:
            delta = project_delta(delta, delta_proj_weight)
        result = fallback(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_len)
        result = _restored(result, out_order, return_last_state)
        return _with_out_sum(result, return_last_state) if return_out_sum else result
    ct = _compute_dtype(u.dtype)

    def time_major(t):
        return None if t is None else t.permute(2, 0, 1).to(ct)

    def vector(t):
        return None if t is None else t.to(ct)

    with torch.autocast('cpu', enabled=False):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj_weight))
        out, _, last, out_sum = selective_scan_fwd(
            time_major(u), time_major(delta), A.to(ct), time_major(B), time_major(C), vector(D), time_major(z),
            vector(delta_bias), delta_softplus, chunk_len or CPU_CHUNK_LEN, needs_grad,
            z_order if z is not None else None, out_order, vector(delta_proj_weight))
        result = (out.to(u.dtype).permute(1, 2, 0),)
        if return_last_state:
            result += (last.permute(1, 2, 0).contiguous(),)
        if return_out_sum:
            result += (out_sum.to(u.dtype),)
    return result if len(result) > 1 else result[0]


def project_delta(dt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """delta (batch, dim, L) = weight (dim, rank) times the low-rank dt (batch, rank, L), one matrix product on
    the time-major view (a channel-major view of its time-major result, as the model's layers make them)."""
    return F.linear(dt.permute(2, 0, 1), weight).permute(1, 2, 0)


def _restored(result, out_order: Optional[torch.Tensor], with_last_state: bool):
    """A backend's result with its output put back in token order through ``out_order`` (if given)."""
    if out_order is None:
        return result
    if with_last_state:
        return restore_channel_major(result[0], out_order), result[1]
    return restore_channel_major(result, out_order)


def _with_out_sum(result, with_last_state: bool):
    """A backend's result with its output's sum over the positions (batch, dim) appended."""
    parts = result if with_last_state else (result,)
    return (*parts, parts[0].sum(-1))


def selective_scan_mamba_ssm(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The fused CUDA kernel from the optional ``mamba-ssm`` package (a custom op under torch.compile)."""
    if mamba_ssm_fn() is not None and not u.is_cuda:
        raise RuntimeError("scan backend 'mamba_ssm' runs on CUDA tensors only; "
                           "use 'auto', 'cpu_kernel' or 'compiled' on this device")
    return fused_selective_scan(u, delta, A.float(), B, C, D=None if D is None else D.float(), z=z,
                                delta_bias=None if delta_bias is None else delta_bias.float(),
                                delta_softplus=delta_softplus, return_last_state=return_last_state)


def selective_scan_triton(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        z_order: Optional[torch.Tensor] = None):
    """The Triton kernels (ops/triton_scan.py): CUDA tensors, or CPU ones under TRITON_INTERPRET=1 (tests)."""
    triton_support.require('scan', u.device, _RUNNABLE.get(u.device.type, "'auto', 'chunked', 'reference'"))
    from . import triton_scan  # on first use: see triton_support
    return triton_scan.selective_scan_triton(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, z_order=z_order)


SCAN_BACKENDS: Dict[str, Callable] = {
    'triton': selective_scan_triton,
    'cpu_kernel': selective_scan_cpu_kernel,
    'compiled': selective_scan_compiled,
    'chunked': selective_scan_chunked,
    'reference': selective_scan_reference,
    'loop': selective_scan_loop,
    'mamba_ssm': selective_scan_mamba_ssm,
}
# The backends that take ``z_order`` and read z through it; the others get a gathered copy of z.
ORDER_READING_SCANS = {'triton', 'cpu_kernel'}
# The backends that take ``out_order`` and write through it; the others' outputs are restored after.
ORDER_WRITING_SCANS = {'cpu_kernel'}
# The backends that take ``delta_proj_weight`` and project delta themselves; the others get it projected.
DELTA_PROJECTING_SCANS = {'cpu_kernel'}
# The backends that take ``return_out_sum`` and sum their output as they write it; the others' is summed after.
# (Each also writes through ``out_order``: the sum comes after the output, which needs no restoring then.)
SUMMING_SCANS = {'cpu_kernel'}
# What the error of a backend that cannot run on a device suggests instead.
_RUNNABLE = {'cpu': "'auto', 'cpu_kernel', 'compiled', 'chunked', 'reference'",
             'cuda': "'auto', 'mamba_ssm' (the [cuda] extra), 'compiled', 'chunked', 'reference'"}


def has_mamba_ssm() -> bool:
    return mamba_ssm_fn() is not None


def resolve_scan_backend(name: Optional[str], device: Optional[torch.device] = None) -> str:
    """Backend actually used: explicit name > $RSMAMBA_SCAN_BACKEND > automatic choice."""
    name = name or os.environ.get(BACKEND_ENV_VAR) or 'auto'
    if name == 'auto':
        if torch.compiler.is_exporting():
            return 'loop'  # a graph of plain ops that any runtime (onnxruntime, ...) can run
        kind = torch.device(device).type if device is not None else 'cpu'
        if kind == 'cuda':  # triton_support.CUDA_AUTO_BACKENDS holds the order
            return triton_support.cuda_auto_choice('scan', {'mamba_ssm': has_mamba_ssm, 'compiled': lambda: True})
        if kind == 'cpu':
            return 'cpu_kernel'
        return 'chunked'  # inductor's MPS/XPU support is patchy
    if name not in SCAN_BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {name!r} (from the scan_backend argument or ${BACKEND_ENV_VAR}); "
            f"choose one of: auto, {', '.join(sorted(SCAN_BACKENDS))}")
    return name


def selective_scan(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        backend: Optional[str] = None, z_order: Optional[torch.Tensor] = None,
        out_order: Optional[torch.Tensor] = None, delta_proj_weight: Optional[torch.Tensor] = None,
        return_out_sum: bool = False):
    """Selective scan with the ``mamba_ssm.selective_scan_fn`` signature, on the chosen backend.

    ``z_order`` (L, paths): z is the (batch / paths, dim, L) source of the gate, and sequence p * (batch /
    paths) + b reads z[b] in the token order z_order[:, p] (the multi-path block's orders; see token_orders).
    ``out_order`` (L, paths): that sequence's output at position l goes to position out_order[l, p] instead, which
    puts it back in token order when out_order is the order it was read in (the multi-path block's merge then
    needs no gather).
    ``delta_proj_weight`` (dim, rank): delta is the low-rank dt (batch, rank, L), and the scan's delta is
    dt projected by it (Mamba's dt_proj, without its bias: that is ``delta_bias``). The C++ scan projects it
    tile by tile as it goes, so the full-size delta is never written to memory nor read back.
    ``return_out_sum``: also return the output summed over the positions (batch, dim), after the rest (out,
    [last state,] sum): what the multi-path block's gate takes the mean of. The C++ scan sums it as it writes the
    output, so the output is not read back for it.
    """
    name = resolve_scan_backend(backend, u.device)
    backend_kwargs = {}
    if delta_proj_weight is not None:
        if name in DELTA_PROJECTING_SCANS:
            backend_kwargs['delta_proj_weight'] = delta_proj_weight
        else:
            delta = project_delta(delta, delta_proj_weight)
    if z is not None and z_order is not None:
        if name in ORDER_READING_SCANS:
            backend_kwargs['z_order'] = z_order
        else:
            z = gather_channel_major(z, z_order)
    if out_order is not None and name in ORDER_WRITING_SCANS:
        backend_kwargs['out_order'], out_order = out_order, None
    if return_out_sum and name in SUMMING_SCANS:
        backend_kwargs['return_out_sum'], return_out_sum = True, False
    result = SCAN_BACKENDS[name](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                 return_last_state=return_last_state, **backend_kwargs)
    result = _restored(result, out_order, return_last_state)
    return _with_out_sum(result, return_last_state) if return_out_sum else result
