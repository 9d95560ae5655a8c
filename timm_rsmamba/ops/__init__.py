from .conv import causal_conv1d, causal_conv1d_reference, has_causal_conv1d, resolve_conv_backend
from .scan import (
    SCAN_BACKENDS, has_mamba_ssm, resolve_scan_backend, selective_scan, selective_scan_chunked,
    selective_scan_compiled, selective_scan_cpu_kernel, selective_scan_reference, selective_scan_triton)
