"""Export a trained RSMamba (or any timm model) to ONNX or a torch.export program, and check the result.

    python -m timm_rsmamba.export output/train/quickstart/model_best.pth.tar --out model.onnx

Under torch.export the ``auto`` backends turn into plain PyTorch: the scan becomes one step body looped over
positions by torch's ``scan`` operator (an ONNX ``Scan``), the causal conv a grouped ``F.conv1d`` (an ONNX
``Conv``). The fixed eval permutations are buffers, so they are constants of the graph. The batch dimension
stays dynamic. The ONNX file's metadata carries the class names and the preprocessing (``metadata_props``).
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

__all__ = ['example_input', 'export_onnx', 'export_program', 'onnx_metadata', 'check_onnx', 'main']

_logger = logging.getLogger(__name__)
# loggers that print a line per block while an ONNX file is optimised, and the level they are held to: constant
# folding warns once per block that it leaves the TopK of the constant token orders' argsort unfolded
_CHATTY_LOGGERS = {'onnxscript.optimizer._constant_folding': logging.ERROR, 'onnxscript.rewriter': logging.WARNING,
                   'torch.onnx': logging.WARNING}


def example_input(model: torch.nn.Module, batch_size: int = 2, img_size: Optional[Sequence[int]] = None):
    """A random batch the model accepts: its channels and (unless given) the size it was built for."""
    size = img_size or getattr(getattr(model, 'patch_embed', None), 'img_size', None) or \
        model.pretrained_cfg.get('input_size', (3, 224, 224))[1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    in_chans = getattr(model, 'in_chans', None) or model.pretrained_cfg.get('input_size', (3,))[0]
    return torch.randn(batch_size, in_chans, *size)


def _dynamic_batch():
    return ({0: torch.export.Dim('batch', min=1, max=65536)},)


def _check_exportable(model: torch.nn.Module):
    if model.training:
        raise ValueError('export a model in eval mode: call model.eval() first (training-mode RSMamba draws new '
                         'token shuffles on every forward, which cannot be constants of a graph)')


def export_program(model: torch.nn.Module, x: torch.Tensor, path: Optional[str] = None):
    """torch.export with a dynamic batch dimension; saved as a .pt2 file when ``path`` is given."""
    _check_exportable(model)
    program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())
    if path:
        torch.export.save(program, path)
    return program


def onnx_metadata(model: torch.nn.Module, x: torch.Tensor, label_names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """What a runtime needs besides the graph: class names (when known) and the preprocessing for inputs shaped
    like ``x`` (one example's channels and size), as JSON strings."""
    from timm.data import resolve_input_data_config
    cfg = resolve_input_data_config(model, args=dict(input_size=tuple(x.shape[1:])))
    meta = {k: json.dumps(list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.items() if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    if label_names:
        meta['label_names'] = json.dumps(list(label_names))
    meta['architecture'] = json.dumps(model.pretrained_cfg.get('architecture'))
    return meta


def export_onnx(model: torch.nn.Module, path: str, x: Optional[torch.Tensor] = None,
                metadata: Optional[Dict[str, str]] = None, opset: Optional[int] = None):
    """torch.onnx.export (the dynamo exporter) with a dynamic batch dimension and ``metadata`` stored in the file."""
    _check_exportable(model)
    x = example_input(model) if x is None else x
    levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    for name, level in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_dynamic_batch(), opset_version=opset,
                                    verbose=False)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    program.model.metadata_props.update(metadata or {})
    program.save(path)
    return program


def check_onnx(path: str, model: torch.nn.Module, inputs: Sequence[torch.Tensor], threads: int = 0) -> float:
    """Largest |onnxruntime - eager| over the logits of ``inputs`` (batches of any size)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: it notes an initializer the exporter left unused
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    worst = 0.
    with torch.no_grad():
        for x in inputs:
            ours = session.run(None, {name: x.numpy()})[0]
            worst = max(worst, (torch.from_numpy(ours) - model(x)).abs().max().item())
    return worst


def _parser():
    p = argparse.ArgumentParser(description='Export RSMamba (or any timm model) to ONNX or a torch.export .pt2 file')
    p.add_argument('checkpoint', nargs='?', default='', help='train.py checkpoint (or .safetensors) to export')
    p.add_argument('--model', '-m', default=None,
                   help="model name, hf-hub:ORG/REPO or local-dir:DIR (default: the checkpoint's architecture)")
    p.add_argument('--pretrained', action='store_true', help='load the named model\'s pretrained weights')
    p.add_argument('--use-ema', action='store_true', help='export the EMA weights of the checkpoint')
    p.add_argument('--out', required=True, help='output file: .onnx, or .pt2 for a torch.export program')
    p.add_argument('--img-size', type=int, default=None,
                   help='input size to export at (default: the size the model was built for)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter\'s)')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest |onnxruntime - PyTorch| logit difference accepted by the check (default 1e-4)')
    p.add_argument('--no-check', action='store_true', help='skip running the exported file against PyTorch')
    return p


def main(argv=None) -> Dict[str, Any]:
    from timm import utils
    from .data import DataError
    from .evaluation import build_eval_model

    utils.setup_default_logging()
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix not in ('.onnx', '.pt2'):
        _logger.error(f'--out {args.out}: name an .onnx or a .pt2 file')
        sys.exit(2)
    if not args.checkpoint and not args.model:
        _logger.error('give a checkpoint file or --model NAME to export')
        sys.exit(2)
    try:
        em = build_eval_model(args.model, args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema)
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as e:
        _logger.error(f'error: {e}')
        sys.exit(2)
    model = em.model.eval()
    img = args.img_size or em.img_size
    x = example_input(model, 2, img)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    _logger.info(f'exporting {em.model_name} at {tuple(x.shape[1:])} to {out} (batch dimension dynamic) ...')
    try:
        if out.suffix == '.pt2':
            export_program(model, x, str(out))
        else:
            export_onnx(model, str(out), x, onnx_metadata(model, x, em.label_names), args.opset)
    except RuntimeError as e:
        _logger.error(f'export failed: {str(e).splitlines()[0]}')
        sys.exit(1)
    report = dict(out=str(out), seconds=round(time.time() - start, 1), input_size=list(x.shape[1:]))
    if out.suffix == '.onnx' and not args.no_check:
        try:
            diff = check_onnx(out, model, [x, example_input(model, 3, img)])
        except ImportError:
            _logger.warning('onnxruntime is not installed: skipped the check (pip install "timm-rsmamba[export]")')
        else:
            report['max_abs_diff'] = diff
            if diff > args.tolerance:
                _logger.error(f'onnxruntime differs from PyTorch by {diff:.3g} (> --tolerance {args.tolerance})')
                sys.exit(1)
            _logger.info(f'onnxruntime matches PyTorch: largest logit difference {diff:.2g} (batches of 2 and 3)')
    _logger.info(f'wrote {out} in {report["seconds"]} s')
    return report


if __name__ == '__main__':
    main()
