import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's CPU interpreter (tests/test_triton.py);
    os.environ.setdefault('TRITON_INTERPRET', '1')  # Triton reads this when it is imported, and timm imports it


def _ops_source_hash() -> str:
    ops = Path(__file__).resolve().parents[1] / 'timm_rsmamba' / 'ops'
    digest = hashlib.sha256()
    for path in sorted([*ops.glob('*.py'), *ops.glob('csrc/*')]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


# torch.compile's caches key a graph by its forward: a custom op's changed backward (an output's shape, what
# autograd does with it) would replay the old one (pytorch/pytorch#144344). A cache per version of the ops.
os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'torchinductor_rsmamba_tests_{_ops_source_hash()}'))

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real data not found at {SHARED_DATA} (the project expects ../shared/data beside the checkout)')
    return SHARED_DATA
