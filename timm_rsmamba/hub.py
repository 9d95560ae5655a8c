"""RSMamba checkpoints on the HuggingFace hub, through timm's own hub machinery.

* ``create_model`` wraps ``timm.create_model`` so that 'hf-hub:ORG/REPO' / 'local-dir:PATH' names, unknown
  names, unreachable hubs and mismatched classifier heads fail with errors that say what to do.
* ``save_pretrained_folder`` writes a hub-ready folder (model.safetensors, config.json, README.md model card)
  with timm's ``save_for_hf``; ``push`` publishes the same content with timm's ``push_to_hf_hub``.

CLI::

    python -m timm_rsmamba.hub push CHECKPOINT --repo-id ORG/NAME [--private] [--revision R] [--dry-run DIR]
    python -m timm_rsmamba.hub make-configs [--out hf_configs]
"""
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.models import is_model, parse_model_name, split_model_name_tag

from . import models as _models  # noqa: F401  (registers rsmamba_* with timm)

__all__ = [
    'create_model', 'save_pretrained_folder', 'push', 'UnknownModelError', 'HubUnavailableError',
    'HeadMismatchError',
]


class UnknownModelError(ValueError):
    """The name is neither a registered timm model nor a 'hf-hub:' / 'local-dir:' source."""


class HubUnavailableError(RuntimeError):
    """A 'hf-hub:' model could not be fetched (offline, no network, missing or private repo)."""


class HeadMismatchError(RuntimeError):
    """The checkpoint's classifier head has a different number of classes than the model built."""


def rsmamba_names():
    """Registered RSMamba architectures and pretrained tags, for error messages."""
    return timm.list_models('rsmamba_*'), timm.list_models('rsmamba_*', include_tags=True)


def _unknown_model(name: str) -> UnknownModelError:
    archs, tagged = rsmamba_names()
    return UnknownModelError(
        f"unknown model '{name}'. RSMamba models: {', '.join(archs)}; with the paper's dataset configs: "
        f"{', '.join(tagged)}. Published or converted checkpoints load as 'hf-hub:ORG/REPO' or 'local-dir:PATH' "
        f"(a folder with config.json and model.safetensors).")


def _check_registry_name(name: str):
    arch, tag = split_model_name_tag(name)
    if not is_model(arch):
        raise _unknown_model(name)
    if tag and arch.startswith('rsmamba') and name not in timm.list_models(arch, include_tags=True):
        raise _unknown_model(name)


def _hub_errors():
    from huggingface_hub import errors
    return (
        errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError, errors.GatedRepoError, errors.EntryNotFoundError, errors.HfHubHTTPError,
        ConnectionError, TimeoutError,
    )


