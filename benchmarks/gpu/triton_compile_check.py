#!/usr/bin/env python3
"""Compile every Triton kernel of the scan and the conv for a GPU target without a GPU, and print their
registers and spills (ptxas comes with triton). The mixer's specialisation (bf16 activations, unit channel
strides, 16-byte aligned pointers) and the ops' other flag combinations, so a compile error shows on any
machine, before a GPU session. tests/test_triton.py runs it; the interpreter that tests use cannot run it (it
would not compile anything), so call it without TRITON_INTERPRET.

    python benchmarks/gpu/triton_compile_check.py [--arch 90]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

# activations (bf16 under autocast); every other pointer is fp32, the order index int64
ACTIVATIONS = {'u_ptr', 'delta_ptr', 'B_ptr', 'C_ptr', 'z_ptr', 'out_ptr', 'dout_ptr', 'du_ptr', 'ddelta_ptr',
               'dz_ptr', 'x_ptr', 'dx_ptr'}
# strides that are 1 in the mixer's layout: the JIT specialises them as constants, as here
UNIT_STRIDES = {'s_u_d', 's_dt_d', 's_g_d', 's_o_d', 's_z_d', 's_a_n', 's_B_n', 's_C_n', 's_x_d', 's_w_k', 's_dx_d',
                's_ord_p'}


def compile_kernel(kernel, constexprs, num_warps, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    constexprs = dict(constexprs, **{k: 1 for k in UNIT_STRIDES if k in names})
    pointer = lambda n: '*i64' if n == 'order_ptr' else '*bf16' if n in ACTIVATIONS else '*fp32'  # noqa: E731
    signature = {n: 'constexpr' if n in constexprs else pointer(n) if n.endswith('_ptr') else 'i32' for n in names}
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(names) if n.endswith('_ptr')}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=dict(num_warps=num_warps))


def resource_usage(compiled) -> str:
    """REG / STACK (spills) / SHARED of a compiled kernel, from cuobjdump (bundled with triton)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        out = subprocess.run([tool, '-res-usage', f.name], capture_output=True, text=True).stdout
    return ' '.join(line.strip().split(' CONSTANT')[0] for line in out.splitlines() if 'REG:' in line)


def kernels_to_check():
    """(name, kernel, constexprs, num_warps): the defaults of the module constants, every flag the ops set."""
    from timm_rsmamba.ops import triton_conv as tc
    from timm_rsmamba.ops import triton_scan as ts
    mixer = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
    bare = dict(HAS_D=False, HAS_Z=False, HAS_BIAS=False, SOFTPLUS=False, Z_ORDERED=False)
    scan_fwd = dict(CHUNK=ts.CHUNK, BLOCK_D=ts.FWD_BLOCK_D, BLOCK_S=16)
    scan_bwd = dict(CHUNK=ts.CHUNK, BLOCK_D=ts.BWD_BLOCK_D, BLOCK_S=16)
    conv = dict(KERNEL=4, HAS_BIAS=True, SILU=True, BLOCK_D=tc.BLOCK_D)
    for ordered in (True, False):
        yield (f'scan fwd, training (z ordered: {ordered})', ts._scan_fwd_kernel,
               dict(mixer, Z_ORDERED=ordered, SAVE_STATES=True, WANT_LAST=False, **scan_fwd), ts.FWD_WARPS)
        yield (f'scan bwd (z ordered: {ordered})', ts._scan_bwd_kernel, dict(mixer, Z_ORDERED=ordered, **scan_bwd),
               ts.BWD_WARPS)
        yield (f'conv fwd (ordered: {ordered})', tc._conv_fwd_kernel, dict(conv, ORDERED=ordered, BLOCK_L=tc.BLOCK_L),
               4)
        yield (f'conv bwd (ordered: {ordered})', tc._conv_bwd_kernel,
               dict(conv, ORDERED=ordered, BLOCK_L=tc.BWD_BLOCK_L, BLOCK_K=4), 4)
    yield ('scan fwd, eval', ts._scan_fwd_kernel,
           dict(mixer, Z_ORDERED=True, SAVE_STATES=False, WANT_LAST=False, **scan_fwd), ts.FWD_WARPS)
    yield ('scan fwd, no z / D / bias, last state', ts._scan_fwd_kernel,
           dict(bare, SAVE_STATES=True, WANT_LAST=True, **scan_fwd), ts.FWD_WARPS)
    yield 'scan bwd, no z / D / bias', ts._scan_bwd_kernel, dict(bare, **scan_bwd), ts.BWD_WARPS
    yield ('conv bwd, no bias / activation', tc._conv_bwd_kernel,
           dict(conv, HAS_BIAS=False, SILU=False, ORDERED=False, BLOCK_L=tc.BWD_BLOCK_L, BLOCK_K=4), 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', type=int, default=90, help='compute capability x 10 (90: H100 / H200)')
    args = parser.parse_args()
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        sys.exit('unset TRITON_INTERPRET: the interpreter compiles nothing')
    total = 0.
    for name, kernel, constexprs, warps in kernels_to_check():
        start = time.perf_counter()
        compiled = compile_kernel(kernel, constexprs, warps, args.arch)
        seconds = time.perf_counter() - start
        total += seconds
        print(f'{name}: compiled for sm_{args.arch} in {seconds:.1f} s, {warps} warps, {resource_usage(compiled)}')
    print(f'all kernels compiled in {total:.1f} s')


if __name__ == '__main__':
    main()
