#!/usr/bin/env python3
"""Latency of an exported RSMamba in onnxruntime (CPU) beside the same model in eager PyTorch, in one run.

Rows per model: eager PyTorch with the default backends (the C++ kernels on CPU), eager PyTorch with the
'loop' scan + F.conv1d (the math the exported graph holds), and onnxruntime on the file
timm_rsmamba.export writes (the scan an ONNX Scan over positions). Each model is exported once (its export
time is printed); rows go to the table and to benchmarks/results/<date>-<device>.json.

    python benchmarks/bench_export.py                                   # rsmamba_small 64 px b8, rsmamba_base 224 px b1
    python benchmarks/bench_export.py --cases rsmamba_small:64:8 --threads 2
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_throughput import _commit, append_rows, cpu_name  # noqa: E402


def time_call(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_case(name: str, size: int, batch: int, reps: int, threads: int, tmp: str):
    import onnxruntime as ort
    import timm
    import timm_rsmamba  # noqa: F401
    from timm_rsmamba.export import check_onnx, example_input, export_onnx
    from timm_rsmamba.ops import resolve_conv_backend, resolve_scan_backend

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size).eval()
    x = example_input(model, batch)
    path = os.path.join(tmp, f'{name}-{size}.onnx')
    start = time.perf_counter()
    export_onnx(model, path, example_input(model, 2))
    export_s = time.perf_counter() - start
    diff = check_onnx(path, model, [x], threads=threads)

    def mixers(scan, conv):
        for blk in model.blocks:
            blk.mixer.scan_backend, blk.mixer.conv_backend = scan, conv

    rows = []
    with torch.no_grad():
        default = f'{resolve_scan_backend(None, x.device)}/{resolve_conv_backend(None, x.device)}'
        rows.append(('pytorch eager', default, time_call(lambda: model(x), reps)))
        mixers('loop', 'reference')
        rows.append(('pytorch eager', 'loop/reference', time_call(lambda: model(x), reps)))
        mixers(None, None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.numpy()}
    rows.append(('onnxruntime', 'onnx Scan/Conv', time_call(lambda: session.run(None, feed), reps)))
    return rows, export_s, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cases', nargs='+', default=['rsmamba_small:64:8', 'rsmamba_base:224:1'],
                   help='MODEL:IMG_SIZE:BATCH, one per case')
    p.add_argument('--reps', type=int, default=3, help='timed calls per row (median reported)')
    p.add_argument('--threads', type=int, default=2, help='torch and onnxruntime intra-op threads')
    p.add_argument('--results-dir', default=os.path.join(HERE, 'results'), help='where the JSON rows go')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    device, now = cpu_name(), datetime.datetime.now()
    print(f'# {device}, {args.threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, '
          f'{now:%Y-%m-%d %H:%M}, commit {_commit()}')
    print(f'{"model":<16} {"px":>4} {"batch":>5} {"runtime":<14} {"backend":<26} {"ms/img":>9}')
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            name, size, batch = case.split(':')
            rows, export_s, diff = bench_case(name, int(size), int(batch), args.reps, args.threads, tmp)
            for runtime, backend, seconds in rows:
                ms = seconds / int(batch) * 1000
                print(f'{name:<16} {size:>4} {batch:>5} {runtime:<14} {backend:<26} {ms:>9.1f}')
                out.append(dict(device=device, date=f'{now:%Y-%m-%dT%H:%M}', commit=_commit(), model=name,
                                row=runtime, backend=backend, mode='eval', batch_size=int(batch),
                                img_size=int(size), amp='fp32', img_per_s=round(int(batch) / seconds, 3),
                                ms_per_img=round(ms, 2), peak_gb=None, threads=args.threads,
                                note=f'export {export_s:.0f} s, onnxruntime vs eager max |diff| {diff:.1e}'))
            print(f'{name:<16} exported in {export_s:.0f} s; onnxruntime vs eager: largest logit difference {diff:.1e}')
    print(f'rows appended to {append_rows(out, args.results_dir, device)}')


if __name__ == '__main__':
    main()
