import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's CPU interpreter (tests/test_triton.py);
    os.environ.setdefault('TRITON_INTERPRET', '1')  # Triton reads this when it is imported, and timm imports it

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
