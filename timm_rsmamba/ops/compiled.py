"""torch.compile'd kernels with an eager fall-back, shared by the scan and the conv."""
import warnings
from typing import Callable, Dict, Optional

import torch


class CompiledKernels:
    """Named functions run through torch.compile (inductor); if compiling fails (no C++ compiler, an
    unsupported device) they run eagerly from then on, once and for all, with a warning that says why."""

    def __init__(self, owner: str, options: Optional[Dict[str, Dict]] = None, **functions: Callable):
        self.owner = owner
        self.options = options or {}  # kernel name -> inductor settings for that kernel (torch.compile's options)
        self.eager: Dict[str, Callable] = functions
        self._compiled: Optional[Dict[str, Callable]] = None
        self.error: Optional[str] = None

    @property
    def usable(self) -> bool:
        return self.error is None

    def __call__(self, name: str, *args, compiled: bool = True):
        """Run kernel ``name``: compiled unless ``compiled=False`` or compiling has failed before."""
        if compiled and self.error is None:
            if self._compiled is None:
                self._compiled = {k: torch.compile(f, fullgraph=True, options=self.options.get(k))
                                  for k, f in self.eager.items()}
            try:
                return self._compiled[name](*args)
            except Exception as e:  # inductor needs a working toolchain; eager is always there
                self.error = f'{type(e).__name__}: {e}'.splitlines()[0]
                self._compiled = None
                warnings.warn(f'{self.owner}: torch.compile failed ({self.error}); running eagerly from now on')
        return self.eager[name](*args)
