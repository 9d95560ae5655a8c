#!/usr/bin/env python3
"""Train RSMamba (or any timm model) on remote-sensing scene classification data.

    python train.py sample_data/ucmerced -c configs/quickstart.yaml
    torchrun --nproc_per_node 4 train.py /data/ucm_split -c configs/rsmamba_base_ucm.yaml

Flags follow timm's train.py (`python train.py --help`); the logic lives in timm_rsmamba.training.
"""
import logging
import os
import sys

import timm_rsmamba  # noqa: F401  (registers the RSMamba models and .tif/.tiff images)
from timm import utils
from timm_rsmamba.data import DataError
from timm_rsmamba.malloc import lean_restart_env
from timm_rsmamba.training import CheckpointError, ConfigError, parse_args, train

_logger = logging.getLogger('train')


def main(argv=None):
    utils.setup_default_logging()
    args, args_text = parse_args(argv)
    env = lean_restart_env(args.malloc, args.grad_checkpointing) if argv is None else None
    if env is not None:  # glibc reads these settings only at start-up: run again, once, with them
        _logger.info(f'--malloc {args.malloc}: restarting with GLIBC_TUNABLES={env["GLIBC_TUNABLES"]}')
        command = getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv]  # with the interpreter's flags
        os.execve(sys.executable, [sys.executable, *command[1:]], env)
    try:
        train(args, args_text)
    except (ConfigError, CheckpointError, DataError) as e:  # bad input: the message says what to do
        _logger.error(str(e))
        sys.exit(2)


if __name__ == '__main__':
    main()
