#!/usr/bin/env python3
"""Throughput and peak memory of RSMamba's scan backends next to timm peers, as one markdown table.

Rows, per RSMamba model in --models:
  ours       default backends (auto: 'compiled' scan + 'torch' conv on CPU; fused 'mamba_ssm' +
             'causal_conv1d' on CUDA when those import)
  ours_ckpt  the same with model.set_grad_checkpointing()
  compiled   the pure-PyTorch backends forced ('compiled' scan + 'torch' conv): on CUDA, what runs
             without the extra
  chunked    the eager scan vectorised across chunks (no torch.compile; meant for MPS/XPU)
  reference  the sequential reference scan (fewer steps: --ref-steps after --ref-warmup, and
             --ref-train-warmup before its train steps, which take minutes each); its
             train step uses grad checkpointing unless --ref-no-ckpt, because without it the
             per-position autograd graph of all blocks does not fit in memory
  original   the published code's CPU path: transformers' slow scan (restated in
             model_stats.original_fallback_scan) and the in/out projections run on every token order
             (model_stats.original_block_forward); steps as the reference, trained without
             checkpointing as the original is: it stops at --rss-limit-gb
  floor      the scan replaced by an identity that does no recurrence (model_stats.identity_scan)
and once: deit_tiny, resnet50 (and deit_small on CUDA), what a user might pick instead.

Every (row, mode) runs in its own child process (this script with --single-row), so the peak RSS
(getrusage ru_maxrss of the child) and the peak CUDA memory belong to that row alone; a child whose
RSS passes --rss-limit-gb is stopped and its cell says so.
Eval = inference_mode forward; train step = forward + cross-entropy + backward + AdamW step.

    python benchmarks/bench_throughput.py                      # CPU, rsmamba_base, 224 px, batch 8, fp32
    python benchmarks/bench_throughput.py --device cuda --amp bf16 --batch-size 128 --models rsmamba_base
"""
import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PEERS = {'deit_tiny': 'deit_tiny_patch16_224', 'deit_small': 'deit_small_patch16_224', 'resnet50': 'resnet50'}
RSMAMBA_ROWS = ('ours', 'ours_ckpt', 'compiled', 'chunked', 'reference', 'original', 'floor')
ALL_ROWS = RSMAMBA_ROWS + tuple(PEERS)
DEFAULT_ROWS = {
    'cpu': ('ours', 'ours_ckpt', 'chunked', 'reference', 'original', 'floor', 'deit_tiny', 'resnet50'),
    'cuda': ('ours', 'ours_ckpt', 'compiled', 'chunked', 'reference', 'floor', 'deit_small', 'deit_tiny',
             'resnet50'),
}


def _slow_row_steps(args) -> str:
    return f'eval {args.ref_warmup}+{args.ref_steps}, train {args.ref_train_warmup}+{args.ref_steps} steps'


def row_spec(row: str, model: str, args) -> dict:
    """What a child builds for one table row."""
    spec = dict(row=row, model=model, kwargs={}, ckpt=False, steps=args.steps, warmup=args.warmup,
                batch_size=args.batch_size, note='', original_blocks=False)
    if row in PEERS:
        spec['model'] = PEERS[row]
        return spec
    if row == 'ours_ckpt':
        spec['ckpt'] = True
    elif row in ('compiled', 'chunked'):
        spec['kwargs'] = dict(scan_backend=row, conv_backend='torch')
    elif row == 'original':
        spec['kwargs'] = dict(scan_backend='original_fallback', conv_backend='torch')
        spec['original_blocks'] = True
        spec.update(steps=args.ref_steps, warmup=args.ref_warmup, warmup_train=args.ref_train_warmup)
        spec['note'] = _slow_row_steps(args)
    elif row == 'reference':
        spec['kwargs'] = dict(scan_backend='reference')
        spec.update(steps=args.ref_steps, warmup=args.ref_warmup, warmup_train=args.ref_train_warmup,
                    ckpt_train=not args.ref_no_ckpt)
        spec['note'] = _slow_row_steps(args) + ('' if args.ref_no_ckpt else ', train w/ ckpt')
        if not args.device.startswith('cuda') and 'MALLOC_MMAP_THRESHOLD_' not in os.environ:
            # its ~0.6 MB per-position tensors fragment glibc's heap: RSS grows ~1.25 GB per block even
            # with checkpointing (20 GB+ for rsmamba_base); a fixed mmap threshold returns them to the OS
            spec['train_env'] = {'MALLOC_MMAP_THRESHOLD_': '65536'}
            spec['note'] += ', train with MALLOC_MMAP_THRESHOLD_=65536'
    elif row == 'floor':
        spec['kwargs'] = dict(scan_backend='identity')
    spec['batch_size'] = args.row_batch.get(row, spec['batch_size'])
    return spec


