"""glibc malloc thresholds for steady CPU throughput (the ``--malloc`` flag of the scripts and benchmarks).

glibc serves a request above its mmap threshold with freshly mapped pages and, each time it frees such a block,
raises the threshold to that block's size (up to 32 MiB); the free top of the heap goes back to the OS above a
trim threshold that moves with it. RSMamba's activations are 20-60 MiB apiece (rsmamba_base, batch 8), so
whether a pass re-maps them, page-faulting and zeroing every page, depends on the allocation history: on a
2-core EPYC, eval batches of the same process took 163 to 309 ms/img, with 0 to 900K page faults each.
Pinning both thresholds keeps the blocks in the heap, for steady speed. The price is a heap that keeps its
high-water mark: a checkpointed training step peaked at 3.3 GB pinned, 2.7 GB adaptive. So ``auto`` pins
unless the run asked for gradient checkpointing, i.e. for memory first.
"""
import ctypes
import platform

MALLOC_CHOICES = ('auto', 'pinned', 'default')
MALLOC_HELP = ("glibc malloc thresholds: 'pinned' keeps large activations in the heap (steady speed, the heap "
               "keeps its peak), 'default' leaves glibc adaptive (lower peak RSS with checkpointing), 'auto' "
               "pins unless gradient checkpointing is on (default: auto; no effect without glibc)")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts
PINNED_TRIM_THRESHOLD = 1 << 30


def configure_malloc(choice: str = 'auto', memory_first: bool = False) -> str:
    """Apply a ``--malloc`` choice to this process; returns what is in effect: 'pinned' or 'default'.

    ``memory_first``: the run uses gradient checkpointing, which 'auto' leaves adaptive. Call it before the
    first large allocation. Outside glibc (macOS, Windows, musl) nothing changes and 'default' comes back.
    """
    if choice not in MALLOC_CHOICES:
        raise ValueError(f'--malloc must be one of {", ".join(MALLOC_CHOICES)}, got {choice!r}')
    if choice == 'default' or (choice == 'auto' and memory_first):
        return 'default'
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'default'
    mallopt = ctypes.CDLL(None).mallopt
    pinned = mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, PINNED_TRIM_THRESHOLD)
    return 'pinned' if pinned else 'default'
