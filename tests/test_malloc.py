"""--malloc: glibc's thresholds pinned or left adaptive, checked by the page faults of a re-allocation."""
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
