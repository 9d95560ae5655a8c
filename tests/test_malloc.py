"""--malloc: glibc's thresholds pinned or left adaptive, checked by the page faults of a re-allocation; huge pages
for inference, checked by the kernel's count of them."""
import os
import platform
import subprocess
import sys

import pytest

from timm_rsmamba.malloc import LEAN_TUNABLES, configure_malloc, lean_restart_env, resolve_malloc

# In a fresh interpreter: apply a choice, then allocate, touch, free a 24 MiB block twice with libc's own
# malloc; print the choice in effect and the minor page faults of the second round.
_PROBE = '''
import ctypes, resource, sys
from timm_rsmamba.malloc import LEAN_TUNABLES, configure_malloc, lean_restart_env, resolve_malloc
applied = configure_malloc(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 24 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(ctypes.c_void_p(p))
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _probe(choice):
    out = subprocess.run([sys.executable, '-c', _PROBE, choice], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only: elsewhere --malloc changes nothing')
def test_pinned_thresholds_keep_large_blocks_in_the_heap():
    applied, faults = _probe('pinned')
    assert applied == 'pinned' and faults < 100  # served again from the heap, its pages still mapped
    applied, faults = _probe('default')
    assert applied == 'default' and faults > 24 * 256 // 2  # adaptive glibc: mapped afresh, every page faults


def test_auto_is_lean_for_checkpointed_runs_and_bad_choices_fail():
    assert resolve_malloc('auto') == 'pinned' and resolve_malloc('auto', memory_first=True) == 'lean'
    assert configure_malloc('default') == 'default'
    with pytest.raises(ValueError, match="--malloc must be one of auto, pinned, lean, default, got 'fast'"):
        configure_malloc('fast')


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_lean_needs_a_restart_with_tunables_kept_from_the_environment():
    assert lean_restart_env('pinned', environ={}) is None
    assert lean_restart_env('auto', memory_first=True, environ={}) == {'GLIBC_TUNABLES': LEAN_TUNABLES}
    env = lean_restart_env('lean', environ={'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': '1'})
    assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:' + LEAN_TUNABLES, 'X': '1'}
    assert lean_restart_env('lean', environ=env) is None  # already started with it: no second restart


# In a fresh interpreter: configure for inference or not (argv[1]: 1 or 0), then allocate and touch a 32 MiB
# tensor; print torch's huge-page variable and how many KiB of it the kernel backed with huge pages.
_HUGE_PAGES_PROBE = '''
import os, sys
from timm_rsmamba.malloc import TORCH_HUGE_PAGES_ENV, configure_malloc
configure_malloc('pinned', huge_pages=sys.argv[1] == '1')
def huge_kib():
    with open('/proc/self/smaps_rollup') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('AnonHugePages'))
import torch
before = huge_kib()
x = torch.empty(8 << 20).fill_(1)
print(os.environ.get(TORCH_HUGE_PAGES_ENV, '-'), huge_kib() - before)
'''


def _thp_mode():
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return f.read().split('[')[1].split(']')[0]
    except (OSError, IndexError):
        return None


def _huge_pages_probe(inference, **env):
    out = subprocess.run([sys.executable, '-c', _HUGE_PAGES_PROBE, '1' if inference else '0'], capture_output=True,
                         text=True, check=True, env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    variable, kib = out.stdout.split()
    return variable, int(kib)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or _thp_mode() not in ('madvise', 'always'),
                    reason='needs glibc and a Linux kernel with transparent huge pages')
def test_inference_puts_large_tensors_on_huge_pages_and_training_does_not():
    variable, kib = _huge_pages_probe(True, THP_MEM_ALLOC_ENABLE=None)
    assert variable == '1' and kib >= 2048  # at least one 2 MiB page of the 32 MiB tensor
    variable, kib = _huge_pages_probe(False, THP_MEM_ALLOC_ENABLE=None)
    assert variable == '-'
    if _thp_mode() == 'madvise':  # ('always' backs anything with huge pages)
        assert kib == 0
    assert _huge_pages_probe(True, THP_MEM_ALLOC_ENABLE='0')[0] == '0'  # the user's choice stands
