"""Selective scan (Mamba-1 / S6) behind one call, with interchangeable backends.

Shapes follow `mamba_ssm.selective_scan_fn` so the fused kernel drops in unchanged:
``u, delta, z: (batch, dim, length)``, ``A: (dim, state)``, ``B, C: (batch, state, length)``,
``D, delta_bias: (dim,)``. The recurrence per channel ``d`` and state ``n`` is::

    delta = softplus(delta + delta_bias)
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
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

BACKEND_ENV_VAR = 'RSMAMBA_SCAN_BACKEND'

# Elements of one (chunk, batch, dim, state) slab (16 MB of fp32): measured best on a 2-core Xeon at
# batch 8 x 3 paths, where it gives chunks of ~28 positions; much shorter chunks pay per-op overhead.
_CHUNK_ELEMENTS = 2 ** 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 stays fp64 so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def _positive_delta(delta_raw, delta_bias, softplus):
    delta = delta_raw if delta_bias is None else delta_raw + delta_bias
    return F.softplus(delta) if softplus else delta


def selective_scan_reference(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """Plain sequential scan, one position at a time: slow, obvious, used to check the others."""
    ct = _compute_dtype(u.dtype)
    u_c, A_c, B_c, C_c = (t.to(ct) for t in (u, A, B, C))
    delta_c = _positive_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct)[:, None],
                              delta_softplus)
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


def _chunk_len(batch: int, dim: int, state: int, length: int, chunk_len: Optional[int]) -> int:
    if chunk_len is None:
        chunk_len = max(1, _CHUNK_ELEMENTS // max(1, batch * dim * state))
    return max(1, min(chunk_len, length))


def _chunk_states(h0, u, delta, A, B, decay_buf, state_buf):
    """States h_t of one chunk, written into state_buf; decay_t = exp(delta_t A) is left in decay_buf.

    Each position costs one in-place multiply-add over the whole (batch, dim, state) state.
    """
    n = u.shape[0]
    decay = torch.mul(delta[..., None], A, out=decay_buf[:n]).exp_()
    hs = torch.mul((delta * u)[..., None], B[:, :, None, :], out=state_buf[:n])
    hs[0].addcmul_(decay[0], h0)
    for t in range(1, n):
        hs[t].addcmul_(decay[t], hs[t - 1])
    return hs, decay


class _ChunkedScan(torch.autograd.Function):
    """The whole selective scan on time-major tensors, chunk by chunk.

    Inputs: u, delta_raw, z (L, b, d) (any strides); A (d, n); B, C (L, b, n); D, delta_bias (d,) or None.
    Softplus, the D skip and the SiLU(z) gate happen per chunk inside, so autograd keeps only the
    inputs plus one (b, d, n) state per chunk boundary; backward re-runs each chunk forward (states,
    core output), then the adjoint recurrence g_t = dL/dh_t = dy_t C_t + decay_{t+1} g_{t+1}.
    """

    @staticmethod
    def forward(ctx, u, delta_raw, A, B, C, D, z, delta_bias, softplus, chunk_len):
        length, batch, dim = u.shape
        state = A.shape[1]
        out = u.new_empty(length, batch, dim)
        starts = range(0, length, chunk_len)
        boundary = u.new_empty(len(starts), batch, dim, state)
        h = u.new_zeros(batch, dim, state)
        bufs = [u.new_empty(min(chunk_len, length), batch, dim, state) for _ in range(2)]
        for i, t0 in enumerate(starts):
            sl = slice(t0, min(t0 + chunk_len, length))
            boundary[i] = h  # copy out: h lives in a buffer the next chunk overwrites
            hs, _ = _chunk_states(boundary[i], u[sl], _positive_delta(delta_raw[sl], delta_bias, softplus),
                                  A, B[sl], *bufs)
            y = out[sl]
            torch.matmul(hs, C[sl, :, :, None], out=y[..., None])
            if D is not None:
                y.addcmul_(u[sl], D)
            if z is not None:
                y.mul_(F.silu(z[sl]))
            h = hs[-1]
        ctx.save_for_backward(u, delta_raw, A, B, C, D, z, delta_bias, boundary)
        ctx.softplus, ctx.chunk_len = softplus, chunk_len
        last = h.clone()
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta_raw, A, B, C, D, z, delta_bias, boundary = ctx.saved_tensors
        chunk_len = ctx.chunk_len
        length, batch, dim = u.shape
        state = A.shape[1]
        du, ddelta_raw = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dz = torch.empty_like(u) if z is not None else None
        dA = torch.zeros_like(A)
        dD = torch.zeros_like(D) if D is not None else None
        decay_buf, state_buf, adj_buf, gd_buf = (
            u.new_empty(min(chunk_len, length), batch, dim, state) for _ in range(4))
        carry = None  # decay_{t1} * g_{t1} flowing back from the following chunk
        starts = range(0, length, chunk_len)
        for i in reversed(range(len(starts))):
            sl = slice(starts[i], min(starts[i] + chunk_len, length))
            n = sl.stop - sl.start
            u_c, h0 = u[sl], boundary[i]
            pre = delta_raw[sl] if delta_bias is None else delta_raw[sl] + delta_bias
            delta = F.softplus(pre) if ctx.softplus else pre
            hs, decay = _chunk_states(h0, u_c, delta, A, B[sl], decay_buf, state_buf)
            # gradient reaching the core output <h_t, C_t> through the SiLU(z) gate and the D skip
            dy = dout[sl]
            if z is not None:
                y = torch.matmul(hs, C[sl, :, :, None]).squeeze(-1)
                if D is not None:
                    y.addcmul_(u_c, D)
                z_c = z[sl]
                sig = torch.sigmoid(z_c)
                dz[sl] = dy * y * sig * (1 + z_c * (1 - sig))
                dy = dy * (z_c * sig)
            if D is not None:
                dD += (dy * u_c).sum((0, 1))
            torch.matmul(dy[:, :, None, :], hs, out=dC[sl, :, None, :])
            g = torch.mul(dy[..., None], C[sl, :, None, :], out=adj_buf[:n])
            if carry is not None:
                g[-1].add_(carry)
            for t in range(n - 2, -1, -1):
                g[t].addcmul_(decay[t + 1], g[t + 1])
            carry = decay[0] * g[0]
            # gd = dL/d(delta_t A) = g_t * h_{t-1} * decay_t, where h_{-1} is the chunk's start state
            gd = gd_buf[:n]
            torch.mul(g[0], h0, out=gd[0])
            torch.mul(g[1:], hs[:-1], out=gd[1:])
            gd.mul_(decay)
            dA += torch.bmm(delta.reshape(n * batch, dim).t()[:, None, :],
                            gd.reshape(n * batch, dim, state).transpose(0, 1)).squeeze(1)
            g_b = torch.matmul(g, B[sl, :, :, None]).squeeze(-1)  # sum_n g * B
            torch.matmul(((delta * u_c))[:, :, None, :], g, out=dB[sl, :, None, :])
            ddelta = (gd * A).sum(-1).addcmul_(g_b, u_c)
            du_c = g_b.mul_(delta)
            if D is not None:
                du_c.addcmul_(dy, D)
            du[sl] = du_c
            ddelta_raw[sl] = ddelta.mul_(torch.sigmoid(pre)) if ctx.softplus else ddelta
        d_bias = ddelta_raw.sum((0, 1)) if delta_bias is not None else None
        return du, ddelta_raw, dA, dB, dC, dD, dz, d_bias, None, None


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
        return None if t is None else t.permute(2, 0, 1).to(ct)

    def vector(t):
        return None if t is None else t.to(ct).contiguous()

    with torch.autocast(u.device.type, enabled=False):
        if length == 0:
            out, last = u.new_zeros(0, batch, dim, dtype=ct), u.new_zeros(batch, dim, state, dtype=ct)
        else:
            out, last = _ChunkedScan.apply(
                time_major(u), time_major(delta), A.to(ct).contiguous(), time_major(B), time_major(C),
                vector(D), time_major(z), vector(delta_bias), delta_softplus,
                _chunk_len(batch, dim, state, length, chunk_len))
        out = out.to(u.dtype).permute(1, 2, 0)
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
