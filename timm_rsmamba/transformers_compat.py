"""Let transformers load RSMamba hub folders (``timm_rsmamba.hub``'s and timm's ``save_for_hf``'s).

transformers' ``TimmWrapperForImageClassification`` builds the model as
``timm.create_model(architecture, num_classes=config.num_labels, **config.model_args)``, while timm (1.0.31)
writes ``num_classes`` into ``model_args`` as well: Python then refuses the call ("got multiple values for
keyword argument 'num_classes'") before any model code runs. Importing ``timm_rsmamba`` (needed anyway for
timm to know the architecture) teaches transformers' config to drop the duplicate when it describes an RSMamba
model; the root ``num_classes``, which transformers reads as ``num_labels``, says the same.

transformers is not imported for this: the fix is applied when (and if) its timm-wrapper config module is.
"""
import importlib.abc
import importlib.util
import sys

_CONFIG_MODULE = 'transformers.models.timm_wrapper.configuration_timm_wrapper'
_MARK = '_timm_rsmamba_num_classes_fix'


def _is_rsmamba(architecture) -> bool:
    return isinstance(architecture, str) and architecture.split('.')[0].startswith('rsmamba_')


def drop_duplicate_num_classes(config_dict: dict) -> dict:
    """``config_dict`` without ``model_args['num_classes']`` (kept at the root, where transformers reads it)."""
    model_args = config_dict.get('model_args')
    if not _is_rsmamba(config_dict.get('architecture')) or not isinstance(model_args, dict) \
            or 'num_classes' not in model_args:
        return config_dict
    fixed = dict(config_dict, model_args={k: v for k, v in model_args.items() if k != 'num_classes'})
    fixed.setdefault('num_classes', model_args['num_classes'])
    return fixed


def _patch(module):
    config_cls = getattr(module, 'TimmWrapperConfig', None)
    from_dict = getattr(config_cls, 'from_dict', None)
    if from_dict is None or getattr(from_dict, _MARK, False):
        return
    original = from_dict.__func__

    def patched_from_dict(cls, config_dict, **kwargs):
        return original(cls, drop_duplicate_num_classes(config_dict), **kwargs)

    setattr(patched_from_dict, _MARK, True)
    config_cls.from_dict = classmethod(patched_from_dict)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds transformers' timm-wrapper config module through the other finders, then patches it once loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _CONFIG_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


def install():
    """Apply the fix now if transformers' config module is loaded, else when it gets imported."""
    if _CONFIG_MODULE in sys.modules:
        _patch(sys.modules[_CONFIG_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
