#!/usr/bin/env python3
"""Evaluate RSMamba (or any timm model) on a remote-sensing image folder or HF dataset.

    python validate.py sample_data/ucmerced --split val --checkpoint output/train/RUN/model_best.pth.tar
    python validate.py /data/ucm_split --model rsmamba_base.ucm --pretrained \\
        --model-kwargs pretrained_cfg_overlay="{'file': 'rsmamba_base_ucm.safetensors'}" --confusion-matrix cm.png
    torchrun --nproc_per_node 4 validate.py /data/nwpu_split --split val --checkpoint best.pth.tar

Flags follow timm's validate.py. Prints top-1/top-5 and macro precision/recall/F1 (the paper's metrics) with a
per-class table; the logic lives in timm_rsmamba.evaluation.
"""
import argparse
import json
import logging
import sys

import timm_rsmamba  # noqa: F401  (registers the RSMamba models and .tif/.tiff images)
from timm import utils

from timm_rsmamba.data import DataError
from timm_rsmamba.evaluation import add_eval_input_args, report_validation, run_validation, write_results
from timm_rsmamba.metrics import AVERAGES

_logger = logging.getLogger('validate')


def build_parser():
    p = argparse.ArgumentParser(description='RSMamba / timm validation')
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (same as --data-dir)')
    p.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    p.add_argument('--dataset', metavar='NAME', default='',
                   help='"" (ImageFolder), hfds/NAME or hfds//ABS/PATH (local imagefolder/parquet folder)')
    p.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    p.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                   help='class name -> index file (.txt: one name per line in index order)')
    p.add_argument('--input-key', default=None, type=str, help='dataset key for input images (HF datasets)')
    p.add_argument('--target-key', default=None, type=str, help='dataset key for target labels (HF datasets)')
    p.add_argument('--skip-corrupt', action='store_true', default=False,
                   help='leave unreadable images out (counted and named in the log) instead of stopping')
    p.add_argument('--model', '-m', metavar='NAME', default=None,
                   help='model name, hf-hub:ORG/REPO or local-dir:PATH (default: the checkpoint\'s architecture)')
    p.add_argument('--pretrained', action='store_true', default=False, help='use pre-trained weights')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint to evaluate')
    p.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights if present')
    p.add_argument('--num-classes', type=int, default=None, help='number of classes (default: from the checkpoint)')
    add_eval_input_args(p, workers=4)
    p.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    p.add_argument('--metrics-avg', default='macro', choices=AVERAGES,
                   help='averaging of precision/recall/F1 (default: macro, as the paper)')
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='write the results here')
    p.add_argument('--results-format', default='csv', choices=('csv', 'json'),
                   help='csv (one summary row) or json (summary, per-class metrics, confusion matrix)')
    p.add_argument('--confusion-matrix', default='', metavar='PATH.png', help='save the confusion matrix plot')
    return p


def main(argv=None):
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    args.pretrained = args.pretrained or not args.checkpoint
    try:
        results = run_validation(args)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        _logger.error(f'error: {e}')
        sys.exit(2)
    if utils.is_primary(args):
        _logger.info(report_validation(results, args.confusion_matrix or None))
        if args.confusion_matrix:
            _logger.info(f'confusion matrix saved to {args.confusion_matrix}')
        if args.results_file:
            write_results(args.results_file, results, args.results_format)
        public = {k: v for k, v in results.items() if not k.startswith('_')}
        print(f'--result\n{json.dumps(public, indent=4)}')
    return results


if __name__ == '__main__':
    main()
