"""Selective scan (Mamba-1 / S6) behind one call, with interchangeable backends.

Shapes follow `mamba_ssm.selective_scan_fn` so the fused kernel drops in unchanged:
``u, delta, z: (batch, dim, length)``, ``A: (dim, state)``, ``B, C: (batch, state, length)``,
``D, delta_bias: (dim,)``. The recurrence per channel ``d`` and state ``n`` is::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t = <h_t, C_t> + D * u_t ;  out = y * silu(z)

Backends:
* ``mamba_ssm``: the fused CUDA kernel (optional ``[cuda]`` extra, CUDA tensors only).
* ``chunked``: pure PyTorch for every device. The sequence is processed in chunks whose
  (chunk, batch, dim, state) working set stays cache-sized; inside a chunk every position costs
  a single fused multiply-add on the whole (batch, dim, state) state. Its autograd backward
  re-computes the states chunk by chunk from saved chunk-boundary states, so training keeps
  O(batch * length * dim) activations instead of O(batch * length * dim * state).
* ``reference``: a plain sequential loop, the independent yardstick for tests and benchmarks.
"""
import math
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

BACKEND_ENV_VAR = 'RSMAMBA_SCAN_BACKEND'

# Elements of one (chunk, batch, dim, state) slab (16 MB of fp32): measured best on a 2-core Xeon at
# batch 8 x 3 paths, where it gives chunks of ~28 positions; much shorter chunks pay per-op overhead.
_CHUNK_ELEMENTS = 2 ** 22


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 stays fp64 so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def selective_scan_reference(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """Plain sequential scan, one position at a time: slow, obvious, used to check the others."""
    ct = _compute_dtype(u.dtype)
    u_c, delta_c, A_c, B_c, C_c = (t.to(ct) for t in (u, delta, A, B, C))
    delta_c = _prepare_delta(delta_c, None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    batch, dim, length = u.shape
    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta_c[:, :, t, None] * A_c)
        h = decay * h + (delta_c[:, :, t] * u_c[:, :, t])[:, :, None] * B_c[:, None, :, t]
        ys.append((h * C_c[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    out = _finish(y, u_c, None if D is None else D.to(ct), z, u.dtype)
    return (out, h) if return_last_state else out


def _chunk_len(batch: int, dim: int, state: int, length: int, chunk_len: Optional[int]) -> int:
    if chunk_len is None:
        chunk_len = max(1, _CHUNK_ELEMENTS // max(1, batch * dim * state))
    return max(1, min(chunk_len, length))


def _chunk_terms(u, delta, A, B, t0, t1, decay_buf, drive_buf):
    """decay_t = exp(delta_t A) and drive_t = delta_t u_t B_t for one chunk, written into reused buffers."""
    n = t1 - t0
    decay = torch.mul(delta[t0:t1, :, :, None], A, out=decay_buf[:n]).exp_()
    drive = torch.mul((delta[t0:t1] * u[t0:t1])[..., None], B[t0:t1, :, None, :], out=drive_buf[:n])
    return decay, drive


def _chunk_states(h, decay, drive):
    """Run the recurrence over one chunk in place: on return ``drive[t]`` holds h_t."""
    drive[0].addcmul_(decay[0], h)
    for t in range(1, drive.shape[0]):
        drive[t].addcmul_(decay[t], drive[t - 1])
    return drive


class _ChunkedScan(torch.autograd.Function):
    """Core recurrence y_t = <h_t, C_t> on time-major tensors; delta is already positive.

    Inputs: u, delta (L, b, d); A (d, n); B, C (L, b, n). Saves only the inputs and one state
    per chunk boundary; backward re-runs each chunk forward, then the adjoint recurrence.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_len):
        length, batch, dim = u.shape
        state = A.shape[1]
        h = u.new_zeros(batch, dim, state)
        y = u.new_empty(length, batch, dim)
        starts = list(range(0, length, chunk_len))
        boundary = u.new_empty(len(starts), batch, dim, state)
        decay_buf = u.new_empty(min(chunk_len, length), batch, dim, state)
        drive_buf = torch.empty_like(decay_buf)
        for i, t0 in enumerate(starts):
            t1 = min(t0 + chunk_len, length)
            boundary[i] = h
            h = boundary[i]  # the previous chunk's state lives in drive_buf, about to be overwritten
            decay, drive = _chunk_terms(u, delta, A, B, t0, t1, decay_buf, drive_buf)
            hs = _chunk_states(h, decay, drive)
            torch.matmul(hs, C[t0:t1, :, :, None], out=y[t0:t1, :, :, None])
            h = hs[-1]
        last = h.clone()
        ctx.save_for_backward(u, delta, A, B, C, boundary)
        ctx.chunk_len = chunk_len
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, boundary = ctx.saved_tensors
        chunk_len = ctx.chunk_len
        length, batch, dim = u.shape
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        carry = None  # decay_{t1} * adjoint_{t1} flowing back from the next chunk
        starts = list(range(0, length, chunk_len))
        decay_buf = u.new_empty(min(chunk_len, length), batch, dim, A.shape[1])
        drive_buf = torch.empty_like(decay_buf)
        for i in reversed(range(len(starts))):
            t0 = starts[i]
            t1 = min(t0 + chunk_len, length)
            sl = slice(t0, t1)
            h0 = boundary[i]
            decay, drive = _chunk_terms(u, delta, A, B, t0, t1, decay_buf, drive_buf)
            hs = _chunk_states(h0, decay, drive)
            # adjoint g_t = dL/dh_t = dy_t C_t + decay_{t+1} g_{t+1}, accumulated in place
            g = dy[sl, :, :, None] * C[sl, :, None, :]
            if carry is not None:
                g[-1].add_(carry)
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            carry = decay[0] * g[0]
            torch.matmul(dy[sl, :, None, :], hs, out=dC[sl, :, None, :])
            # previous states h_{t-1}: the chunk's start state, then hs shifted by one
            h_prev = torch.cat([h0[None], hs[:-1]], dim=0)
            g_decay = g * h_prev * decay  # dL/d(delta_t * A)
            dA += torch.einsum('lbdn,lbd->dn', g_decay, delta[sl])
            g_b = torch.matmul(g, B[sl, :, :, None]).squeeze(-1)  # sum_n g * B
            ddelta[sl] = (g_decay * A).sum(-1) + g_b * u[sl]
            du[sl] = g_b * delta[sl]
            torch.matmul((delta[sl] * u[sl])[:, :, None, :], g, out=dB[sl, :, None, :])
        return du, ddelta, dA, dB, dC, None


def selective_scan_chunked(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        chunk_len: Optional[int] = None):
    """Fast pure-PyTorch scan; any device, fp32 accumulation under autocast.

    Works time-major inside: callers that hold (length, batch, dim) tensors and pass ``.permute(1, 2, 0)``
    views (as the mixer does) pay no layout copies, and the result is such a view too.
    """
    ct = _compute_dtype(u.dtype)
    batch, dim, length = u.shape
    state = A.shape[1]

    def time_major(t):
        return t.permute(2, 0, 1).to(ct).contiguous()

    with torch.autocast(u.device.type, enabled=False):
        u_tm = time_major(u)
        delta_tm = time_major(delta)
        if delta_bias is not None:
            delta_tm = delta_tm + delta_bias.to(ct)
        if delta_softplus:
            delta_tm = F.softplus(delta_tm)
        if length == 0:
            y_tm, last = u_tm.new_zeros(0, batch, dim), u_tm.new_zeros(batch, dim, state)
        else:
            chunk = _chunk_len(batch, dim, state, length, chunk_len)
            y_tm, last = _ChunkedScan.apply(
                u_tm, delta_tm, A.to(ct).contiguous(), time_major(B), time_major(C), chunk)
        if D is not None:
            y_tm = y_tm + u_tm * D.to(ct)
        if z is not None:
            y_tm = y_tm * F.silu(time_major(z))
        out = y_tm.to(u.dtype).permute(1, 2, 0)
    return (out, last) if return_last_state else out


def _mamba_ssm_fn() -> Optional[Callable]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # missing or broken optional extra must never break import
        return None
    return selective_scan_fn


def selective_scan_mamba_ssm(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The fused CUDA kernel from the optional ``mamba-ssm`` package."""
    fn = _mamba_ssm_fn()
    if fn is None:
        raise RuntimeError("scan backend 'mamba_ssm' needs the optional extra: pip install 'timm-rsmamba[cuda]'")
    if not u.is_cuda:
        raise RuntimeError("scan backend 'mamba_ssm' runs on CUDA tensors only; use 'chunked' on this device")
    return fn(u, delta, A.float(), B, C, D=None if D is None else D.float(), z=z,
              delta_bias=None if delta_bias is None else delta_bias.float(),
              delta_softplus=delta_softplus, return_last_state=return_last_state)


SCAN_BACKENDS: Dict[str, Callable] = {
    'chunked': selective_scan_chunked,
    'reference': selective_scan_reference,
    'mamba_ssm': selective_scan_mamba_ssm,
}


def has_mamba_ssm() -> bool:
    return _mamba_ssm_fn() is not None


def resolve_scan_backend(name: Optional[str], device: Optional[torch.device] = None) -> str:
    """Backend actually used: explicit name > $RSMAMBA_SCAN_BACKEND > automatic choice."""
    name = name or os.environ.get(BACKEND_ENV_VAR) or 'auto'
    if name == 'auto':
        on_cuda = device is not None and torch.device(device).type == 'cuda'
        return 'mamba_ssm' if on_cuda and has_mamba_ssm() else 'chunked'
    if name not in SCAN_BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {name!r} (from the scan_backend argument or ${BACKEND_ENV_VAR}); "
            f"choose one of: auto, {', '.join(sorted(SCAN_BACKENDS))}")
    return name


def selective_scan(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        backend: Optional[str] = None):
    """Selective scan with the ``mamba_ssm.selective_scan_fn`` signature, on the chosen backend."""
    fn = SCAN_BACKENDS[resolve_scan_backend(backend, u.device)]
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)
