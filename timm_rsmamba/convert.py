"""Convert the authors' mmpretrain RSMamba checkpoints into hub-ready timm folders, verifying the logits.

    python -m timm_rsmamba.convert ORIGINAL.pth --config hf_configs/rsmamba_base.ucm [--out DIR] [--trust-pickle]

The original file is read with ``torch.load(weights_only=True)``; metadata that needs numpy scalars/dtypes
(and argparse namespaces) is admitted through an explicit allow-list, anything else only with ``--trust-pickle``.
The converted model must reproduce, on a random batch, the logits that ``timm_rsmamba.reference`` computes from
the original state dict with the spec's math; any unmatched or missing key or wrong shape stops the conversion.
"""
import argparse
import ast
import copy
import hashlib
import json
import pickle
import time
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .hub import create_model, save_pretrained_folder
from .models.rsmamba import convert_mmpretrain
from .reference import reference_forward

__all__ = ['load_torch_file', 'convert_checkpoint', 'ConversionError', 'UnsafeCheckpointError']


class ConversionError(RuntimeError):
    """The original checkpoint does not fit the config, or the converted model computes something else."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds pickled objects outside the allow-list and --trust-pickle was not given."""


def _allow_list() -> Dict[str, Any]:
    """Pickle globals that only rebuild plain data: numpy scalars, arrays and dtypes; argparse namespaces."""
    import numpy as np
    core = getattr(np, '_core', None) or np.core
    allowed = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype, 'argparse.Namespace': argparse.Namespace}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[f'{module}.scalar'] = core.multiarray.scalar
        allowed[f'{module}._reconstruct'] = core.multiarray._reconstruct
    for name in dir(np.dtypes):
        if name.endswith('DType'):
            allowed[f'numpy.dtypes.{name}'] = getattr(np.dtypes, name)
    return allowed


class _Placeholder(dict):
    """Inert stand-in for a pickled object whose package is not installed (e.g. mmengine metadata)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.__dict__['_args'] = args

    def __setstate__(self, state):
        self.__dict__['_state'] = state


class _TrustingUnpickler(pickle.Unpickler):
    """Full unpickling (only behind --trust-pickle); classes of missing packages become placeholders."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {'__module__': f'placeholder.{module}'})


_trusting_pickle = types.ModuleType('timm_rsmamba_trusting_pickle')
_trusting_pickle.Unpickler = _TrustingUnpickler
_trusting_pickle.load = lambda f, **kw: _TrustingUnpickler(f, **kw).load()


