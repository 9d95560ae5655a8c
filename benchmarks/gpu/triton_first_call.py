#!/usr/bin/env python3
"""First-call cost of the Triton backends: Triton compiles every kernel it has not compiled before (on-disk cache:
$TRITON_CACHE_DIR). This script points the cache at an empty folder, then times, on rsmamba_base with the Triton
scan and conv under bf16 autocast, the first and the second eval forward and train step. First minus second is
the compilation (target: at most 60 s in all); it also prints the peak CUDA memory of the train step.

    python benchmarks/gpu/triton_first_call.py [--batch-size 8] [--json-out first_call.json]
"""
import argparse
import json
import os
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='rsmamba_base')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--keep-cache', action='store_true', help="use Triton's usual cache (a warm start)")
    parser.add_argument('--json-out', default=None)
    args = parser.parse_args()
    if not args.keep_cache:  # before anything imports triton
        os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='triton_cold_')

    import torch
    import torch.nn.functional as F
    import timm
    import timm_rsmamba  # noqa: F401

    if not torch.cuda.is_available():
        raise SystemExit('needs a CUDA GPU')
    model = timm.create_model(args.model, scan_backend='triton', conv_backend='triton', num_classes=21,
                              img_size=args.img_size).cuda()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device='cuda')
    target = torch.randint(0, 21, (args.batch_size,), device='cuda')
    opt = torch.optim.AdamW(model.parameters())

    def eval_step():
        model.eval()
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
            model(x)

    def train_step():
        model.train()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = {}
    for name, fn in (('eval', eval_step), ('train', train_step)):
        torch.cuda.reset_peak_memory_stats()
        first, second = timed(fn), timed(fn)
        rows[name] = dict(first_s=first, second_s=second, compile_s=first - second,
                          peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    total = sum(r['compile_s'] for r in rows.values())
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} batch {args.batch_size}, '
          f'{args.img_size} px, bf16 autocast, Triton cache {os.environ.get("TRITON_CACHE_DIR", "default")}')
    print('| call | first (s) | second (s) | first - second (s) | peak CUDA memory (GB) |')
    print('|---|---|---|---|---|')
    for name, r in rows.items():
        print(f"| {name} | {r['first_s']:.2f} | {r['second_s']:.3f} | {r['compile_s']:.2f} | {r['peak_gb']:.2f} |")
    verdict = 'met' if total <= 60 else 'MISSED'
    print(f'first-call compilation, eval + train: {total:.1f} s (target <= 60 s: {verdict})')
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(dict(args=vars(args), device=torch.cuda.get_device_name(), rows=rows, compile_total_s=total),
                      f, indent=1)


if __name__ == '__main__':
    main()
