#!/usr/bin/env python3
"""Classify images with RSMamba (or any timm model): a file, several files, a .txt list of paths, or a folder.

    python inference.py photo.tif --checkpoint output/train/RUN/model_best.pth.tar --topk 3
    python inference.py /data/new_scenes --checkpoint best.pth.tar --results-dir out --results-format csv parquet

One row per image with the top-k class names (from the checkpoint's label_names, the model's pretrained_cfg or
--class-map) and probabilities. Flags follow timm's inference.py; the logic lives in timm_rsmamba.evaluation.
"""
import argparse
import logging
import os
import sys

import timm_rsmamba  # noqa: F401  (registers the RSMamba models and .tif/.tiff images)
from timm import utils

from timm_rsmamba.data import DataError
from timm_rsmamba.evaluation import add_eval_input_args, run_inference, save_predictions

_logger = logging.getLogger('inference')


def build_parser():
    p = argparse.ArgumentParser(description='RSMamba / timm inference')
    p.add_argument('data', nargs='*', metavar='PATH', help='image files, folders or .txt lists of image paths')
    p.add_argument('--data-dir', metavar='DIR', help='folder of images (same as a positional folder)')
    p.add_argument('--model', '-m', metavar='MODEL', default=None,
                   help='model name, hf-hub:ORG/REPO or local-dir:PATH (default: the checkpoint\'s architecture)')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint to load')
    p.add_argument('--pretrained', action='store_true', default=False, help='use pre-trained weights')
    p.add_argument('--num-classes', type=int, default=None, help='number of classes (default: from the checkpoint)')
    p.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                   help='class names in the model\'s index order (.txt, one per line); overrides the checkpoint\'s')
    add_eval_input_args(p, workers=2)
    p.add_argument('--results-dir', type=str, default=None, help='folder for the results files')
    p.add_argument('--results-file', type=str, default=None,
                   help='results filename, relative to --results-dir (default: MODEL-IMGSIZE)')
    p.add_argument('--results-format', type=str, nargs='+', default=['csv'],
                   help='one or more of csv, json, json-split, json-records, parquet (default: csv)')
    p.add_argument('--results-separate-col', action='store_true', default=False,
                   help='one column per top-k rank instead of list cells')
    p.add_argument('--topk', default=1, type=int, metavar='N', help='top-k classes per image (default: 1)')
    p.add_argument('--fullname', action='store_true', default=False, help='full path in the filename column')
    p.add_argument('--output-type', default='prob', choices=('prob', 'logit'), help='probabilities or logits')
    p.add_argument('--label-type', default='name', choices=('none', 'name', 'description', 'detailed', 'index'),
                   help='label column: class names (name/description/detailed), index only, or none')
    p.add_argument('--include-index', action='store_true', default=False, help='add the class index column')
    p.add_argument('--exclude-output', action='store_true', default=False, help='leave out probabilities/logits')
    p.add_argument('--no-console-results', action='store_true', default=False, help='do not print the results')
    p.add_argument('--show-dir', default=None, metavar='DIR',
                   help='save each input with its top-k labels and probabilities drawn under it, at DIR/<its name '
                        'relative to the folder given> (multi-band images as an RGB composite)')
    p.add_argument('--show-format', default='png', choices=('png', 'jpg'), help='format of --show-dir images')
    return p


def main(argv=None):
    utils.setup_default_logging()
    args = build_parser().parse_args(argv)
    if not args.data and not args.data_dir:
        build_parser().error('give image files, folders or a .txt list (or --data-dir)')
    args.pretrained = args.pretrained or not args.checkpoint
    try:
        df = run_inference(args)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        _logger.error(f'error: {e}')
        sys.exit(2)
    model_name = df.attrs['model_name'].replace('/', '_').replace(':', '_')
    name = args.results_file or f'{model_name}-{df.attrs["img_size"]}'
    name = os.path.splitext(name)[0] if name.endswith(('.csv', '.json', '.parquet')) else name
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        name = os.path.join(args.results_dir, name)
    for fmt in args.results_format:
        _logger.info(f'results written to {save_predictions(df, name, fmt)}')
    if not args.no_console_results:
        print('--result')
        print(df.set_index('filename').to_json(orient='index', indent=4))
    return df


if __name__ == '__main__':
    main()