# ----------------------------------------------------------------------------------------------
# child: one row, one mode


def _build(spec, args):
    import torch
    import timm
    import timm_rsmamba  # noqa: F401
    from model_stats import register_benchmark_scans, use_original_blocks

    register_benchmark_scans()
    kwargs = dict(spec['kwargs'], num_classes=args.num_classes)
    if spec['model'].startswith(('rsmamba', 'deit', 'vit')):
        kwargs['img_size'] = args.img_size
    model = timm.create_model(spec['model'], **kwargs).to(args.device)
    if spec['original_blocks']:
        use_original_blocks(model)
    backend = ''
    if spec['model'].startswith('rsmamba'):
        backend = '/'.join(model.blocks[0].mixer.backend_names(torch.device(args.device)))
    return model, backend


def _sync(device):
    import torch
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def run_single(spec, mode, args) -> dict:
    """Time ``mode`` ('eval' or 'train') for one row; return per-image numbers and peak memory."""
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    model, backend = _build(spec, args)
    bs = spec['batch_size']
    x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, args.num_classes, (bs,), device=device)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    device_type = torch.device(device).type

    def autocast():
        return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    if mode == 'eval':
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)
    else:
        model.train()
        if spec['ckpt'] or spec.get('ckpt_train'):
            model.set_grad_checkpointing()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)

        def step():
            with autocast():
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(spec.get(f'warmup_{mode}', spec['warmup'])):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(spec['steps']):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / spec['steps']
    result = dict(img_s=bs / seconds, ms_img=1e3 * seconds / bs, batch_size=bs, backend=backend,
                  rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                  threads=torch.get_num_threads())
    if device_type == 'cuda':
        result['cuda_gb'] = torch.cuda.max_memory_allocated() / 1e9
    return result


# ----------------------------------------------------------------------------------------------
# parent: machine header, children, table, ratios


def machine_lines(args) -> list:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    threads = args.threads or torch.get_num_threads()
    lines = [
        f'date: {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}',
        f'machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), '
        f'python {platform.python_version()}',
    ]
    if args.device.startswith('cuda'):
        props = torch.cuda.get_device_properties(args.device)
        lines.append(f'gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, '
                     f'driver {_nvidia_driver()}; extras: {_extras()}')
    lines.append(f'load average at start (1/5/15 min): {_loadavg()}')
    return lines


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or '?'
    except (OSError, subprocess.SubprocessError):
        return '?'


def _extras() -> str:
    from importlib import metadata
    found = []
    for dist in ('mamba-ssm', 'causal-conv1d'):
        try:
            found.append(f'{dist} {metadata.version(dist)}')
        except metadata.PackageNotFoundError:
            found.append(f'{dist} absent')
    return ', '.join(found)


def _loadavg() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def _rss_gb(pid: int) -> float:
    """Resident memory of a live process (Linux /proc; 0 where that is not available)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.


def run_child(spec, mode, args, argv) -> dict:
    """Re-invoke this script for one (row, mode), watch its time and RSS, and parse its RESULT line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--single-row', json.dumps(spec), '--mode', mode]
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=dict(os.environ, **spec.get(f'{mode}_env', {})))
        start, stopped = time.time(), None
        while proc.poll() is None:
            time.sleep(0.5)
            if args.row_timeout and time.time() - start > args.row_timeout:
                stopped = f'timed out after {args.row_timeout:g} s (--row-timeout)'
            elif args.rss_limit_gb and _rss_gb(proc.pid) > args.rss_limit_gb:
                stopped = f'does not fit: RSS passed {args.rss_limit_gb:g} GB (--rss-limit-gb) after {time.time() - start:.0f} s'
            if stopped:
                proc.kill()
                proc.wait()
                return dict(error=stopped)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    tail = (stderr.strip().splitlines() or ['no output'])[-1]
    if proc.returncode < 0 or proc.returncode == 137:
        tail = f'killed (signal {-proc.returncode if proc.returncode < 0 else 9}; out of memory?) {tail}'
    return dict(error=tail[-160:])