def load_torch_file(path, trust_pickle: bool = False, log=print):
    """torch.load that never unpickles arbitrary objects unless ``trust_pickle`` is set.

    Order: plain weights_only; weights_only with the numpy/argparse allow-list when the file needs exactly those;
    otherwise an UnsafeCheckpointError naming the offending globals, or, with trust_pickle, a full load with a
    warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such checkpoint file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        first_error = err
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned: treat as needing trust
        needed = ['<unscannable legacy-format pickle>']
    allowed = _allow_list()
    blocked = sorted(g for g in needed if g not in allowed)
    if not blocked:
        try:
            # all of it: numpy dtype classes are checked when objects are built, not listed as globals
            with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
                return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as err:
            blocked, first_error = ['(allow-listed globals used in an unsupported way)'], err
    if not trust_pickle:
        raise UnsafeCheckpointError(
            f'{path} holds pickled objects outside the safe allow-list: {", ".join(blocked)}. Loading them can run '
            f'arbitrary code. If you trust where the file comes from (e.g. the authors\' HuggingFace repo), rerun '
            f'with --trust-pickle (python: trust_pickle=True). ({str(first_error).splitlines()[0]})')
    message = (f'--trust-pickle: fully unpickling {path} (objects: {", ".join(blocked)}); this executes code '
               f'from the file, only do it for files you trust')
    warnings.warn(message, stacklevel=2)
    log(f'WARNING: {message}')
    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_trusting_pickle)


def _original_name(key: str) -> str:
    """Our key -> the original mmpretrain key (for error messages)."""
    parts = key.split('.')
    if key.startswith('blocks.') and parts[2] == 'mixer':
        return f'backbone.layers.{parts[1]}.' + '.'.join(parts[3:])
    if key.startswith('blocks.') and parts[2] == 'gate':
        return f'backbone.gate_layers.{parts[1]}.0.' + '.'.join(parts[3:])
    for ours, theirs in (('patch_embed.proj.', 'backbone.patch_embed.projection.'), ('norm.', 'backbone.ln1.'),
                         ('fc_norm.', 'backbone.ln2.'), ('head.', 'head.fc.'), ('pre_norm.', 'backbone.pre_norm.'),
                         ('pos_embed', 'backbone.pos_embed'), ('cls_token', 'backbone.cls_token')):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def read_config(config) -> Dict[str, Any]:
    """config.json of an hf_configs folder (the folder or the file)."""
    path = Path(config)
    path = path / 'config.json' if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f'--config {config}: no config.json there (expected e.g. hf_configs/rsmamba_base.ucm)')
    cfg = json.loads(path.read_text())
    for key in ('architecture', 'num_classes', 'pretrained_cfg'):
        if key not in cfg:
            raise ValueError(f'{path}: missing {key!r}; regenerate with `python -m timm_rsmamba.hub make-configs`')
    cfg['_folder'] = path.parent
    return cfg


def infer_model_kwargs(state_dict: Dict[str, torch.Tensor], given: Dict[str, Any]) -> Dict[str, Any]:
    """Options the original state dict pins down unambiguously; ambiguous ones must be given."""
    out = {}
    cls = state_dict.get('backbone.cls_token')
    has_ln2 = 'backbone.ln2.weight' in state_dict
    if cls is not None:
        if 'cls_token_position' not in given:
            if cls.shape[1] == 2:
                out['cls_token_position'] = 'head_tail'
            else:
                raise ConversionError(
                    'the checkpoint has one class token (backbone.cls_token): pass the original cls_position, '
                    '--model-kwargs cls_token_position=head|tail|middle')
        if 'global_pool' not in given:
            out['global_pool'] = 'avg' if has_ln2 else 'token'
    elif not has_ln2:
        raise ConversionError('the checkpoint has neither backbone.ln2 nor backbone.cls_token: not an RSMamba '
                              'ImageClassifier state dict')
    if 'backbone.pos_embed' not in state_dict and given.get('pos_embed_type', 'learnable') == 'learnable':
        raise ConversionError('the checkpoint has no backbone.pos_embed: pass the original pe_type, '
                              '--model-kwargs pos_embed_type=sine|none')
    gate = state_dict.get('backbone.gate_layers.0.0.weight')
    if 'path_type' not in given:
        if gate is not None and gate.shape[0] == 2:
            out['path_type'] = 'forward_reverse_gate'
        elif gate is None:
            raise ConversionError(
                'the checkpoint has no gate layers: pass the original path_type, --model-kwargs '
                'path_type=forward|forward_reverse_mean|forward_reverse_shuffle_mean')
    return out


def check_keys(converted: Dict[str, torch.Tensor], model, config_name: str):
    """Fail loudly, naming the original keys, unless the converted dict fits the model exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    shapes = [k for k in expected if k in converted and converted[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f'the checkpoint does not fit {config_name} as built:']
    if missing:
        lines.append('  missing from the checkpoint: ' + ', '.join(f'{_original_name(k)} (ours: {k})' for k in missing))
    if unexpected:
        lines.append('  not used by the model: ' + ', '.join(f'{_original_name(k)} (ours: {k})' for k in unexpected))
    for k in shapes:
        lines.append(f'  wrong shape: {_original_name(k)} is {tuple(converted[k].shape)}, the model needs '
                     f'{tuple(expected[k].shape)} (ours: {k})')
    if 'head.weight' in shapes:
        lines.append(f'  the checkpoint head has {converted["head.weight"].shape[0]} classes and the config '
                     f'{model.num_classes}: use the config of that dataset (ucm 21, aid 30, nwpu 45 classes)')
    n_layers = len({k.split('.')[1] for k in converted if k.startswith('blocks.')})
    if n_layers != len(model.blocks):
        lines.append(f'  the checkpoint has {n_layers} layers, the model {len(model.blocks)}: use the matching size '
                     f'(base 24, large 36, huge 48) or --model-kwargs depth={n_layers}')
    raise ConversionError('\n'.join(lines))


class _Progress:
    """timm-style progress lines for the two slow forwards of the check (one line per ~10% of the layers)."""

    def __init__(self, what: str, log):
        self.what, self.log, self.start = what, log, time.time()

    def __call__(self, i: int, n: int):
        step = max(n // 10, 1)
        if (i + 1) % step and i + 1 != n:
            return
        elapsed = time.time() - self.start
        eta = elapsed / (i + 1) * (n - i - 1)
        self.log(f'  {self.what}: layer {i + 1}/{n}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s')


@torch.no_grad()
def verify_logits(model, original_sd, batch_size: int = 1, seed: int = 0, atol: float = 1e-4, rtol: float = 1e-3,
                  log=print):
    """Max |ours - reference| on a random batch, both in float64 so that only a wrong mapping shows.

    Raises ConversionError beyond atol + rtol * max|reference| (a wrong mapping is off by O(1)).
    """
    check = copy.deepcopy(model).double().eval()
    check.eval_shuffle = 'fixed'  # the permutations the reference gets below
    in_chans = check.patch_embed.proj.in_channels
    x = torch.randn(batch_size, in_chans, *check.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))
    x = x.double()
    progress = _Progress('timm model', log)
    hooks = [block.register_forward_hook(lambda *_, i=i: progress(i, len(check.blocks)))
             for i, block in enumerate(check.blocks)]
    try:
        ours = check(x)
    finally:
        for hook in hooks:
            hook.remove()
    seq_len = check.patch_embed.num_patches + check.num_prefix_tokens
    perms = check.shuffle_permutations(seq_len, 'cpu') if 'shuffle' in check.path_type else None
    ref = reference_forward(
        original_sd, x, path_type=check.path_type, cls_position=check.cls_token_position,
        pe_type=check.pos_embed_type, perms=perms, patch_stride=check.patch_embed.stride[0],
        progress=_Progress('reference (original layout)', log))
    diff = (ours - ref).abs().max().item()
    tol = atol + rtol * ref.abs().max().item()
    if not diff <= tol:
        raise ConversionError(
            f'converted logits differ from the reference forward of the original layout by {diff:.3g} '
            f'(tolerance {tol:.3g}): the options (path_type, cls_token_position, pos_embed_type) or the weights '
            f'do not match the original model')
    return diff


def convert_checkpoint(
        original, config, out_dir=None, model_kwargs: Optional[Dict[str, Any]] = None, trust_pickle: bool = False,
        batch_size: int = 1, seed: int = 0, atol: float = 1e-4, rtol: float = 1e-3, log=print):
    """Original .pth -> verified timm model -> folder (safetensors + config.json + model card). Returns (model, dir)."""
    start = time.time()
    original = Path(original)
    ckpt = load_torch_file(original, trust_pickle=trust_pickle, log=log)
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ConversionError(f"{original}: expected {{'state_dict': {{name: tensor}}}} (an mmpretrain checkpoint)")
    converted, unmatched = convert_mmpretrain(state_dict)
    if unmatched:
        raise ConversionError(f'{original}: keys with no counterpart in timm_rsmamba: {", ".join(sorted(unmatched))}')
    cfg = read_config(config)
    config_name = cfg['_folder'].name
    label_names = cfg.get('label_names') or cfg['pretrained_cfg'].get('label_names')
    meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
    classes = (meta.get('dataset_meta') or {}).get('classes') if isinstance(meta.get('dataset_meta'), dict) else None
    if classes is not None and label_names is not None and list(classes) != list(label_names):
        raise ConversionError(
            f"{original}: its meta lists the classes as {list(classes)}, but {config_name} has label_names "
            f"{list(label_names)}: the head's class order would be mislabelled; use the config of that dataset")

    # timm writes global_pool into every config; with class tokens the checkpoint decides (ln2 or not)
    config_args = {k: v for k, v in (cfg.get('model_args') or {}).items() if k != 'global_pool'}
    given = dict(config_args, **(model_kwargs or {}))
    kwargs = dict(infer_model_kwargs(state_dict, given), **(model_kwargs or {}))
    log(f'building {cfg["architecture"]} from {cfg["_folder"]} with {kwargs or "the config as is"}')
    model = create_model(f'local-dir:{cfg["_folder"]}', **kwargs)
    check_keys(converted, model, config_name)
    model.load_state_dict(converted, strict=True)
    log(f'loaded {len(converted)} tensors; verifying logits against the reference forward of the original layout')
    diff = verify_logits(model, state_dict, batch_size=batch_size, seed=seed, atol=atol, rtol=rtol, log=log)
    log(f'logits match: max |ours - reference| = {diff:.3g}')

    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    out_dir = Path(out_dir or Path('converted') / config_name)
    card = {k: v for k, v in (cfg.get('model_card') or {}).items()
            if k in ('dataset', 'split', 'metrics', 'metrics_source', 'recipe')}
    save_pretrained_folder(
        model, out_dir, label_names=label_names, model_kwargs=dict(given, **kwargs),
        pretrained_cfg=cfg['pretrained_cfg'], source=f"converted from the authors' checkpoint {original.name} "
        f'(sha256 {digest[:16]}), logits verified against the original layout (max diff {diff:.2g})',
        notes=f'Converted with python -m timm_rsmamba.convert from {original.name}.', **card)
    log(f'wrote {", ".join(sorted(p.name for p in out_dir.iterdir()))} to {out_dir} in {time.time() - start:.1f}s; '
        f"load it with timm.create_model('local-dir:{out_dir}', pretrained=True)")
    return model, out_dir


def _parse_kwargs(items):
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep:
            raise argparse.ArgumentTypeError(f'--model-kwargs expects KEY=VALUE, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m timm_rsmamba.convert', description=__doc__.split('\n\n')[0])
    parser.add_argument('original', help="the authors' mmpretrain checkpoint (.pth)")
    parser.add_argument('--config', required=True, help='hf_configs/<name> folder (or its config.json)')
    parser.add_argument('--out', default=None, help='output folder (default: converted/<config name>)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of metadata outside the allow-list (trusted files only)')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='model options overriding the config, e.g. cls_token_position=head depth=2 img_size=32')
    parser.add_argument('--batch-size', type=int, default=1, help='random images for the logit check')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--atol', type=float, default=1e-4)
    parser.add_argument('--rtol', type=float, default=1e-3, help='relative to the largest reference logit')
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(
            args.original, args.config, args.out, _parse_kwargs(args.model_kwargs), trust_pickle=args.trust_pickle,
            batch_size=args.batch_size, seed=args.seed, atol=args.atol, rtol=args.rtol)
    except (ConversionError, UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f'error: {err}')


if __name__ == '__main__':
    main()
