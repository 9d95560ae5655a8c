"""RSMamba remote-sensing scene classifiers as a timm plugin.

Importing this package registers ``rsmamba_small/base/large/huge`` with timm, adds .tif/.tiff to the
image extensions timm's folder datasets read, and lets transformers load RSMamba hub folders
(``transformers_compat``).
"""
from timm.data import add_img_extensions as _add_img_extensions

from .models import RSMamba, checkpoint_filter_fn, convert_mmpretrain
from .ops import has_causal_conv1d, has_mamba_ssm, resolve_scan_backend, selective_scan
from .transformers_compat import install as _install_transformers_compat
from .version import __version__

_add_img_extensions(('.tif', '.tiff'))
_install_transformers_compat()
