"""The C++ kernels built for every ISA they support, each checked by tests/csrc/test_mamba_cpu.cpp against its own
scalar double-precision reference: natively for the ISAs this CPU runs, and for aarch64 (NEON) with a cross
compiler under qemu where both are installed (apt install g++-aarch64-linux-gnu qemu-user)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from timm_rsmamba.ops.cpu_kernel import ISAS, _find_compiler, build_flags, supported_isas

DRIVER = Path(__file__).parent / 'csrc' / 'test_mamba_cpu.cpp'
AARCH64_SYSROOT = '/usr/aarch64-linux-gnu'


def _driver_flags(isa: str):
    """The library's own flags for ``isa``, for an executable instead of a shared library."""
    return [f for f in build_flags(isa) if f not in ('-shared', '-fPIC')]


def _build(compiler: str, isa: str, tmp_path: Path) -> Path:
    exe = tmp_path / f'test_mamba_cpu_{isa}'
    built = subprocess.run([compiler, *_driver_flags(isa), '-o', str(exe), str(DRIVER)], capture_output=True,
                           text=True)
    assert built.returncode == 0, f'the {isa} build does not compile:\n{built.stderr[-4000:]}'
    return exe


def _run(exe: Path, isa: str, runner=()):
    done = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'all passed' in done.stdout
    vec_bytes = ISAS[isa].vec_bytes
    assert f'vec_bytes={vec_bytes} ' in done.stdout  # the build really had this ISA's vector width


def _x86_host():
    return platform.machine().lower() in ('x86_64', 'amd64', 'x64')


@pytest.mark.parametrize('isa', [name for name in ISAS if name != 'neon'])
def test_kernels_match_scalar_reference_natively(isa, tmp_path):
    """Every x86 build compiles, also where the CPU cannot run it (a CI machine without AVX-512 once let an
    AVX-512-only compile error through, and AVX-512 CPUs silently got the slow fallback); it runs where it can."""
    compiler = _find_compiler()
    if compiler is None:
        pytest.skip('no C++ compiler')
    if not _x86_host() and isa != 'generic':
        pytest.skip(f'{isa} is an x86 ISA and this is {platform.machine()}')
    exe = _build(compiler, isa, tmp_path)
    if isa not in supported_isas():
        pytest.skip(f'compiled; not run: this CPU does not run {isa} (it runs {", ".join(supported_isas())})')
    _run(exe, isa)


def test_kernels_match_scalar_reference_on_aarch64(tmp_path):
    if platform.machine().lower() in ('aarch64', 'arm64'):
        compiler, runner = _find_compiler(), ()
        if compiler is None:
            pytest.skip('no C++ compiler')
    else:
        compiler, qemu = shutil.which('aarch64-linux-gnu-g++'), shutil.which('qemu-aarch64')
        if compiler is None or qemu is None or not Path(AARCH64_SYSROOT).is_dir():
            pytest.skip('needs a cross compiler and qemu: apt install g++-aarch64-linux-gnu qemu-user')
        runner = (qemu, '-L', AARCH64_SYSROOT)
    _run(_build(compiler, 'neon', tmp_path), 'neon', runner)