def _hub_error(repo: str, err: Exception) -> HubUnavailableError:
    from huggingface_hub import constants, errors
    if isinstance(err, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        why = 'the repository does not exist, is private or gated (set HF_TOKEN to a token that can read it)'
    elif isinstance(err, errors.RevisionNotFoundError):
        why = 'the requested revision does not exist'
    elif isinstance(err, errors.EntryNotFoundError) and not isinstance(err, errors.LocalEntryNotFoundError):
        why = 'the repository has no config.json / model.safetensors (is it a timm model repo?)'
    elif constants.HF_HUB_OFFLINE:
        why = 'HF_HUB_OFFLINE is set and the files are not in the local HuggingFace cache'
    else:
        why = 'the hub could not be reached and the files are not in the local HuggingFace cache'
    return HubUnavailableError(
        f"cannot load 'hf-hub:{repo}': {why}. To use it without the hub, download the repo once "
        f"(`hf download {repo} --local-dir DIR`) and load create_model('local-dir:DIR', pretrained=True); "
        f"a single weights file loads with create_model('rsmamba_base.ucm', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='PATH/model.safetensors')) using the tag that matches its dataset. "
        f"({type(err).__name__}: {err})")


_HEAD_MISMATCH = re.compile(
    r'size mismatch for head\.weight: copying a param with shape torch\.Size\(\[(\d+), \d+\]\) from checkpoint, '
    r'the shape in current model is torch\.Size\(\[(\d+), \d+\]\)')


def _head_error(name: str, err: RuntimeError) -> Optional[HeadMismatchError]:
    match = _HEAD_MISMATCH.search(str(err))
    if not match:
        return None
    ckpt, built = int(match.group(1)), int(match.group(2))
    return HeadMismatchError(
        f"'{name}': the checkpoint's classifier head has {ckpt} classes but the model was built with "
        f"num_classes={built}. Build it with num_classes={ckpt} (paper tags: .ucm=21, .aid=30, .nwpu=45), or to "
        f"start a fresh {built}-class head from these weights declare the checkpoint's classes, e.g. "
        f"pretrained_cfg_overlay=dict(file=..., num_classes={ckpt}) with num_classes={built}.")


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> Any:
    """``timm.create_model`` with RSMamba registered and actionable errors.

    Accepts registry names ('rsmamba_base', 'rsmamba_base.aid'), 'hf-hub:ORG/REPO[@REV]' and 'local-dir:PATH'.
    Raises UnknownModelError, HubUnavailableError or HeadMismatchError with the fix in the message.
    """
    source, model_id = parse_model_name(model_name)
    if source is None:
        _check_registry_name(model_id)
    elif source == 'local-dir':
        path = Path(model_id)
        if path.is_file():
            raise FileNotFoundError(
                f"'local-dir:' needs a folder holding config.json and model.safetensors, got the file {path}. "
                f"For a single weights file use create_model('rsmamba_base.ucm', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='{path}')) with the tag of its dataset.")
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(
                f"'local-dir:{model_id}': no config.json in {path.resolve()}. Point it at a folder written by "
                f"`python -m timm_rsmamba.convert` / `python -m timm_rsmamba.hub push --dry-run DIR`, or one "
                f"downloaded with `hf download ORG/REPO --local-dir DIR`.")
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except _hub_errors() as err:
        if source != 'hf-hub':
            raise
        raise _hub_error(model_id, err) from err
    except RuntimeError as err:
        unknown = re.fullmatch(r'Unknown model \((.+)\)', str(err))
        if unknown:
            raise _unknown_model(unknown.group(1)) from err
        head = _head_error(model_name, err)
        if head is not None:
            raise head from err
        raise


# ---- facts about the paper's checkpoints (spec: paper Table II, section III-B) ---------------------------
DATASETS = {
    'ucm': dict(folder='UC', title='UC Merced Land Use', split='the paper split (datainfo/UC train.txt / val.txt, '
                                                                 '70% of each class for training)'),
    'aid': dict(folder='AID', title='AID (Aerial Image Dataset)',
                split='the paper split (datainfo/AID train.txt / val.txt, 50% of each class for training)'),
    'nwpu': dict(folder='NWPU', title='NWPU-RESISC45',
                 split='the paper split (datainfo/NWPU train.txt / val.txt, 70% of each class for training)'),
}
PAPER_RESULTS = {  # macro precision / recall / F1 (%), paper Table II
    ('base', 'ucm'): (94.14, 93.97, 93.88), ('base', 'aid'): (92.02, 91.53, 91.66),
    ('base', 'nwpu'): (94.87, 94.87, 94.84), ('large', 'ucm'): (95.03, 94.76, 94.74),
    ('large', 'aid'): (92.31, 91.75, 91.90), ('large', 'nwpu'): (95.03, 95.05, 95.02),
    ('huge', 'ucm'): (95.47, 95.23, 95.25), ('huge', 'aid'): (92.97, 92.51, 92.63),
    ('huge', 'nwpu'): (95.22, 95.19, 95.18),
}
PAPER_RECIPE = (
    '224 px input; AdamW lr 5e-4, weight decay 0.05 on every parameter; 10-epoch linear warm-up (start factor '
    '1e-3) then cosine to 1e-5; 500 epochs; label smoothing 0.1; Mixup 0.8 + CutMix 1.0; RandomResizedCrop '
    '(scale 0.4-1, bicubic) + horizontal/vertical flips + AutoAugment; eval: resize 256 (bicubic), center crop '
    '224; checkpoint selected by macro F1')
CITATION = """@article{chen2024rsmamba,
  title={RSMamba: Remote Sensing Image Classification with State Space Model},
  author={Chen, Keyan and Chen, Bowen and Liu, Chenyang and Li, Wenyuan and Zou, Zhengxia and Shi, Zhenwei},
  journal={IEEE Geoscience and Remote Sensing Letters},
  year={2024},
  eprint={2403.19654},
  archivePrefix={arXiv}
}"""

# kwargs that choose how a model runs, not what it computes: never part of an exported config
_RUNTIME_KWARGS = {
    'scan_backend', 'conv_backend', 'device', 'dtype', 'drop_rate', 'drop_path_rate', 'pretrained_cfg',
    'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir', 'pretrained_model_args', 'features_only',
}
_DATA_KEYS = ('mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_METRIC_ALIASES = (  # card label, accepted keys (case-insensitive) in a metrics dict
    ('Top-1 accuracy', ('top1', 'top-1', 'acc1', 'top1_acc', 'accuracy', 'acc')),
    ('Top-5 accuracy', ('top5', 'top-5', 'acc5', 'top5_acc')),
    ('Macro precision', ('macro_precision', 'precision', 'macro_p')),
    ('Macro recall', ('macro_recall', 'recall', 'macro_r')),
    ('Macro F1', ('macro_f1', 'f1', 'macro_f1_score', 'f1_score')),
)


def _pair(v):
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def variant_defaults(architecture: str) -> Dict[str, Any]:
    """Constructor values an architecture gets when no kwargs are passed (RSMamba variants only)."""
    import inspect
    from .models import RSMamba
    from .models import rsmamba as rsmamba_module
    size = architecture.replace('rsmamba_', '', 1)
    variants = getattr(rsmamba_module, '_VARIANTS', {})
    if not architecture.startswith('rsmamba_') or size not in variants:
        return {}
    params = inspect.signature(RSMamba.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    defaults.update(variants[size])
    cfg = timm.models.get_pretrained_cfg(architecture)
    if cfg is not None:
        defaults.update(num_classes=cfg.num_classes, in_chans=cfg.input_size[0], img_size=list(cfg.input_size[1:]))
    return defaults


def export_model_args(architecture: str, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model kwargs that differ from the variant's defaults, JSON-ready; runtime-only options dropped."""
    defaults = variant_defaults(architecture)
    out = {}
    for key, value in (model_kwargs or {}).items():
        if key in _RUNTIME_KWARGS or value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if key in defaults:
            default = defaults[key]
            if key == 'img_size':
                value, default = _pair(value), _pair(default)
            if value == default:
                continue
        out[key] = value
    return out


class _ExportArgs:
    """Temporarily give a model the factory kwargs and pretrained cfg save_for_hf should write.

    timm writes ``model._model_args`` and ``model.pretrained_cfg``; ours are the kwargs that differ from the
    variant's defaults, and the cfg without its tag: the default cfg's '.ucm' would label any model as UC Merced
    weights, and an export that has a tag (converted paper weights) names it in model_config, which timm merges on top.
    """

    def __init__(self, model, model_args):
        self.model, self.model_args = model, model_args

    def __enter__(self):
        self.saved_args = getattr(self.model, '_model_args', None)
        self.saved_cfg = self.model.pretrained_cfg
        self.model._model_args = dict(self.model_args)
        self.model.pretrained_cfg = {k: v for k, v in self.saved_cfg.items() if k != 'tag'}

    def __exit__(self, *exc):
        self.model.pretrained_cfg = self.saved_cfg
        if self.saved_args is None:
            del self.model._model_args
        else:
            self.model._model_args = self.saved_args


def normalize_metrics(metrics: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Numeric entries of a metrics dict (a top-level 'metrics' sub-dict is looked into), in card order."""
    if not metrics:
        return {}
    flat = dict(metrics)
    if isinstance(flat.get('metrics'), dict):
        flat.update(flat.pop('metrics'))
    numbers = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out, used = {}, set()
    for label, aliases in _METRIC_ALIASES:
        for key in numbers:
            if key.lower() in aliases and key not in used:
                out[label] = numbers[key]
                used.add(key)
                break
    out.update({k: v for k, v in numbers.items() if k not in used})
    return out


def _fmt(value: float) -> str:
    return f'{value:.4f}'.rstrip('0').rstrip('.') if abs(value) < 1 else f'{value:.2f}'


def build_model_card(
        model, cfg: Dict[str, Any], name: str, label_names, dataset: Optional[str] = None, split: Optional[str] = None,
        metrics: Optional[Dict[str, float]] = None, metrics_source: Optional[str] = None, recipe: Any = None,
        load_name: Optional[str] = None, source: Optional[str] = None,
        bands: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model card as timm's ``generate_readme`` takes it; ``cfg`` is the exported pretrained_cfg."""
    n_params = sum(p.numel() for p in model.parameters())
    details = {
        'Model Type': 'Remote-sensing scene classification (RSMamba: multi-path Mamba state-space blocks)',
        'Architecture': cfg.get('architecture'),
        'Model Stats': {
            'Params (M)': f'{n_params / 1e6:.2f}',
            'Image size': 'x'.join(str(s) for s in cfg.get('input_size', (3, 224, 224))[1:]),
            'Classes': len(label_names),
        },
    }
    if dataset:
        details['Dataset' if not re.search(r'\s', dataset) else 'Training data'] = dataset
    if split:
        details['Split'] = split
    if recipe:
        details['Recipe'] = recipe
    if source:
        details['Weights'] = source
    details['Papers'] = {
        'RSMamba: Remote Sensing Image Classification with State Space Model': 'https://arxiv.org/abs/2403.19654'}
    details['Original'] = 'https://github.com/KyanChen/RSMamba'
    if bands:
        from .data.bands import BandSpec
        spec = BandSpec.from_dict(bands)
        inputs = (f'Input: {spec.describe()} (config.json `bands`; validate.py and inference.py apply it). '
                  f'Multi-band images are read as float32 tensors (not Pillow); ')
        scale = 'the units of those values'
    else:
        inputs, scale = '', '0-1 scale'
    description = (
        f'RSMamba ({cfg.get("architecture")}) image classifier for {dataset or "remote-sensing scenes"}, '
        f'in the timm format of the timm-rsmamba plugin. {inputs}Preprocessing: resize to '
        f'{round(cfg.get("input_size", (3, 224))[1] / cfg.get("crop_pct", 1))} px ({cfg.get("interpolation")}), '
        f'center crop {cfg.get("input_size", (3, 224))[1]}, normalize with mean {_round(cfg.get("mean"))} and '
        f'std {_round(cfg.get("std"))} ({scale}).\n')
    metrics = metrics or {}
    if metrics:
        description += f'\n## Results\n\n{metrics_source or "Measured"} on {dataset or "the evaluation set"}' \
                       f'{", " + split if split else ""}:\n\n| Metric | Value |\n|---|---|\n'
        description += ''.join(f'| {k} | {_fmt(v)} |\n' for k, v in metrics.items())
    description += '\nClass index order (label_names in config.json): ' + ', '.join(
        f'{i}: {n}' for i, n in enumerate(label_names)) + '\n'
    usage = (
        '```python\nimport timm\nimport timm_rsmamba  # registers RSMamba with timm\nfrom PIL import Image\n\n'
        f"model = timm.create_model('{load_name or 'hf-hub:ORG/' + name}', pretrained=True).eval()\n"
        'config = timm.data.resolve_data_config(model=model)\n'
        'transform = timm.data.create_transform(**config)\n'
        "x = transform(Image.open('scene.jpg').convert('RGB')).unsqueeze(0)\n"
        "probs = model(x).softmax(-1)\nlabel_names = model.pretrained_cfg['label_names']\n"
        'print(label_names[probs.argmax().item()])\n```\n')
    return dict(
        tags=['image-classification', 'timm', 'rsmamba', 'remote-sensing', 'mamba'],
        license=cfg.get('license', 'apache-2.0'), details=details, description=description, usage=usage,
        citation=CITATION)


def _round(values):
    return None if values is None else [round(float(v), 4) for v in values]


def _export_parts(
        model, label_names, model_kwargs=None, pretrained_cfg=None, metrics=None, metrics_source=None,
        dataset=None, split=None, recipe=None, repo_id=None, load_name=None, source=None, notes=None, bands=None):
    """(model_config, model_card, model_args) shared by the local folder and the hub upload.

    ``bands`` (a multi-band run's BandSpec dict: selection, names, sample type, reflectance scale) goes into
    config.json beside label_names, where validate.py and inference.py read it for 'local-dir:' / 'hf-hub:' models.
    """
    label_names = list(label_names or model.pretrained_cfg.get('label_names') or [])
    if len(label_names) != model.num_classes:
        raise ValueError(
            f'{len(label_names)} label names for a {model.num_classes}-class head: pass one name per class, '
            f'in the head\'s index order')
    architecture = model.pretrained_cfg.get('architecture')
    if model_kwargs is None:
        model_kwargs = getattr(model, '_model_args', {})
    model_args = export_model_args(architecture, model_kwargs)
    overrides = {k: v for k, v in (pretrained_cfg or {}).items() if k in _DATA_KEYS and v is not None}
    built = _built_input_size(model)
    if not (pretrained_cfg or {}).get('input_size') and built is not None:
        # RSMamba takes any size (dynamic_img_size), so timm would export the default cfg's 224 px; the size it
        # was built for (its position embedding's native grid) is the one to recommend
        overrides['input_size'] = built
    for key in ('mean', 'std'):
        if key in overrides:
            overrides[key] = [float(v) for v in overrides[key]]
    overrides['label_names'] = label_names
    overrides['notes'] = notes or 'Exported with timm-rsmamba (timm_rsmamba.hub).'
    # only a tag the caller's cfg names (converted paper weights): a model trained on other data must not
    # inherit the '.ucm' default cfg's tag, which would label it as UC Merced weights
    tag = (pretrained_cfg or {}).get('tag')
    if tag:
        overrides['tag'] = tag
    metrics = normalize_metrics(metrics)
    card_info = {k: v for k, v in dict(
        dataset=dataset, split=split, metrics=metrics, metrics_source=metrics_source, recipe=recipe,
        source=source).items() if v}
    model_config = dict(label_names=label_names, pretrained_cfg=overrides, model_card=card_info)
    if bands:
        model_config['bands'] = dict(bands)
    name = repo_id.split('/')[-1] if repo_id else architecture
    # the input size the exported model takes (older timm: the pretrained cfg's)
    current = getattr(timm.data, 'resolve_input_data_config', timm.data.resolve_model_data_config)(model)
    card_cfg = {**model.pretrained_cfg, 'input_size': current['input_size'], **overrides}
    card = build_model_card(
        model, card_cfg, name, label_names, dataset, split, metrics, metrics_source, recipe,
        load_name or (f'hf-hub:{repo_id}' if repo_id else None), source, bands)
    return model_config, card, model_args


def _built_input_size(model):
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is None or not hasattr(model, 'in_chans'):
        return None
    return [int(model.in_chans), *[int(s) for s in img_size]]


def save_pretrained_folder(
        model, out_dir, label_names=None, model_kwargs=None, pretrained_cfg=None, metrics=None, dataset=None,
        split=None, recipe=None, metrics_source=None, repo_id=None, source=None, notes=None, bands=None) -> Path:
    """Write model.safetensors + config.json + README.md (timm's save_for_hf and generate_readme).

    config.json carries architecture, num_classes, label_names, model_args (kwargs that differ from the variant's
    defaults; timm always adds num_classes, img_size and global_pool), pretrained_cfg (mean/std, input size, crop,
    interpolation) and a ``model_card`` section that ``push`` reuses when the folder is published later.
    """
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme
    out_dir = Path(out_dir)
    model_config, card, model_args = _export_parts(
        model, label_names, model_kwargs, pretrained_cfg, metrics, metrics_source, dataset, split, recipe,
        repo_id, load_name=None if repo_id else f'local-dir:{out_dir}', source=source, notes=notes, bands=bands)
    with _ExportArgs(model, model_args):
        save_for_hf(model, out_dir, model_config=model_config, model_args=model_args, safe_serialization=True)
    name = repo_id.split('/')[-1] if repo_id else out_dir.name
    (out_dir / 'README.md').write_text(generate_readme(card, name), encoding='utf-8')
    return out_dir


# ---- loading what gets published ----------------------------------------------------------------------------
def _recipe_from_args(args) -> Optional[Dict[str, Any]]:
    """The training hyper-parameters worth a model card, from a train.py checkpoint's args."""
    if args is None:
        return None
    args = vars(args) if not isinstance(args, dict) else args
    keys = ('epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'min_lr', 'smoothing',
            'mixup', 'cutmix', 'aa', 'scale', 'hflip', 'vflip', 'drop_path', 'model_ema', 'amp', 'seed')
    recipe = {k: args[k] for k in keys if args.get(k) not in (None, '', False)}
    return recipe or None


def load_training_checkpoint(path, use_ema: bool = False, trust_pickle: bool = False):
    """Model + export metadata from a train.py checkpoint.

    The checkpoint is a dict with 'state_dict', 'arch', 'label_names', 'model_kwargs', 'pretrained_cfg' (and
    optionally 'args', 'metrics', 'state_dict_ema').
    """
    from timm.models import clean_state_dict
    from .convert import load_torch_file
    ckpt = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'arch' not in ckpt:
        found = ', '.join(sorted(ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path}: not a train.py checkpoint (needs 'state_dict' and 'arch' keys, found: {found}). The authors' "
            f"mmpretrain .pth files convert with `python -m timm_rsmamba.convert`.")
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in ckpt:
        raise ValueError(f'{path}: --use-ema given but the checkpoint has no state_dict_ema (train without EMA?)')
    state_dict = clean_state_dict(ckpt[key])
    model_kwargs = dict(ckpt.get('model_kwargs') or {})
    if 'num_classes' not in model_kwargs:
        head = state_dict.get('head.weight')
        num_classes = ckpt.get('num_classes', head.shape[0] if head is not None else None)
        if num_classes is not None:
            model_kwargs['num_classes'] = num_classes
    overlay = {k: v for k, v in (ckpt.get('pretrained_cfg') or {}).items() if k in _DATA_KEYS + ('input_size',)}
    model = create_model(ckpt['arch'], pretrained_cfg_overlay=overlay or None, **model_kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        head = _head_error(str(path), err)
        raise (head or RuntimeError(f'{path}: weights do not fit {ckpt["arch"]} with {model_kwargs}: {err}')) from err
    args = ckpt.get('args')
    arg_dict = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    metrics = ckpt.get('metrics')
    if not metrics and ckpt.get('metric') is not None:  # timm's saver keeps the value of --eval-metric
        metrics = {arg_dict.get('eval_metric') or 'eval_metric': float(ckpt['metric'])}
    info = dict(
        label_names=ckpt.get('label_names'), model_kwargs=model_kwargs, pretrained_cfg=ckpt.get('pretrained_cfg'),
        metrics=metrics, recipe=_recipe_from_args(args), dataset=arg_dict.get('dataset') or _folder_name(arg_dict),
        bands=ckpt.get('bands'))
    return model, info


def _folder_name(arg_dict) -> Optional[str]:
    """A folder-trained run's data folder name (e.g. 'ucm_paper'), what the card can say of its dataset."""
    data_dir = arg_dict.get('data_dir')
    return os.path.basename(os.path.normpath(data_dir)) if data_dir else None


def load_folder(folder):
    """Model + export metadata from a folder written by save_pretrained_folder / convert."""
    import json
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text())
    model = create_model(f'local-dir:{folder}', pretrained=True)
    info = dict(
        label_names=config.get('label_names'), model_kwargs=config.get('model_args') or {},
        pretrained_cfg=config.get('pretrained_cfg'), bands=config.get('bands'))
    info.update(config.get('model_card') or {})
    return model, info


def push(
        checkpoint_or_folder, repo_id: str, private: bool = False, revision: Optional[str] = None,
        token: Optional[str] = None, dry_run=None, dataset=None, split=None, metrics=None, recipe=None,
        label_names=None, use_ema: bool = False, trust_pickle: bool = False,
        commit_message: str = 'Add RSMamba model'):
    """Publish a train.py checkpoint or a converted/saved folder with timm's push_to_hf_hub.

    ``dry_run=DIR`` writes exactly the files that would be uploaded into DIR and touches no network. The token
    defaults to the HF_TOKEN environment variable (then to a stored ``hf auth login``). Given dataset / split /
    metrics / recipe override what the checkpoint or folder records.
    """
    import os
    source = Path(checkpoint_or_folder)
    if source.is_dir():
        model, info = load_folder(source)
    elif source.is_file():
        model, info = load_training_checkpoint(source, use_ema=use_ema, trust_pickle=trust_pickle)
    else:
        raise FileNotFoundError(f'{source}: no such checkpoint file or folder')
    given = dict(dataset=dataset, split=split, metrics=metrics, recipe=recipe, label_names=label_names)
    info.update({k: v for k, v in given.items() if v})
    if dry_run:
        return save_pretrained_folder(model, dry_run, repo_id=repo_id, **info)

    from huggingface_hub import HfApi, get_token
    from timm.models import push_to_hf_hub
    token = token or os.environ.get('HF_TOKEN') or get_token()
    if not token:
        raise HubUnavailableError(
            f'no HuggingFace token to push to {repo_id}: set HF_TOKEN to a write token (or run `hf auth login`), '
            f'or use --dry-run DIR to write the folder locally')
    model_config, card, model_args = _export_parts(model, repo_id=repo_id, **info)
    try:
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _ExportArgs(model, model_args):
            return push_to_hf_hub(
                model, repo_id, commit_message=commit_message, token=token, revision=revision, private=private,
                model_config=model_config, model_card=card, model_args=model_args, safe_serialization=True)
    except _hub_errors() as err:
        raise HubUnavailableError(
            f'pushing to {repo_id} failed: {type(err).__name__}: {err}. Check the network, that HF_TOKEN can write '
            f'to {repo_id.split("/")[0]}, or use --dry-run DIR to write the folder locally.') from err


# ---- hf_configs/: the paper's checkpoints ----------------------------------------------------------------
def read_datainfo(folder) -> Dict[str, Any]:
    """label_names (cls_names.txt order) and 0-1 mean/std (meanstd.txt / 255) of one datainfo folder."""
    folder = Path(folder)
    label_names = [line.strip() for line in (folder / 'cls_names.txt').read_text().splitlines() if line.strip()]
    text = (folder / 'meanstd.txt').read_text()
    stats = {}
    for key in ('mean', 'std'):
        match = re.search(key + r':\s*\[([^\]]*)\]', text)
        if not match:
            raise ValueError(f"{folder / 'meanstd.txt'}: no '{key}: [...]' entry")
        stats[key] = [float(v) / 255. for v in match.group(1).split()]
    return dict(label_names=label_names, **stats)


def make_configs(out_dir, datainfo_dir) -> list:
    """Write hf_configs/rsmamba_{base,large,huge}.{ucm,aid,nwpu}/config.json from the paper's facts."""
    from timm.models._hub import save_config_for_hf
    written = []
    for (size, tag), (precision, recall, f1) in PAPER_RESULTS.items():
        ds = DATASETS[tag]
        data = read_datainfo(Path(datainfo_dir) / ds['folder'])
        name = f'rsmamba_{size}.{tag}'
        model = timm.create_model(name, device='meta', num_classes=len(data['label_names']))
        pretrained_cfg = dict(mean=data['mean'], std=data['std'], tag=tag)
        model_config, _, model_args = _export_parts(
            model, data['label_names'], {}, pretrained_cfg,
            metrics={'macro_precision': precision, 'macro_recall': recall, 'macro_f1': f1},
            metrics_source='Reported in the paper (Table II, %)', dataset=ds['title'], split=ds['split'],
            recipe=PAPER_RECIPE, source="the authors' released checkpoint (https://huggingface.co/KyanChen/RSMamba)",
            notes=f"The authors' {ds['title']} checkpoint: convert it with `python -m timm_rsmamba.convert "
                  f"ORIGINAL.pth --config hf_configs/{name}`.")
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        with _ExportArgs(model, model_args):
            save_config_for_hf(model, folder / 'config.json', model_config=model_config, model_args=model_args)
        written.append(folder / 'config.json')
    return written


def _default_datainfo() -> Path:
    return Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'rsmamba_datainfo'


def main(argv=None):
    import argparse
    import json
    parser = argparse.ArgumentParser(prog='python -m timm_rsmamba.hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('push', help='publish a train.py checkpoint or a converted folder')
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar) or a folder with config.json + weights')
    p.add_argument('--repo-id', required=True, help='ORG/NAME on the HuggingFace hub')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    p.add_argument('--dry-run', metavar='DIR', default=None, help='write the upload folder here, do not push')
    p.add_argument('--dataset', default=None, help='dataset the model was trained on (model card)')
    p.add_argument('--split', default=None, help='train/eval split description (model card)')
    p.add_argument('--recipe', default=None, help='training recipe summary (model card)')
    p.add_argument('--metrics-file', default=None, help='JSON of evaluation metrics (validate.py output)')
    p.add_argument('--label-names', default=None, help='text file, one class name per line in head order')
    p.add_argument('--use-ema', action='store_true', help="publish the checkpoint's EMA weights")
    p.add_argument('--trust-pickle', action='store_true',
                   help='allow full unpickling of a checkpoint with non-allow-listed objects (trusted files only)')
    p.add_argument('--commit-message', default='Add RSMamba model')
    c = sub.add_parser('make-configs', help='regenerate hf_configs/ from the paper facts and datainfo files')
    c.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'hf_configs'))
    c.add_argument('--datainfo', default=str(_default_datainfo()),
                   help='folder with UC/AID/NWPU cls_names.txt and meanstd.txt')
    args = parser.parse_args(argv)

    if args.command == 'make-configs':
        for path in make_configs(args.out, args.datainfo):
            print(f'wrote {path}')
        return
    metrics = None
    if args.metrics_file:
        metrics_path = Path(args.metrics_file)
        if not metrics_path.is_file():
            parser.error(f'--metrics-file {metrics_path}: no such file')
        metrics = json.loads(metrics_path.read_text())
    label_names = None
    if args.label_names:
        label_names = [n.strip() for n in Path(args.label_names).read_text().splitlines() if n.strip()]
    result = push(
        args.checkpoint, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
        dataset=args.dataset, split=args.split, metrics=metrics, recipe=args.recipe, label_names=label_names,
        use_ema=args.use_ema, trust_pickle=args.trust_pickle, commit_message=args.commit_message)
    if args.dry_run:
        files = sorted(p.name for p in Path(result).iterdir())
        print(f'dry run: wrote {", ".join(files)} to {result} (would push to {args.repo_id}'
              f'{"@" + args.revision if args.revision else ""}{", private" if args.private else ""})')
    else:
        print(f'pushed to https://huggingface.co/{args.repo_id} ({result})')


if __name__ == '__main__':
    main()
