"""Building the C++ CPU kernels: the ISA chosen for this CPU, the per-user cache (one build per source, compiler,
flags and ISA; safe with concurrent builders), a cache shared with a machine of another ISA, and the machine
without a compiler."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from timm_rsmamba.ops import conv as conv_module
from timm_rsmamba.ops import cpu_kernel
from timm_rsmamba.ops import scan as scan_module
from timm_rsmamba.ops.compiled import CompiledKernels
from timm_rsmamba.ops.conv import causal_conv1d_cpu_kernel, causal_conv1d_reference
from timm_rsmamba.ops.scan import selective_scan_cpu_kernel, selective_scan_reference

from test_ops import _fresh_kernels, make_inputs

AVX2_ONLY = {'avx2', 'fma', 'sse2'}
REPO = str(Path(__file__).resolve().parents[1])


def _cpu(monkeypatch, features, machine='x86_64'):
    monkeypatch.setattr(cpu_kernel, '_cpu_features', lambda: set(features))
    monkeypatch.setattr(cpu_kernel.platform, 'machine', lambda: machine)


def test_isa_is_the_best_this_cpu_runs_and_the_override_is_checked(monkeypatch):
    monkeypatch.delenv(cpu_kernel.ISA_ENV_VAR, raising=False)
    _cpu(monkeypatch, AVX2_ONLY)
    assert cpu_kernel.supported_isas() == ['avx2', 'generic'] and cpu_kernel.select_isa() == 'avx2'
    _cpu(monkeypatch, AVX2_ONLY | {'avx512f', 'avx512dq', 'avx512vl', 'avx512bw'})
    assert cpu_kernel.select_isa() == 'avx512'
    monkeypatch.setenv(cpu_kernel.ISA_ENV_VAR, 'avx2')  # an AVX2 build measured on an AVX-512 machine
    assert cpu_kernel.select_isa() == 'avx2'
    _cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setenv(cpu_kernel.ISA_ENV_VAR, 'avx512')
    with pytest.warns(UserWarning, match=r"RSMAMBA_CPU_ISA='avx512': this CPU runs avx2, generic.*for avx2"):
        assert cpu_kernel.select_isa() == 'avx2'
    monkeypatch.delenv(cpu_kernel.ISA_ENV_VAR)
    _cpu(monkeypatch, set(), machine='aarch64')
    assert cpu_kernel.select_isa() == 'neon'


_FAKE_COMPILER = '''#!{python}
"""A stand-in C++ compiler: logs each compile, takes a while, writes -o's file; --version prints {version!r}."""
import sys, time
if sys.argv[1:] == ['--version']:
    print({version!r})
    sys.exit(0)
with open({log!r}, 'a') as f:
    f.write(' '.join(sys.argv[1:]) + chr(10))
if {fail!r}:
    sys.stderr.write('mamba_cpu.cpp:1: error: boom' + chr(10))
    sys.exit(1)
time.sleep(1)
open(sys.argv[sys.argv.index('-o') + 1], 'w').write('built')
'''


def _fake_compiler(tmp_path, version='fakecc 1.0', fail=False):
    log = tmp_path / 'compiles.log'
    path = tmp_path / f'fakecc-{abs(hash((version, fail)))}'
    path.write_text(_FAKE_COMPILER.format(python=sys.executable, version=version, log=str(log), fail=fail))
    path.chmod(0o755)
    return str(path), log


def _builds(log):
    """Builds the log records: each compiles the float32 part once (and the float64 part, and links)."""
    return log.read_text().count('-DRSM_PART=1') if log.exists() else 0


def test_build_is_cached_and_keyed_by_isa_and_compiler(tmp_path):
    compiler, log = _fake_compiler(tmp_path)
    cache = tmp_path / 'cache'
    first = cpu_kernel.build_library('avx2', compiler, cache)
    assert first.name.startswith('mamba_cpu-avx2-') and first.read_text() == 'built'
    assert cpu_kernel.build_library('avx2', compiler, cache) == first and _builds(log) == 1  # from the cache
    assert '-mavx2' in log.read_text() and '-DRSM_VEC_BYTES=32' in log.read_text()
    part1, part2, link = log.read_text().splitlines()  # the two parts compiled (at once), then linked
    assert all('-c' in line.split() and '-shared' not in line.split() for line in (part1, part2))
    assert {arg for line in (part1, part2) for arg in line.split() if arg.startswith('-DRSM_PART=')} == {
        '-DRSM_PART=1', '-DRSM_PART=2'}
    assert link.split()[:2] == ['-shared', '-pthread'] and [Path(arg).name for arg in link.split()[-2:]] == [
        'part1.o', 'part2.o']
    other_isa = cpu_kernel.build_library('generic', compiler, cache)
    newer, _ = _fake_compiler(tmp_path, version='fakecc 2.0')
    other_compiler = cpu_kernel.build_library('avx2', newer, cache)
    assert len({first, other_isa, other_compiler}) == 3 and _builds(log) == 3
    assert sorted(p.suffix for p in cache.iterdir()) == ['.lock'] * 3 + ['.so'] * 3  # no temporary files left


def test_concurrent_builds_compile_once(tmp_path):
    """Four processes (torchrun ranks, pytest-xdist workers) asking at once: one compiles, all get its file."""
    compiler, log = _fake_compiler(tmp_path)
    code = textwrap.dedent(f'''
        from pathlib import Path
        from timm_rsmamba.ops.cpu_kernel import build_library
        print(build_library('avx2', {compiler!r}, Path({str(tmp_path / 'cache')!r})))
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1 and _builds(log) == 1


