"""glibc malloc settings for steady CPU throughput, or for a low peak (the ``--malloc`` flag).

glibc serves a request above its mmap threshold with freshly mapped pages and, each time it frees such a block,
raises the threshold to that block's size (up to 32 MiB); the free top of the heap goes back to the OS above a
trim threshold that moves with it. RSMamba's activations are 20-60 MiB apiece (rsmamba_base, batch 8), so
whether a pass re-maps them, page-faulting and zeroing every page, depends on the allocation history: on a
2-core EPYC, eval batches of the same process took 163 to 309 ms/img, with 0 to 900K page faults each.

* ``pinned`` fixes both thresholds (mallopt, at run time): the blocks stay in the heap, steady speed, but the
  heap keeps its high-water mark (a checkpointed train step peaked at 3.3 GB instead of 2.7).
* ``lean`` maps every block above 16 MiB afresh, on transparent huge pages (512x fewer faults), so freed
  activations leave the process: a checkpointed step peaked at 1.6 GB, for 15-35% more time. glibc reads
  these settings only at start-up (GLIBC_TUNABLES, glibc >= 2.35 for the huge pages), so the scripts restart
  themselves once with them (`lean_restart_env`).
* ``auto``: ``lean`` with gradient checkpointing (the run asked for memory first), else ``pinned``.
* ``default``: glibc as it comes.

For inference (``huge_pages``), ``pinned`` also puts torch's large CPU tensors on transparent huge pages: the C++
scan reads each position's row of u, delta and z from a different 4 KiB page, and their TLB misses took 3-5% of
an eval batch. Training keeps 4 KiB pages: its pinned heap grew from 5.4 to 8.6 GB on huge pages, for no speed.
"""
import ctypes
import os
import platform
from typing import Dict, Mapping, Optional

MALLOC_CHOICES = ('auto', 'pinned', 'lean', 'default')
MALLOC_HELP = ("glibc malloc: 'pinned' keeps large activations in the heap (steady speed), 'lean' returns them "
               "to the OS (low peak RSS, slower; the script restarts itself once to set it), 'auto' is lean "
               "with --grad-checkpointing and pinned otherwise, 'default' leaves glibc adaptive "
               "(default: auto; no effect without glibc)")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts
PINNED_TRIM_THRESHOLD = 1 << 30
LEAN_TUNABLES = 'glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=16777216'
# torch's CPU allocator gives blocks of 2 MiB or more a 2 MiB alignment and madvise(MADV_HUGEPAGE) when this is 1;
# it reads the variable once, at the process's first CPU tensor
TORCH_HUGE_PAGES_ENV = 'THP_MEM_ALLOC_ENABLE'


def resolve_malloc(choice: str, memory_first: bool = False) -> str:
    """The setting a ``--malloc`` choice stands for; ``memory_first``: the run uses gradient checkpointing."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f'--malloc must be one of {", ".join(MALLOC_CHOICES)}, got {choice!r}')
    if choice == 'auto':
        return 'lean' if memory_first else 'pinned'
    return choice


def _is_glibc() -> bool:
    return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def lean_restart_env(choice: str, memory_first: bool = False,
                     environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, str]]:
    """The environment to restart this process with for ``lean``; None when no restart is needed."""
    if resolve_malloc(choice, memory_first) != 'lean' or not _is_glibc():
        return None
    current = environ.get('GLIBC_TUNABLES', '')
    if LEAN_TUNABLES in current:
        return None
    return dict(environ, GLIBC_TUNABLES=f'{current}:{LEAN_TUNABLES}' if current else LEAN_TUNABLES)


def _transparent_huge_pages() -> bool:
    """Whether this kernel gives transparent huge pages to memory that asks for them (Linux, not 'never')."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[never]' not in f.read()
    except OSError:
        return False


def configure_malloc(choice: str = 'auto', memory_first: bool = False, huge_pages: bool = False) -> str:
    """Apply a ``--malloc`` choice to this process; returns what is in effect: 'pinned', 'lean' or 'default'.

    'pinned' applies at once (call it before the large allocations). 'lean' is in effect only if the process
    started with it (see `lean_restart_env`). Outside glibc (macOS, Windows, musl) it is always 'default'.
    ``huge_pages`` (inference): with 'pinned', torch's large tensors go on transparent huge pages, if the kernel
    has them, the user did not set $THP_MEM_ALLOC_ENABLE, and no CPU tensor was allocated before this call.
    """
    setting = resolve_malloc(choice, memory_first)
    if setting == 'default' or not _is_glibc():
        return 'default'
    if setting == 'lean':
        return 'lean' if lean_restart_env(choice, memory_first) is None else 'default'
    mallopt = ctypes.CDLL(None).mallopt
    pinned = mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, PINNED_TRIM_THRESHOLD)
    if not pinned:
        return 'default'
    if huge_pages and _transparent_huge_pages():
        os.environ.setdefault(TORCH_HUGE_PAGES_ENV, '1')
    return 'pinned'
