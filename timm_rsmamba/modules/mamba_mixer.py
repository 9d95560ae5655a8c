"""Mamba-1 mixer with the parameter names of transformers' ``MambaMixer`` (as RSMamba uses it)."""
import math
from typing import Optional

import torch
from torch import nn

from ..ops import causal_conv1d, resolve_conv_backend, resolve_scan_backend, selective_scan, triton_support
from ..ops.token_orders import gather_token_orders, restore_token_orders, token_order_mode


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv + SiLU -> selective scan (gated by SiLU(z)) -> out_proj.

    Runs time-major inside: the (length, batch, channels) layout makes every per-position slice of the
    scan contiguous, and keeps all elementwise work on one memory layout.
    """

    def __init__(
            self,
            dim: int,
            intermediate_size: int,
            state_size: int = 16,
            dt_rank: Optional[int] = None,
            conv_kernel: int = 4,
            scan_backend: Optional[str] = None,
            conv_backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.intermediate_size = intermediate_size
        self.state_size = state_size
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.scan_backend = scan_backend
        self.conv_backend = conv_backend
        resolve_scan_backend(scan_backend)  # fail at construction on a bad name, not mid-forward
        resolve_conv_backend(conv_backend)
        self.in_proj = nn.Linear(dim, 2 * intermediate_size, bias=False, **dd)
        self.conv1d = nn.Conv1d(
            intermediate_size, intermediate_size, conv_kernel, groups=intermediate_size,
            padding=conv_kernel - 1, bias=True, **dd)
        self.x_proj = nn.Linear(intermediate_size, self.dt_rank + 2 * state_size, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, intermediate_size, bias=True, **dd)
        # S4D-real init shared by every channel: A = -[1..S]; the original leaves dt at Linear's default init.
        a = torch.arange(1, state_size + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(a).expand(intermediate_size, state_size).contiguous())
        self.D = nn.Parameter(torch.ones(intermediate_size, device=device))
        self.out_proj = nn.Linear(intermediate_size, dim, bias=False, **dd)

    def backend_names(self, device=None):
        return resolve_scan_backend(self.scan_backend, device), resolve_conv_backend(self.conv_backend, device)

    def extra_repr(self) -> str:
        scan, conv = self.backend_names(self.A_log.device)
        return f'state_size={self.state_size}, dt_rank={self.dt_rank}, scan_backend={scan}, conv_backend={conv}'

    def on_triton(self, device) -> bool:
        return self.backend_names(device) == ('triton', 'triton')

    def _mix_params(self):
        return (self.conv1d.weight[:, 0], self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D, self.dt_rank)

    def weigh(self, y: torch.Tensor, weights: torch.Tensor, xz: torch.Tensor, order: Optional[torch.Tensor] = None):
        """``y * weights`` for y = mix(xz, order) (any view of it): the gate's product. On the Triton mixer autograd
        keeps the mix's inputs instead of y, and re-computes y in backward ($RSMAMBA_GATE_RECOMPUTE)."""
        if self.on_triton(xz.device) and triton_support.gate_recompute():
            return triton_support.weigh_paths(y, weights, xz, order, *self._mix_params())
        return y * weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, length, dim) -> (batch, length, dim)."""
        return self.out_proj(self.mix(self.in_proj(hidden.transpose(0, 1)))).transpose(0, 1)

    def mix(self, xz: torch.Tensor, order: Optional[torch.Tensor] = None, restore_order: bool = False,
            with_means: bool = False):
        """Everything between the two projections, time-major: xz (L, N, 2E) -> y (L, N, E).

        Split out so that a caller running several token orders of the same tokens can project in once and
        out once (both act on each token alone) and mix only the orders: with ``order`` (L, paths), xz is
        (L, B, 2E) and sequence p * B + b of the result (N = paths * B) is b's tokens in the order order[:, p].
        The conv and the scan read x and z through ``order`` where their backends can, with no gathered copy
        (ops/token_orders.py). On the Triton backends one autograd function runs it all (ops/triton_mix.py).
        ``restore_order``: hand every sequence back in token order (row l of sequence p * B + b: token l); the C++
        scan does it as it writes y. ``with_means``: return (y, y's mean over the positions (N, E)); the C++ scan
        sums y as it writes it, which spares reading y back.
        """
        out_order = order if restore_order else None
        if order is not None and token_order_mode() == 'gather':
            xz, order = gather_token_orders(xz, order), None
        if self.on_triton(xz.device):
            y = triton_support.mamba_mix(xz, order, *self._mix_params())
            y = restore_token_orders(y, out_order) if out_order is not None else y
            return (y, y.mean(0)) if with_means else y
        E, R, S = self.intermediate_size, self.dt_rank, self.state_size
        x, z = xz.split(E, dim=-1)

        def channel_major(t):  # (L, N, C) -> a (N, C, L) view: the ops' layout, no copy
            return t.permute(1, 2, 0)

        x = causal_conv1d(
            channel_major(x), self.conv1d.weight[:, 0], self.conv1d.bias,
            activation='silu', backend=self.conv_backend, order=order)
        x_tm = x.permute(2, 0, 1)
        dt, B, C = self.x_proj(x_tm).split([R, S, S], dim=-1)
        # dt_proj's weight goes in for the scan to project dt with (the C++ scan does it in its tiles, the others
        # get delta projected first), its bias as delta_bias, as the fused kernel wants
        y = selective_scan(
            x, channel_major(dt), -torch.exp(self.A_log.float()), channel_major(B), channel_major(C),
            D=self.D.float(), z=channel_major(z), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            backend=self.scan_backend, z_order=order, out_order=out_order, delta_proj_weight=self.dt_proj.weight,
            return_out_sum=with_means)
        if with_means:
            y, y_sum = y
            return y.permute(2, 0, 1), y_sum / y.shape[-1]
        return y.permute(2, 0, 1)
