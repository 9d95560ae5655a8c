#!/usr/bin/env python3
"""Time the Triton kernels alone at rsmamba_base's shapes, for a few tile configurations, to pick the defaults.

The kernels read their tile sizes from module constants at each call (triton_scan.FWD_BLOCK_D, FWD_WARPS,
BWD_BLOCK_D, BWD_WARPS, CHUNK; triton_conv.BLOCK_L, BWD_BLOCK_L, BLOCK_D), so each configuration below is set, compiled
and timed in turn: the scan forward (inference, no saved states) and backward, the conv forward and backward,
on bf16 (fp32 in a --device cpu dry run) time-major views of (L, sequences, dim) = (784, 3 * batch, 384),
S = 16. The fastest of each goes in the module constants (and docs/gpu-triton.md).

    python benchmarks/gpu/triton_sweep.py [--batch 128] [--json-out sweep.json]
"""
import argparse
import json
import time

import torch

SCAN_FWD = [dict(FWD_BLOCK_D=bd, FWD_WARPS=w) for bd, w in ((32, 4), (16, 2), (64, 4), (32, 8), (64, 8))]
SCAN_BWD = [dict(BWD_BLOCK_D=bd, BWD_WARPS=w, CHUNK=c)
            for bd, w, c in ((16, 8, 128), (16, 4, 128), (8, 4, 128), (16, 8, 64), (8, 8, 256), (32, 8, 64))]
CONV_FWD = [dict(BLOCK_L=bl, BLOCK_D=bd) for bl, bd in ((32, 64), (64, 64), (16, 128), (32, 32))]
CONV_BWD = [dict(BWD_BLOCK_L=bl, BLOCK_D=bd) for bl, bd in ((16, 64), (32, 32), (16, 32), (32, 64))]


def bench(fn, reps, device):
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    fn()  # compile
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=128, help='images; sequences = 3 token orders x batch')
    parser.add_argument('--length', type=int, default=784)
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--device', default='cuda', help='cpu: a dry run in the interpreter (TRITON_INTERPRET=1)')
    parser.add_argument('--json-out', default=None)
    args = parser.parse_args()
    from timm_rsmamba.ops import triton_conv, triton_scan

    seqs, length, dim, state = 3 * args.batch, args.length, args.dim, 16
    bf16 = dict(device=args.device, dtype=torch.bfloat16 if args.device == 'cuda' else torch.float32)

    def channel_major(*shape):  # a (seqs, C, L) view of time-major storage
        return torch.randn(length, seqs, *shape, **bf16).permute(1, 2, 0)

    xdbl = torch.randn(length, seqs, 12 + 2 * state, **bf16)  # x_proj's output: dt, B, C side by side
    B, C = xdbl[..., 12:12 + state].permute(1, 2, 0), xdbl[..., 12 + state:].permute(1, 2, 0)
    u, delta, z = channel_major(dim), channel_major(dim) * 0.1, channel_major(dim)
    A = -torch.rand(dim, state, device=args.device) * 4 - 0.5
    D, bias = torch.randn(dim, device=args.device), torch.randn(dim, device=args.device) * 0.1
    dout = torch.randn(length, seqs, dim, **bf16)
    w, b = torch.randn(dim, 4, device=args.device), torch.randn(dim, device=args.device)
    elements = seqs * dim * length
    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (interpreter)'
    print(f'{device_name}: sequences {seqs}, L {length}, dim {dim}, S {state}, {bf16["dtype"]}')

    results = []

    def run(kind, module, configs, fn, work):
        defaults = {k: getattr(module, k) for k in configs[0]}
        for config in configs:
            for k, v in config.items():
                setattr(module, k, v)
            try:
                ms = bench(fn, args.reps, args.device)
                results.append(dict(kind=kind, config=config, ms=ms))
                print(f'| {kind} | {config} | {ms:.3f} ms | {work / ms / 1e6:.1f} G/s |')
            except Exception as e:  # a config may not fit (registers, shared memory): say so, go on
                results.append(dict(kind=kind, config=config, error=str(e).splitlines()[0][:200]))
                print(f'| {kind} | {config} | failed: {str(e).splitlines()[0][:120]} |')
        for k, v in defaults.items():
            setattr(module, k, v)

    print('| kernel | config | time | throughput (state updates or conv outputs) |\n|---|---|---|---|')
    run('scan fwd (eval)', triton_scan, SCAN_FWD, lambda: triton_scan.selective_scan_fwd(
        u, delta, A, B, C, D, z, bias, None, True, False, False, triton_scan.CHUNK), elements * state)
    for chunk in sorted({c['CHUNK'] for c in SCAN_BWD}):
        _, states_by_chunk, _ = triton_scan.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True, True,
                                                               False, chunk)
        configs = [c for c in SCAN_BWD if c['CHUNK'] == chunk]
        saved_mb = states_by_chunk.numel() * 4 / 1e6
        run(f'scan bwd (chunk {chunk}: {saved_mb:.0f} MB of saved states)', triton_scan, configs,
            lambda: triton_scan.selective_scan_bwd(dout, u, delta, A, B, C, D, z, bias, None, states_by_chunk, True,
                                                   triton_scan.CHUNK), elements * state)
    run('conv fwd', triton_conv, CONV_FWD, lambda: triton_conv.causal_conv1d_fwd(u, w, b, None, True), elements)
    run('conv bwd', triton_conv, CONV_BWD, lambda: triton_conv.causal_conv1d_bwd(dout, u, w, b, None, True), elements)
    for kind in dict.fromkeys(r['kind'] for r in results):
        timed = [r for r in results if r['kind'] == kind and 'ms' in r]
        if timed:
            best = min(timed, key=lambda r: r['ms'])
            print(f'fastest {kind}: {best["config"]} ({best["ms"]:.3f} ms)')
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(dict(args=vars(args), device=device_name, results=results), f, indent=1)


if __name__ == '__main__':
    main()