def test_failed_build_says_why_and_leaves_nothing(tmp_path):
    compiler, _ = _fake_compiler(tmp_path, fail=True)
    cache = tmp_path / 'cache'
    with pytest.raises(RuntimeError, match='failed: mamba_cpu.cpp:1: error: boom'):
        cpu_kernel.build_library('avx2', compiler, cache)
    assert not list(cache.glob('*.so'))


def test_cache_shared_with_a_cpu_of_another_isa(monkeypatch, tmp_path):
    """A home directory shared with a machine of a wider ISA: its build is in the cache, but this CPU (here made to
    look AVX2-only) gets a build of its own, and the scan runs on it correctly instead of faulting."""
    if 'avx2' not in cpu_kernel.supported_isas():
        pytest.skip('needs a CPU with AVX2')
    monkeypatch.delenv(cpu_kernel.ISA_ENV_VAR, raising=False)
    cache = tmp_path / 'timm_rsmamba' / 'kernels'
    cache.mkdir(parents=True)
    wide = cache / 'mamba_cpu-avx512-0123456789abcdef.so'  # what the other machine left there
    wide.write_text('a library with AVX-512 instructions')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    _cpu(monkeypatch, AVX2_ONLY)
    kernels = _fresh_kernels(monkeypatch)
    x = make_inputs(2, 20, 33, 16)
    torch.testing.assert_close(selective_scan_cpu_kernel(**x, delta_softplus=True),
                               selective_scan_reference(**x, delta_softplus=True), rtol=1e-5, atol=1e-5)
    assert kernels.isa == 'avx2' and kernels.path.parent == cache and kernels.path != wide
    assert 'vec_bytes=32 ' in kernels.build_info()


def test_no_compiler_runs_pure_pytorch_with_one_warning(monkeypatch):
    """No C++ compiler: scan and conv, forward and backward, run pure PyTorch, eagerly (torch.compile would need a
    compiler too), after a single warning that says how to get the fast kernels."""
    _fresh_kernels(monkeypatch)
    monkeypatch.setattr(cpu_kernel, '_find_compiler', lambda: None)
    monkeypatch.setattr(scan_module, 'MIN_COMPILE_ELEMENTS', 0)  # would compile if it tried
    monkeypatch.setattr(conv_module, 'MIN_COMPILE_ELEMENTS', 0)
    for module, name in ((scan_module, '_CHUNK_KERNELS'), (conv_module, '_CONV_KERNELS')):
        used = getattr(module, name)  # not compiled yet, whatever ran before
        monkeypatch.setattr(module, name, CompiledKernels(used.owner, used.options, **used.eager))
    x = {k: (v.requires_grad_() if v is not None else None) for k, v in make_inputs(2, 6, 17, 4).items()}
    xc, w = torch.randn(2, 6, 9, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y = selective_scan_cpu_kernel(**x, delta_softplus=True)
        y.sum().backward()
        out = causal_conv1d_cpu_kernel(xc, w, None, 'silu')
        out.sum().backward()
        selective_scan_cpu_kernel(**x, delta_softplus=True)
    messages = [str(c.message) for c in caught]
    assert len(messages) == 1, messages
    assert 'no C++ compiler found' in messages[0] and 'apt install g++' in messages[0]
    torch.testing.assert_close(y, selective_scan_reference(**x, delta_softplus=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, causal_conv1d_reference(xc, w, None, 'silu'))
    assert scan_module._CHUNK_KERNELS._compiled is None and conv_module._CONV_KERNELS._compiled is None


def test_training_on_cpu_imports_no_cpp_extension():
    """The kernels build without torch.utils.cpp_extension: no 'No CUDA runtime is found' warning at import."""
    code = textwrap.dedent('''
        import sys, torch, timm, timm_rsmamba
        model = timm.create_model('rsmamba_small', num_classes=3, img_size=32, depth=2, embed_dim=32,
                                  intermediate_size=64)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert model.blocks[0].mixer.backend_names() == ('cpu_kernel', 'cpu_kernel')
        assert timm_rsmamba.ops.cpu_kernel.CPU_KERNELS.library is not None
        print('cpp_extension' if 'torch.utils.cpp_extension' in sys.modules else 'clean')
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'clean' and 'No CUDA runtime' not in done.stderr


def test_build_prints_one_progress_line(tmp_path, capfd):
    compiler, _ = _fake_compiler(tmp_path)
    cpu_kernel.build_library('generic', compiler, tmp_path / 'cache')
    err = capfd.readouterr().err
    assert err.count('\n') == 1 and 'building the C++ CPU kernels for generic (once per machine) ... done in' in err
