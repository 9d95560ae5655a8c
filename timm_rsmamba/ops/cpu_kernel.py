"""The C++ CPU kernels of the scan and the conv (csrc/mamba_cpu.cpp), as torch.library custom ops.

The source needs no torch headers: the system C++ compiler builds it in a few seconds into a shared library
that ctypes loads (ctypes releases the GIL during each call). It is built once per machine and cached under
``$XDG_CACHE_HOME/timm_rsmamba/kernels`` (``~/.cache/...``), keyed by the source, the compiler and its
version, the flags and the ISA, so an edit, a new compiler or another CPU each get their own build and a
shared home directory never hands a CPU a library with instructions it lacks. The ISA is the best one this
CPU runs (``RSMAMBA_CPU_ISA=avx512|avx2|neon|generic`` picks another it also runs); each sets the vector
width and the register blocking of the scan (`ISAS`).

Each kernel is a custom op (``torch.ops.rsmamba.*``) with a fake implementation and, for the forwards, an
autograd formula whose backward is itself a custom op, so torch.compile traces models through them whole.
Where no library can be built (no compiler, a failed build), `CPU_KERNELS.load()` returns None after one
warning that says why, and the callers in scan.py and conv.py run pure PyTorch instead.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .token_orders import sum_path_planes

_SOURCE = Path(__file__).parent / 'csrc' / 'mamba_cpu.cpp'
ISA_ENV_VAR = 'RSMAMBA_CPU_ISA'
MAX_CONV_TAPS = 8  # kMaxTaps of the source: the conv backward keeps one register per tap


@dataclass(frozen=True)
class Isa:
    """How to build for one instruction set: compiler flags, the CPU features they need (/proc/cpuinfo names),
    the vector width, and the states the scan keeps in registers at once (forward and re-compute, adjoint)."""
    flags: Tuple[str, ...]
    cpu_features: Tuple[str, ...]
    vec_bytes: int
    state_group: int
    adjoint_group: int


# Register blocking per ISA, measured on a 2-core Xeon (Sapphire Rapids) with the AVX-512 and the AVX2 build
# (docs/performance-cpu.md): all 16 states in registers for the forward and the re-computation, even on
# AVX2, whose 16 registers then spill a few (cheaper than re-reading delta, delta u and y per group of 8:
# 10% faster); 8 states per pass in the adjoint, which keeps two vectors per state (9% faster than 16).
ISAS: Dict[str, Isa] = {
    'avx512': Isa(('-mavx512f', '-mavx512dq', '-mavx512vl', '-mavx512bw', '-mavx2', '-mfma'),
                  ('avx512f', 'avx512dq', 'avx512vl', 'avx512bw', 'avx2', 'fma'), 64, 16, 8),
    'avx2': Isa(('-mavx2', '-mfma'), ('avx2', 'fma'), 32, 16, 8),
    'neon': Isa((), (), 16, 16, 8),  # every aarch64 CPU has NEON (32 vector registers)
    'generic': Isa((), (), 16, 16, 8),  # what the compiler makes of 16-byte vectors (SSE2 on x86-64)
}


def _cpu_features() -> Optional[set]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), else None."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return None


def supported_isas() -> List[str]:
    """The ISAs this CPU runs, best first."""
    machine = platform.machine().lower()
    if machine in ('aarch64', 'arm64'):
        return ['neon', 'generic']
    if machine not in ('x86_64', 'amd64', 'x64'):
        return ['generic']
    features = _cpu_features()
    if features is None:  # no /proc/cpuinfo (macOS, Windows): what torch detected
        capability = torch.backends.cpu.get_cpu_capability()
        features = set(ISAS['avx512'].cpu_features if capability.startswith('AVX512') else
                       ISAS['avx2'].cpu_features if capability == 'AVX2' else ())
    return [name for name in ('avx512', 'avx2') if features.issuperset(ISAS[name].cpu_features)] + ['generic']


def select_isa() -> str:
    """The best ISA of this CPU, or the one $RSMAMBA_CPU_ISA names if this CPU runs it (else a warning)."""
    supported = supported_isas()
    wanted = os.environ.get(ISA_ENV_VAR, '').strip().lower()
    if wanted and wanted not in supported:
        warnings.warn(f'${ISA_ENV_VAR}={wanted!r}: this CPU runs {", ".join(supported)} (choose one of those); '
                      f'building the C++ kernels for {supported[0]}')
    return wanted if wanted in supported else supported[0]


def _find_compiler() -> Optional[str]:
    for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(root) / 'timm_rsmamba' / 'kernels'


def build_flags(isa: str) -> List[str]:
    spec = ISAS[isa]
    # contraction into FMAs is what keeps the exp's fraction exact (see the source)
    return ['-O3', '-std=c++17', '-shared', '-fPIC', '-pthread', '-ffp-contract=fast',
            f'-DRSM_VEC_BYTES={spec.vec_bytes}', f'-DRSM_STATE_GROUP={spec.state_group}',
            f'-DRSM_ADJOINT_GROUP={spec.adjoint_group}', *spec.flags]


class _FileLock:
    """An exclusive lock on a file (fcntl; none where fcntl is missing: the build is still atomic)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self):
        self.file = open(self.path, 'a')
        try:
            import fcntl
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def build_library(isa: str, compiler: str, cache_dir: Path) -> Path:
    """The library for ``isa``: from the cache, else compiled into it (once, even with concurrent callers)."""
    flags = build_flags(isa)
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b'\0'.join(
        [_SOURCE.read_bytes(), compiler.encode(), version.encode(), ' '.join(flags).encode(),
         isa.encode(), platform.machine().encode()])).hexdigest()[:16]
    path = cache_dir / f'mamba_cpu-{isa}-{key}.so'
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _FileLock(path.with_suffix('.lock')):
        if path.exists():  # another process built it while this one waited
            return path
        work = Path(tempfile.mkdtemp(prefix=path.stem + '.', dir=cache_dir))
        try:
            sys.stderr.write(f'timm_rsmamba: building the C++ CPU kernels for {isa} (once per machine) ... ')
            sys.stderr.flush()
            start = time.time()
            error = _compile_and_link(compiler, flags, work, work / path.name)
            sys.stderr.write(f'{"failed" if error else "done"} in {time.time() - start:.1f} s\n')
            if error:
                raise RuntimeError(f'{Path(compiler).name} failed: {error}')
            os.replace(work / path.name, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


def _compile_and_link(compiler: str, flags: List[str], work: Path, library: Path) -> Optional[str]:
    """Compiles the source's two parts (float32, float64: RSM_PART) at once, then links them into ``library``;
    returns the first line of the compiler's first error, or None."""
    compile_flags = [f for f in flags if f != '-shared']
    objects = [str(work / f'part{part}.o') for part in (1, 2)]
    compiles = [subprocess.Popen([compiler, *compile_flags, f'-DRSM_PART={part}', '-c', '-o', obj, str(_SOURCE)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for part, obj in zip((1, 2), objects)]
    for done in compiles:
        stderr = done.communicate()[1]
        if done.returncode != 0:
            for other in compiles:
                other.kill()
                other.communicate()
            return _first_line(stderr)
    done = subprocess.run([compiler, '-shared', '-pthread', '-o', str(library), *objects],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else _first_line(done.stderr)


def _first_line(stderr: str) -> str:
    return (stderr.strip().splitlines() or ['?'])[0]


class _ScanArgs(ctypes.Structure):
    """struct rsm_scan_args of the source: pointers and int64s only, so no padding to mirror."""
    _fields_ = ([(k, ctypes.c_void_p) for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')] +
                [(k, ctypes.c_int64) for k in ('u_t', 'u_b', 'delta_t', 'delta_b', 'z_t', 'z_b', 'B_t', 'B_b',
                                               'C_t', 'C_b', 'A_d', 'A_s', 'length', 'batch', 'dim', 'n_state',
                                               'chunk_len', 'softplus', 'threads')] +
                [(k, ctypes.c_void_p) for k in ('out', 'starts', 'last', 'dout', 'dlast')] +
                [(k, ctypes.c_int64) for k in ('dout_t', 'dout_b')] +
                [(k, ctypes.c_void_p) for k in ('du', 'ddelta', 'dz', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias',
                                                'z_rows', 'out_rows', 'dz_rows', 'delta_proj')] +
                [('rank', ctypes.c_int64), ('ddelta_proj', ctypes.c_void_p), ('out_sums', ctypes.c_void_p),
                 ('dout_sums', ctypes.c_void_p)])


class _ConvArgs(ctypes.Structure):
    """struct rsm_conv_args of the source."""
    _fields_ = ([(k, ctypes.c_void_p) for k in ('x', 'weight', 'bias', 'dout')] +
                [(k, ctypes.c_int64) for k in ('x_t', 'x_b', 'dout_t', 'dout_b', 'w_d', 'w_k', 'length', 'batch',
                                               'dim', 'taps', 'silu', 'threads')] +
                [(k, ctypes.c_void_p) for k in ('out', 'dx', 'dweight', 'dbias', 'x_rows', 'dx_rows')])


_ENTRY_POINTS = {'rsm_scan_forward': _ScanArgs, 'rsm_scan_backward': _ScanArgs,
                 'rsm_conv_forward': _ConvArgs, 'rsm_conv_backward': _ConvArgs}


def _openmp_entry() -> Optional[int]:
    """GOMP_parallel of the OpenMP runtime torch runs its threads with, if it is loaded; the kernels then run
    on those threads instead of starting their own, which would compete with them for the cores."""
    try:
        return ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None


class _CpuKernels:
    """The loaded library, built on first use; ``error`` says why there is none (then ``load`` is None)."""

    def __init__(self):
        self.library: Optional[ctypes.CDLL] = None
        self.path: Optional[Path] = None
        self.isa: Optional[str] = None
        self.error: Optional[str] = None
        self.compiler_found = True

    def load(self) -> Optional[ctypes.CDLL]:
        if self.library is None and self.error is None:
            isa = select_isa()
            compiler = _find_compiler()
            if compiler is None:
                self.compiler_found = False
                self.error = 'no C++ compiler found ($CXX, c++, g++, clang++)'
                warnings.warn(f"timm_rsmamba: {self.error}, so the CPU scan and conv run in pure PyTorch, several "
                              f"times slower. Install one for the fast C++ kernels (Debian/Ubuntu: apt install g++; "
                              f"Fedora: dnf install gcc-c++; macOS: xcode-select --install; conda: conda install "
                              f"cxx-compiler); they build on first use in a few seconds.")
                return None
            try:
                path = build_library(isa, compiler, _cache_dir())
                library = ctypes.CDLL(str(path))
                for name, args in _ENTRY_POINTS.items():
                    for dtype in ('f32', 'f64'):
                        fn = getattr(library, f'{name}_{dtype}')
                        fn.argtypes, fn.restype = [ctypes.POINTER(args)], ctypes.c_int
                library.rsm_build_info.restype = ctypes.c_char_p
                library.rsm_use_openmp.argtypes = [ctypes.c_void_p]
                library.rsm_row_offsets.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 7, ctypes.c_void_p]
                library.rsm_row_offsets.restype = ctypes.c_int
                library.rsm_use_openmp(_openmp_entry())
            except Exception as e:  # a build failure must never break the model: pure PyTorch runs instead
                self.error = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
                warnings.warn(f"timm_rsmamba: building the C++ CPU kernels ({_SOURCE.name}) failed ({self.error}); "
                              f"running the torch.compile'd pure-PyTorch scan and conv instead")
                return None
            self.library, self.path, self.isa = library, path, isa
        return self.library

    def build_info(self) -> str:
        """e.g. 'avx512 (vec_bytes=64 state_group=16 adjoint_group=8)', or why there is no build."""
        if self.load() is None:
            return f'none ({self.error})'
        return f'{self.isa} ({self.library.rsm_build_info().decode()})'


CPU_KERNELS = _CpuKernels()


@torch.compiler.assume_constant_result
def cpu_kernels_available() -> bool:
    """Whether the C++ kernels run here (built, or buildable now); torch.compile treats it as a constant."""
    return CPU_KERNELS.load() is not None


def _library() -> ctypes.CDLL:
    library = CPU_KERNELS.load()
    if library is None:
        raise RuntimeError(f'the C++ CPU kernels are not available: {CPU_KERNELS.error}')
    return library


def _call(name: str, tensor: Tensor, args) -> None:
    suffix = {torch.float32: 'f32', torch.float64: 'f64'}[tensor.dtype]
    if getattr(_library(), f'{name}_{suffix}')(ctypes.byref(args)) != 0:
        raise RuntimeError(f'{name}: the C++ kernel failed (out of memory, or no thread could be started)')


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _unit_last_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _check_dtypes(name: str, *tensors: Optional[Tensor]) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        raise TypeError(f'{name}: all tensors must be float32, or all float64; got {sorted(map(str, dtypes))}')


def _chunks(length: int, chunk_len: int) -> int:
    return (length + chunk_len - 1) // chunk_len


def _check_order(name: str, source: Tensor, order: Optional[Tensor]) -> None:
    """An (L, paths) int64 index of positions of ``source`` (L, B, C): the kernels read through it unchecked
    (its values are checked as `_row_offsets` makes the rows)."""
    if order is None:
        return
    if order.dtype != torch.int64 or order.dim() != 2 or order.shape[0] != source.shape[0]:
        raise ValueError(f'{name}: want an int64 token-order index of shape (L, paths) with L = {source.shape[0]}, '
                         f'got {order.dtype} {tuple(order.shape)}')


def _row_offsets(name: str, tensor: Tensor, order: Tensor, per_path: bool = False,
                 permutation: bool = False) -> Tensor:
    """(L, paths * B) element offsets, for every position l and sequence p * B + b, of row order[l, p] of
    sequence b of ``tensor`` (L, B, C): what the kernels read through instead of a gathered copy. ``per_path``:
    of sequence b of path p of ``tensor`` (L, paths, B, C) instead (any strides), where a kernel puts each path's
    rows back in token order. The library makes them, and refuses an index outside the L positions or, with
    ``permutation``, a column of ``order`` that is not a permutation of them."""
    if per_path:
        batch, t_stride, p_stride, b_stride = tensor.shape[2], tensor.stride(0), tensor.stride(1), tensor.stride(2)
    else:
        batch, t_stride, p_stride, b_stride = tensor.shape[1], tensor.stride(0), 0, tensor.stride(1)
    order = order.contiguous()
    length, paths = order.shape
    rows = torch.empty(length, paths * batch, dtype=torch.int64, device=order.device)
    error = _library().rsm_row_offsets(_ptr(order), length, paths, batch, t_stride, p_stride, b_stride,
                                       int(permutation), _ptr(rows))
    if error == 1:
        raise ValueError(f'{name}: token-order index out of range [0, {length})')
    if error == 2:  # else rows of out would go unwritten
        raise ValueError(f'{name}: every column of out_order must be a permutation of the {length} positions')
    if error:
        raise RuntimeError(f'{name}: out of memory making the row offsets of the token orders')
    return rows


def _path_planes_shape(source: Tensor, order: Optional[Tensor]) -> Tuple[int, ...]:
    """The shape of a gradient of ``source`` (L, B, C) read through ``order``: one plane per path, (paths, L, B, C)
    (without an order, the source's own shape)."""
    return tuple(source.shape) if order is None else (order.shape[1], *source.shape)


def _plane_rows(name: str, planes: Tensor, order: Optional[Tensor]) -> Optional[Tensor]:
    """The rows a kernel writes sequence p * B + b of a per-path gradient through: plane p of ``planes``
    (paths, L, B, C), back in the source's order. The planes then add up to the source's gradient with no
    gather (`sum_path_planes`)."""
    return None if order is None else _row_offsets(name, planes.transpose(0, 1), order, per_path=True)


def _sequences(source: Tensor, order: Optional[Tensor]) -> int:
    return source.shape[1] * (order.shape[1] if order is not None else 1)


# ---- the scan ------------------------------------------------------------------------------------------------


def _scan_args(u, delta, A, B, C, D, z, delta_bias, softplus: bool, chunk_len: int, z_rows,
               delta_proj) -> _ScanArgs:
    length, batch, dim = u.shape
    zz = z if z is not None else u  # strides only; the null pointer says there is no z
    return _ScanArgs(
        u=_ptr(u), delta=_ptr(delta), A=_ptr(A), B=_ptr(B), C=_ptr(C), D=_ptr(D), z=_ptr(z), z_rows=_ptr(z_rows),
        delta_bias=_ptr(delta_bias), u_t=u.stride(0), u_b=u.stride(1), delta_t=delta.stride(0),
        delta_b=delta.stride(1), z_t=zz.stride(0), z_b=zz.stride(1), B_t=B.stride(0), B_b=B.stride(1),
        C_t=C.stride(0), C_b=C.stride(1), A_d=A.stride(0), A_s=A.stride(1), length=length, batch=batch, dim=dim,
        n_state=A.shape[1], chunk_len=chunk_len, softplus=int(softplus), threads=torch.get_num_threads(),
        delta_proj=_ptr(delta_proj), rank=0 if delta_proj is None else delta_proj.shape[1])


def _scan_inputs(u, delta, A, B, C, D, z, delta_bias, z_order, delta_proj):
    """The inputs as the kernel reads them, and z's row offsets (None without ``z_order``)."""
    if u.dim() != 3 or B.shape != C.shape or B.shape[:2] != u.shape[:2] or A.shape != (u.shape[2], B.shape[2]):
        raise ValueError(f'selective_scan_fwd: want u, delta, z (L, batch, dim), B, C (L, batch, state), '
                         f'A (dim, state); got u {tuple(u.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}')
    if delta_proj is None and delta.shape != u.shape:
        raise ValueError(f'selective_scan_fwd: delta {tuple(delta.shape)} does not match u {tuple(u.shape)}')
    if delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != u.shape[2]
                                   or delta.shape != (*u.shape[:2], delta_proj.shape[1])):
        raise ValueError(f'selective_scan_fwd: with delta_proj (dim, rank), delta is the low-rank dt (L, batch, '
                         f'rank); got delta_proj {tuple(delta_proj.shape)}, delta {tuple(delta.shape)}, '
                         f'u {tuple(u.shape)}')
    _check_dtypes('selective_scan_fwd', u, delta, A, B, C, D, z, delta_bias, delta_proj)
    if z is not None and (z.dim() != 3 or (z.shape[0], _sequences(z, z_order), z.shape[2]) != tuple(u.shape)):
        raise ValueError(f'selective_scan_fwd: z {tuple(z.shape)} does not match u {tuple(u.shape)}'
                         + (f' read in {z_order.shape[1]} token orders' if z_order is not None else ''))
    if z is not None:
        _check_order('selective_scan_fwd', z, z_order)
    u, delta, B, C, z = (_unit_last_stride(t) for t in (u, delta, B, C, z))
    D, delta_bias, delta_proj = (None if t is None else t.contiguous() for t in (D, delta_bias, delta_proj))
    z_rows = (_row_offsets('selective_scan_fwd', z, z_order) if z is not None and z_order is not None
              else None)  # kept by the caller
    return (u, delta, A, B, C, D, z, delta_bias, delta_proj), z_rows


@torch.library.custom_op('rsmamba::cpu_selective_scan_fwd', mutates_args=(), device_types='cpu')
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool, chunk_len: int,
                       save_starts: bool, z_order: Optional[Tensor] = None, out_order: Optional[Tensor] = None,
                       delta_proj: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The scan on time-major tensors: u, delta, z (L, batch, dim); B, C (L, batch, state); A (dim, state).
    With ``z_order`` (L, paths), z is the source (L, batch / paths, dim) read in those token orders. With
    ``out_order`` (L, paths), sequence p * (batch / paths) + b of out is put back in token order: its position
    l is written to row out_order[l, p]. With ``delta_proj`` (dim, rank), delta is the low-rank dt (L, batch,
    rank) that the kernel projects itself: delta = dt delta_proj^T.

    Returns out (L, batch, dim), the state at each chunk start (chunks, batch, dim * state) (empty unless
    ``save_starts``: what the backward re-computes from, in the kernels' own order), the last state
    (state, batch, dim), and out summed over the positions (batch, dim), as the kernel wrote out.
    """
    (u, delta, A, B, C, D, z, delta_bias, delta_proj), z_rows = _scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, z_order, delta_proj)
    out, starts, last, out_sums = _scan_outputs(u, A, chunk_len, save_starts)
    out_rows = _out_rows('selective_scan_fwd', out, out_order)
    args = _scan_args(u, delta, A, B, C, D, z, delta_bias, softplus, chunk_len, z_rows, delta_proj)
    args.out, args.starts, args.last = _ptr(out), _ptr(starts) if save_starts else None, _ptr(last)
    args.out_rows, args.out_sums = _ptr(out_rows), _ptr(out_sums)
    _call('rsm_scan_forward', u, args)
    return out, starts, last, out_sums


def _out_rows(name: str, target: Tensor, out_order: Optional[Tensor]) -> Optional[Tensor]:
    if out_order is None:
        return None
    _check_order(name, target, out_order)
    if target.shape[1] % out_order.shape[1]:
        raise ValueError(f'{name}: {target.shape[1]} sequences do not split into the {out_order.shape[1]} paths '
                         f'of out_order')
    return _row_offsets(name, target.unflatten(1, (out_order.shape[1], -1)), out_order, per_path=True,
                        permutation=True)


def _starts_shape(length: int, batch: int, dim: int, n: int, chunk_len: int) -> Tuple[int, ...]:
    # each sequence's states of a chunk start in one row, each block of channels' states side by side (see the
    # source's Scan::chunk_start): the forward writes and the backward reads them a block at a time
    return _chunks(length, chunk_len), batch, dim * n


def _scan_outputs(u, A, chunk_len: int, save_starts: bool):
    length, batch, dim = u.shape
    n = A.shape[1]
    starts = u.new_empty(_starts_shape(length, batch, dim, n, chunk_len)) if save_starts else u.new_empty(0)
    return u.new_empty(length, batch, dim), starts, u.new_empty(n, batch, dim), u.new_empty(batch, dim)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, chunk_len, save_starts, z_order=None, out_order=None,
      delta_proj=None):
    return _scan_outputs(u, A, chunk_len, save_starts)


@torch.library.custom_op('rsmamba::cpu_selective_scan_bwd', mutates_args=(), device_types='cpu')
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], starts: Tensor, dout: Tensor,
                       dlast: Optional[Tensor], softplus: bool, chunk_len: int, z_order: Optional[Tensor] = None,
                       out_order: Optional[Tensor] = None, delta_proj: Optional[Tensor] = None,
                       dout_sums: Optional[Tensor] = None) -> List[Tensor]:
    """Gradients of `selective_scan_fwd` from its saved chunk-start states: du, ddelta, dA, dB, dC, dD, dz,
    d(delta_bias), d(delta_proj); those of absent inputs (D, z, delta_bias, delta_proj) are empty. ``dlast``: the
    last state's gradient. With ``delta_proj``, ddelta is that of the low-rank dt (the kernel sums both
    projections' gradients itself; d(delta) is never written).
    With ``z_order``, dz is per token order, each back in the source's order: (paths, L, batch / paths, dim), a
    plane per path; summing them is autograd's step. With ``out_order``, dout is in token order as the
    forward's out was, and read through it. ``dout_sums`` (batch, dim): the gradient of the forward's sums of
    out over the positions, added to dout at every position."""
    (u, delta, A, B, C, D, z, delta_bias, delta_proj), z_rows = _scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, z_order, delta_proj)
    expected = _starts_shape(*u.shape, A.shape[1], chunk_len)
    if tuple(starts.shape) != expected:
        raise ValueError(f'selective_scan_bwd: chunk-start states of shape {expected} needed, got '
                         f'{tuple(starts.shape)} (run the forward with save_starts=True)')
    grads = _scan_grads(u, delta, A, B, D, z, delta_bias, z_order, delta_proj)
    dz_rows = _plane_rows('selective_scan_bwd', grads[6], z_order) if z is not None else None
    dout, starts = _unit_last_stride(dout), starts.contiguous()
    dlast = None if dlast is None else dlast.contiguous()
    if dout_sums is not None and tuple(dout_sums.shape) != tuple(u.shape[1:]):
        raise ValueError(f'selective_scan_bwd: dout_sums (batch, dim) = {tuple(u.shape[1:])} needed, got '
                         f'{tuple(dout_sums.shape)}')
    dout_sums = None if dout_sums is None else dout_sums.contiguous()
    args = _scan_args(u, delta, A, B, C, D, z, delta_bias, softplus, chunk_len, z_rows, delta_proj)
    dout_rows = _out_rows('selective_scan_bwd', dout, out_order)
    args.starts, args.dout, args.dlast, args.out_rows = _ptr(starts), _ptr(dout), _ptr(dlast), _ptr(dout_rows)
    args.dz_rows, args.dout_sums = _ptr(dz_rows), _ptr(dout_sums)
    args.dout_t, args.dout_b = dout.stride(0), dout.stride(1)
    for name, g, given in zip(('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dz', 'ddelta_bias', 'ddelta_proj'), grads,
                              (u, u, A, B, C, D, z, delta_bias, delta_proj)):
        setattr(args, name, _ptr(g) if given is not None else None)
    _call('rsm_scan_backward', u, args)
    return grads


def _scan_grads(u, delta, A, B, D, z, delta_bias, z_order, delta_proj) -> List[Tensor]:
    def like(t, shape):
        return u.new_empty(shape if t is not None else (0,))
    dz_shape = _path_planes_shape(z, z_order) if z is not None else None
    return [u.new_empty(u.shape), u.new_empty(delta.shape), u.new_empty(A.shape), u.new_empty(B.shape),
            u.new_empty(B.shape), like(D, u.shape[2:]), like(z, dz_shape), like(delta_bias, u.shape[2:]),
            like(delta_proj, None if delta_proj is None else delta_proj.shape)]


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, starts, dout, dlast, softplus, chunk_len, z_order=None, out_order=None,
      delta_proj=None, dout_sums=None):
    return _scan_grads(u, delta, A, B, D, z, delta_bias, z_order, delta_proj)


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, chunk_len, _, z_order, out_order, delta_proj = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1], z_order, out_order, delta_proj)
    ctx.softplus, ctx.chunk_len = softplus, chunk_len
    # the chunk-start states are the backward's own, and the last state and the sums are often unused: autograd
    # would hand the backward zeros of their shapes (filling 29 MB per block for the states: rsmamba_base, batch 8)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dout, _dstarts, dlast, dout_sums):
    u, delta, A, B, C, D, z, delta_bias, starts, z_order, out_order, delta_proj = ctx.saved_tensors
    if dout is None:  # only the last state or the sums reached the loss
        dout = u.new_zeros(u.shape)
    grads = selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, starts, dout, dlast, ctx.softplus,
                               ctx.chunk_len, z_order, out_order, delta_proj, dout_sums)
    du, ddelta, dA, dB, dC, dD, dz, d_bias, d_proj = grads
    if z is not None and z_order is not None:
        dz = sum_path_planes(dz)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            d_bias if delta_bias is not None else None, None, None, None, None, None,
            d_proj if delta_proj is not None else None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# ---- the conv ------------------------------------------------------------------------------------------------


def _conv_args(x, weight, bias, silu: bool, order, x_rows) -> _ConvArgs:
    length, _, dim = x.shape
    return _ConvArgs(x=_ptr(x), weight=_ptr(weight), bias=_ptr(bias), x_t=x.stride(0), x_b=x.stride(1),
                     w_d=weight.stride(0), w_k=weight.stride(1), length=length, batch=_sequences(x, order),
                     dim=dim, taps=weight.shape[1], silu=int(silu), threads=torch.get_num_threads(),
                     x_rows=_ptr(x_rows))


def _conv_inputs(x, weight, bias, order):
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f'causal_conv1d: want x (L, batch, dim) and weight (dim, taps); got x {tuple(x.shape)}, '
                         f'weight {tuple(weight.shape)}')
    if weight.shape[1] > MAX_CONV_TAPS:
        raise ValueError(f'causal_conv1d: at most {MAX_CONV_TAPS} taps, got {weight.shape[1]}')
    _check_dtypes('causal_conv1d', x, weight, bias)
    _check_order('causal_conv1d', x, order)
    x = _unit_last_stride(x)
    x_rows = _row_offsets('causal_conv1d', x, order) if order is not None else None  # kept by the caller
    return x, weight, None if bias is None else bias.contiguous(), x_rows


def _conv_output(x, order):
    return x.new_empty(x.shape[0], _sequences(x, order), x.shape[2])


@torch.library.custom_op('rsmamba::cpu_causal_conv1d_fwd', mutates_args=(), device_types='cpu')
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                      order: Optional[Tensor] = None) -> Tensor:
    """Causal depthwise conv (+ SiLU) of a time-major tensor x (L, batch, dim); weight (dim, taps). With
    ``order`` (L, paths), x is read in those token orders: the output is (L, paths * batch, dim)."""
    x, weight, bias, x_rows = _conv_inputs(x, weight, bias, order)
    out = _conv_output(x, order)
    args = _conv_args(x, weight, bias, silu, order, x_rows)
    args.out = _ptr(out)
    _call('rsm_conv_forward', x, args)
    return out


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu, order=None):
    return _conv_output(x, order)


@torch.library.custom_op('rsmamba::cpu_causal_conv1d_bwd', mutates_args=(), device_types='cpu')
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor,
                      silu: bool, order: Optional[Tensor] = None) -> List[Tensor]:
    """dx, dweight and dbias (empty without a bias) of `causal_conv1d_fwd`, the pre-activation re-computed.
    With ``order``, dx is per token order, each back in x's order: (paths, L, batch, dim), a plane per path;
    summing them is autograd's step."""
    x, weight, bias, x_rows = _conv_inputs(x, weight, bias, order)
    dout = _unit_last_stride(dout)
    grads = _conv_grads(x, weight, bias, order)
    args = _conv_args(x, weight, bias, silu, order, x_rows)
    args.dout, args.dout_t, args.dout_b = _ptr(dout), dout.stride(0), dout.stride(1)
    args.dx, args.dweight, args.dbias = _ptr(grads[0]), _ptr(grads[1]), _ptr(grads[2]) if bias is not None else None
    dx_rows = _plane_rows('causal_conv1d', grads[0], order)
    args.dx_rows = _ptr(dx_rows)
    _call('rsm_conv_backward', x, args)
    return grads


def _conv_grads(x, weight, bias, order) -> List[Tensor]:
    return [x.new_empty(_path_planes_shape(x, order)), x.new_empty(weight.shape),
            x.new_empty(weight.shape[:1] if bias is not None else 0)]


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, dout, silu, order=None):
    return _conv_grads(x, weight, bias, order)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu, order = inputs
    ctx.save_for_backward(x, weight, bias, order)
    ctx.silu = silu


def _conv_backward(ctx, dout):
    x, weight, bias, order = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_bwd(x, weight, bias, dout, ctx.silu, order)
    if order is not None:
        dx = sum_path_planes(dx)
    return dx, dweight, dbias if bias is not None else None, None, None


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)
