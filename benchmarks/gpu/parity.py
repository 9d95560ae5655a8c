#!/usr/bin/env python3
"""Fused CUDA kernels vs our pure-PyTorch backends on rsmamba_base: logits and every parameter gradient.

Builds one rsmamba_base, copies its weights into a second model, runs the same batch through
  fused:   scan_backend='mamba_ssm', conv_backend='causal_conv1d'
  pytorch: scan_backend='compiled',  conv_backend='torch'
in fp32 and under bf16 autocast, and prints the max absolute and max relative difference of the logits and of
each parameter's gradient (relative = max|a-b| / max|b|, per tensor). fp32 must agree to 1e-4
relative (exit status 1 otherwise); bf16 differences are reported only. Both models run in eval
mode, where eval_shuffle='fixed' gives both the same seeded shuffle permutations (train mode draws
fresh ones); gradients flow in eval mode all the same.

    PYTHONPATH=/tmp/site python benchmarks/gpu/parity.py [--batch-size 8] [--img-size 224]
    # dry run of this script without a GPU (reference vs compiled scan, small model):
    python benchmarks/gpu/parity.py --device cpu --fused reference,torch --model rsmamba_small --depth 2 --img-size 64 --batch-size 2
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import timm
import timm_rsmamba  # noqa: F401
from timm_rsmamba.ops import has_causal_conv1d, has_mamba_ssm


def require_extras():
    """Fail loudly: the ops fall back silently when an extra does not import, which would fake parity."""
    if not torch.cuda.is_available():
        sys.exit('the fused backends need a CUDA device (use --device cpu --fused reference,torch for a dry run)')
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401  (raises the real error)
    from causal_conv1d import causal_conv1d_fn  # noqa: F401
    if not (has_mamba_ssm() and has_causal_conv1d()):
        sys.exit('mamba_ssm / causal_conv1d import but timm_rsmamba.ops does not see them')


def run(model, x, target, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def diff(a, b):
    abs_d = (a - b).abs().max().item()
    return abs_d, abs_d / max(b.abs().max().item(), 1e-30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='rsmamba_base')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--tol', type=float, default=1e-4, help='fp32 relative tolerance')
    parser.add_argument('--show', type=int, default=8, help='worst parameter gradients listed per precision')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--depth', type=int, default=None, help='override the number of blocks (quick dry runs)')
    parser.add_argument('--fused', default='mamba_ssm,causal_conv1d', help='scan,conv backends under test')
    parser.add_argument('--pytorch', default='compiled,torch', help='scan,conv backends to compare against')
    args = parser.parse_args()
    fused_scan, fused_conv = args.fused.split(',')
    ours_scan, ours_conv = args.pytorch.split(',')
    if 'mamba_ssm' in (fused_scan, ours_scan) or 'causal_conv1d' in (fused_conv, ours_conv):
        require_extras()
    torch.backends.cuda.matmul.allow_tf32 = False  # compare the scans, not TF32 rounding of the matmuls
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    kw = dict(num_classes=21, img_size=args.img_size)
    if args.depth:
        kw['depth'] = args.depth
    dev = torch.device(args.device)
    fused = timm.create_model(args.model, scan_backend=fused_scan, conv_backend=fused_conv, **kw).to(dev).eval()
    ours = timm.create_model(args.model, scan_backend=ours_scan, conv_backend=ours_conv, **kw).to(dev).eval()
    ours.load_state_dict(fused.state_dict())
    print(f'{args.model} on {dev}: under test {fused.blocks[0].mixer.backend_names(dev)}, '
          f'against {ours.blocks[0].mixer.backend_names(dev)}; batch {args.batch_size}, {args.img_size} px')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)
    target = torch.randint(0, 21, (args.batch_size,), device=dev)

    failed = False
    for label, amp in (('fp32', False), ('bf16 autocast', True)):
        logits_f, grads_f = run(fused, x, target, amp)
        logits_o, grads_o = run(ours, x, target, amp)
        if grads_f.keys() != grads_o.keys():
            print(f'{label}: parameters with gradients differ: {sorted(grads_f.keys() ^ grads_o.keys())}')
            failed = True
        la, lr = diff(logits_f, logits_o)
        per_param = sorted(((*diff(grads_f[n], grads_o[n]), n) for n in grads_o if n in grads_f), reverse=True,
                           key=lambda t: t[1])
        worst_rel = per_param[0][1] if per_param else 0.
        print(f'\n== {label}: logits max abs {la:.3e}, max rel {lr:.3e}; '
              f'{len(per_param)} parameter gradients, worst rel {worst_rel:.3e} ({per_param[0][2]})')
        print('| parameter | max abs diff | max rel diff |')
        print('|---|---|---|')
        for abs_d, rel_d, name in per_param[:args.show]:
            print(f'| {name} | {abs_d:.3e} | {rel_d:.3e} |')
        if not amp and (lr > args.tol or worst_rel > args.tol):
            print(f'fp32 parity FAILED: tolerance {args.tol:g} relative')
            failed = True
    print('\nparity:', 'FAILED' if failed else f'OK (fp32 within {args.tol:g} relative; bf16 reported above)')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
