"""The multi-path block's token orders: an (L, paths) index, every column a permutation of the L positions.

Sequence ``p * B + b`` of a mix over ``paths`` orders reads, at position ``l``, row ``order[l, p]`` of source
sequence ``b``. The C++ and Triton kernels read their inputs through the index (``kernel``, the default: no
gathered copy exists, and autograd saves the un-reordered source); every other backend gets a gathered copy
(``gather``); ``$RSMAMBA_TOKEN_ORDER`` picks one, both are exact. The C++ scan also writes its output back in
token order as it stores it (``out_order``); other outputs are put back by `restore_token_orders`.
"""
import os

import torch

TOKEN_ORDER_ENV_VAR = 'RSMAMBA_TOKEN_ORDER'
TOKEN_ORDER_MODES = ('kernel', 'gather')


def token_order_mode() -> str:
    mode = os.environ.get(TOKEN_ORDER_ENV_VAR) or 'kernel'
    if mode not in TOKEN_ORDER_MODES:
        raise ValueError(f'${TOKEN_ORDER_ENV_VAR}={mode!r}: choose one of {", ".join(TOKEN_ORDER_MODES)}')
    return mode


def gather_token_orders(source: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(L, B, C) and (L, paths) -> (L, paths * B, C): every order at once, one index_select (backward: index_add)."""
    return source.index_select(0, order.flatten()).view(order.shape[0], -1, source.shape[-1])


def restore_token_orders(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_token_orders` per path: y (L, paths * B, C), sequence p * B + b in the token order
    order[:, p] -> the same with every sequence back in token order (row l: the position that read token l).
    One index_select over the L * paths rows."""
    paths = order.shape[1]
    rows = (torch.argsort(order, dim=0) * paths + torch.arange(paths, device=order.device)).flatten()
    by_path = y.unflatten(1, (paths, -1))
    return by_path.flatten(0, 1).index_select(0, rows).view(by_path.shape).flatten(1, 2)


def gather_channel_major(source: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`gather_token_orders` of a (B, C, L) view of a time-major tensor: (paths * B, C, L), again such a view."""
    return gather_token_orders(source.permute(2, 0, 1), order).permute(1, 2, 0)


def restore_channel_major(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`restore_token_orders` of a (N, C, L) view of a time-major tensor: (N, C, L), again such a view."""
    return restore_token_orders(y.permute(2, 0, 1), order).permute(1, 2, 0)


def scatter_token_orders(grad_tm: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The gradient of reading a source (L, B, C) through ``order``: row l of sequence p * B + b read source row
    order[l, p] of b. grad_tm: (L, paths * B, C) -> (L, B, C), summed over paths.

    Every column of ``order`` is a permutation, so gathers through the inverse permutations, one per path added
    in path order, replace a scatter-add: no atomics, the same sum on every run. (One gather of all paths and a sum
    over them gives the same bits, 1.4-1.6x slower: one block's dz at batch 8 on a 2-core EPYC.)
    """
    inverse = torch.argsort(order, dim=0)
    by_path = grad_tm.view(order.shape[0], order.shape[1], -1, grad_tm.shape[-1])  # (L, paths, B, C)
    total = by_path[:, 0].index_select(0, inverse[:, 0])
    for path in range(1, order.shape[1]):
        total.add_(by_path[:, path].index_select(0, inverse[:, path]))
    return total


def sum_path_planes(planes: torch.Tensor) -> torch.Tensor:
    """The gradient of a source read through several token orders, from one plane per path already put back
    in the source's order (paths, L, B, C) -> (L, B, C): the paths added in path order, the bits
    `scatter_token_orders` gives. (The C++ kernels write their gradients so: 3.4x faster than gathering each
    path first, one block's dz at batch 8 on a 2-core EPYC.)"""
    if planes.shape[0] == 1:
        return planes[0]
    total = planes[0] + planes[1]
    for path in range(2, planes.shape[0]):
        total.add_(planes[path])
    return total