def fmt(v, spec='.2f'):
    return '-' if v is None else format(v, spec)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['rsmamba_base'])
    parser.add_argument('--rows', default=None,
                        help=f'comma-separated subset of {",".join(ALL_ROWS)} (default depends on --device)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'],
                        help='autocast dtype (fp16 has no loss scaling: timing only)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--num-classes', type=int, default=21)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per row and mode')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--ref-steps', type=int, default=1, help='timed steps of the slow reference row')
    parser.add_argument('--ref-warmup', type=int, default=1, help='eval warm-up steps of the slow rows')
    parser.add_argument('--ref-train-warmup', type=int, default=0, help='train warm-up steps of the slow rows')
    parser.add_argument('--row-batch', nargs='*', default=[], metavar='ROW=N',
                        help='per-row batch size, e.g. reference=8 chunked=32 (rows that would not fit otherwise)')
    parser.add_argument('--ref-no-ckpt', action='store_true',
                        help='train the reference without grad checkpointing (needs tens of GB)')
    parser.add_argument('--modes', default='eval,train')
    parser.add_argument('--threads', type=int, default=0, help='torch threads in each child (0 = default)')
    parser.add_argument('--peak-tflops', type=float, default=989.,
                        help='bf16 dense peak TFLOP/s for MFU (989: H100 SXM and H200 spec sheets)')
    parser.add_argument('--row-timeout', type=float, default=None, help='seconds before a child is killed')
    parser.add_argument('--rss-limit-gb', type=float, default=20.,
                        help='stop a child whose RSS passes this (0 = no limit; default keeps a 24 GB machine alive)')
    parser.add_argument('--json-out', default=None, help='also write all results as JSON here')
    parser.add_argument('--single-row', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--mode', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.row_batch = {k: int(v) for k, v in (item.split('=') for item in args.row_batch)}
    except ValueError:
        parser.error(f'--row-batch takes ROW=N items, got {args.row_batch}')

    if args.single_row:
        print('RESULT ' + json.dumps(run_single(json.loads(args.single_row), args.mode, args)), flush=True)
        return

    device_type = 'cuda' if args.device.startswith('cuda') else 'cpu'
    rows = args.rows.split(',') if args.rows else list(DEFAULT_ROWS[device_type])
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        parser.error(f'--rows: unknown {unknown}; choose from {",".join(ALL_ROWS)}')
    modes = args.modes.split(',')
    specs = [row_spec(r, m, args) for m in args.models for r in rows if r in RSMAMBA_ROWS]
    specs += [row_spec(r, args.models[0], args) for r in rows if r in PEERS]

    from model_stats import gflops_per_image
    header = machine_lines(args)
    print('\n'.join(header), flush=True)
    print(f'config: {args.img_size} px, batch {args.batch_size}, amp {args.amp}, {args.warmup} warm-up + '
          f'{args.steps} timed steps per row (reference, original: {_slow_row_steps(args)}), '
          f'one child process per row and mode', flush=True)
    flops = {}
    for spec in specs:
        key = (spec['model'], spec['original_blocks'])
        if key not in flops:
            flops[key] = gflops_per_image(spec['model'], args.img_size, args.num_classes,
                                          spec['original_blocks'])['total']

    results = []
    total = len(specs) * len(modes)
    t0 = time.time()
    for i, spec in enumerate(specs):
        res = dict(spec=spec)
        for j, mode in enumerate(modes):
            n = i * len(modes) + j + 1
            print(f'[{n}/{total}] {spec["model"]} {spec["row"]} {mode} ...', file=sys.stderr, flush=True)
            start = time.time()
            res[mode] = run_child(spec, mode, args, argv)
            eta = (time.time() - t0) / n * (total - n)
            print(f'[{n}/{total}] done in {time.time() - start:.0f} s ({res[mode]}); ETA {eta:.0f} s',
                  file=sys.stderr, flush=True)
        results.append(res)

    print(f'load average at end (1/5/15 min): {_loadavg()}')
    print()
    print_table(results, flops, args, device_type)
    print()
    print_ratios(results, flops, args, device_type)
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(dict(header=header, args=vars(args), results=results,
                           gflops={m + (' original blocks' if o else ''): v for (m, o), v in flops.items()}),
                      f, indent=1)


def print_table(results, flops, args, device_type):
    cuda = device_type == 'cuda'
    cols = ['row', 'backend (scan/conv)', 'batch', 'eval img/s', 'eval ms/img', 'train img/s', 'train ms/img',
            'peak RSS train (GB)']
    if cuda:
        cols += ['peak CUDA mem train (GB)', 'train MFU']
    cols += ['GFLOPs/img', 'note']
    print('| ' + ' | '.join(cols) + ' |')
    print('|' + '---|' * len(cols))
    for res in results:
        spec, ev, tr = res['spec'], res.get('eval', {}), res.get('train', {})
        name = spec['row'] if spec['row'] in PEERS else f"{spec['model']} {spec['row']}"
        note = '; '.join(x for x in (spec['note'], ev.get('error'), tr.get('error')) if x)
        backend = ev.get('backend') or tr.get('backend') or '-'
        gf = flops.get((spec['model'], spec['original_blocks']))
        cells = [name, backend, spec['batch_size'], fmt(ev.get('img_s')), fmt(ev.get('ms_img'), '.1f'),
                 fmt(tr.get('img_s')), fmt(tr.get('ms_img'), '.1f'), fmt(tr.get('rss_gb'))]
        if cuda:
            mfu = None if tr.get('img_s') is None else 3 * gf * 1e9 * tr['img_s'] / (args.peak_tflops * 1e12)
            cells += [fmt(tr.get('cuda_gb')), '-' if mfu is None else f'{100 * mfu:.1f}%']
        cells += [f'{gf:.2f}', note]
        print('| ' + ' | '.join(str(c) for c in cells) + ' |')
    if cuda:
        print(f'\nMFU = 3 x forward GFLOPs/img x train img/s / {args.peak_tflops:g} TFLOP/s (--peak-tflops); '
              'checkpointing recompute is not counted as model FLOPs.')
    print('GFLOPs/img: FlopCounterMode dense ops + analytic scan and conv counts (benchmarks/model_stats.py).')


def print_ratios(results, flops, args, device_type):
    """The scan issue's targets, per RSMamba model."""
    for model in args.models:
        by_row = {r['spec']['row']: r for r in results if r['spec']['model'] == model}

        def get(row, mode, key):
            return by_row.get(row, {}).get(mode, {}).get(key)

        lines = []

        def ratio(label, num, den, target=None, fmt_=lambda r: f'{r:.2f}x'):
            if num is None or den is None:
                return
            r = num / den
            verdict = '' if target is None else (' (target ' + target[0] + ': ' +
                                                ('met' if target[1](r) else 'MISSED') + ')')
            lines.append(f'- {label}: {fmt_(r)}{verdict}')

        ratio('eval img/s ours / reference', get('ours', 'eval', 'img_s'), get('reference', 'eval', 'img_s'),
              ('>= 4x', lambda r: r >= 4))
        ratio('train img/s ours / reference' + ('' if args.ref_no_ckpt else ' (reference trains with ckpt)'),
              get('ours', 'train', 'img_s'), get('reference', 'train', 'img_s'), ('>= 4x', lambda r: r >= 4))
        ratio('eval img/s floor / reference (the ceiling of the ratio above: a scan that costs nothing)',
              get('floor', 'eval', 'img_s'), get('reference', 'eval', 'img_s'))
        ratio("eval img/s ours / original (the published code's CPU path)", get('ours', 'eval', 'img_s'),
              get('original', 'eval', 'img_s'))
        ratio('train img/s ours_ckpt / reference (both with ckpt)', get('ours_ckpt', 'train', 'img_s'),
              get('reference', 'train', 'img_s'))
        ratio('eval img/s ours / chunked (eager)', get('ours', 'eval', 'img_s'), get('chunked', 'eval', 'img_s'))
        ratio('train img/s ours / chunked (eager)', get('ours', 'train', 'img_s'), get('chunked', 'train', 'img_s'))
        pct = lambda r: f'{100 * (r - 1):+.0f}%'  # noqa: E731
        ratio('eval time over the no-scan floor (ours ms/img / floor ms/img - 1)', get('ours', 'eval', 'ms_img'),
              get('floor', 'eval', 'ms_img'), ('<= +60%', lambda r: r <= 1.6), pct)
        ratio('train time over the no-scan floor', get('ours', 'train', 'ms_img'), get('floor', 'train', 'ms_img'),
              None, pct)
        if device_type == 'cuda':
            ratio('train img/s fused (ours) / pure PyTorch (compiled)', get('ours', 'train', 'img_s'),
                  get('compiled', 'train', 'img_s'), ('pure PyTorch within 3x', lambda r: r <= 3))
            tr = get('ours', 'train', 'img_s')
            if tr is not None:
                mfu = 3 * flops[(model, False)] * 1e9 * tr / (args.peak_tflops * 1e12)
                lines.append(f'- train MFU of ours at batch {args.batch_size}: {100 * mfu:.1f}% '
                             f'(target >= 20% at batch 128)')
        key = 'cuda_gb' if device_type == 'cuda' else 'rss_gb'
        for row, limit in (('ours', 8.0), ('ours_ckpt', 3.0)):
            v = get(row, 'train', key)
            if v is not None:
                target = '' if key == 'cuda_gb' else f" (target <= {limit:g} GB: {'met' if v <= limit else 'MISSED'})"
                lines.append(f'- peak {"CUDA memory" if key == "cuda_gb" else "RSS"} of a {row} train step, '
                             f'{args.img_size} px batch {args.batch_size}: {v:.2f} GB{target}')
        if lines:
            print(f'{model} ({args.img_size} px, batch {args.batch_size}, {args.device}, amp {args.amp}):')
            print('\n'.join(lines))


if __name__ == '__main__':
    main()
