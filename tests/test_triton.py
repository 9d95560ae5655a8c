"""The Triton scan and conv kernels against the sequential / textbook references, in values and every gradient.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, which conftest.py sets before anything
imports triton; it has no bf16, so these tests are fp32; the bf16 ones are in test_gpu.py). With a GPU the same
tests run the compiled kernels on CUDA tensors.
"""
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import timm
from timm_rsmamba.ops import causal_conv1d, resolve_conv_backend, resolve_scan_backend, selective_scan
from timm_rsmamba.ops import token_orders, triton_support
from timm_rsmamba.ops.conv import causal_conv1d_reference
from timm_rsmamba.ops.scan import selective_scan_reference

from conftest import TINY
from test_ops import make_inputs

pytest.importorskip('triton', reason='the Triton kernels need the triton package (it comes with torch CUDA wheels)')
if not torch.cuda.is_available() and triton_support.unavailable_reason(torch.device('cpu')):
    pytest.skip(f"no GPU, and {triton_support.unavailable_reason(torch.device('cpu'))}", allow_module_level=True)

from timm_rsmamba.ops import triton_conv, triton_mix, triton_scan  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def _time_major(inputs):
    """(batch, dim, L) inputs as the mixer passes them: views of time-major (L, batch, dim) storage."""
    return {k: v.permute(2, 0, 1).contiguous().permute(1, 2, 0) if v is not None and v.dim() == 3 else v
            for k, v in inputs.items()}


def _leaves(inputs):
    return {k: v.to(DEVICE).requires_grad_() if v is not None else None for k, v in inputs.items()}


def _grads(out, tensors, weight):
    names = [k for k, v in tensors.items() if v is not None]
    return dict(zip(names, torch.autograd.grad((out * weight).sum(), [tensors[k] for k in names])))


def _assert_rel_close(a, b, rel, what):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)
    assert err <= rel, f'{what}: max relative difference {err:.2e} > {rel:g}'


@pytest.mark.parametrize('shape,chunk,flags', [
    ((2, 6, 37, 16), 16, {}),                                        # length not a multiple of the chunk
    ((1, 6, 64, 16), 16, {}),                                        # length a multiple of the chunk
    ((1, 20, 24, 16), 8, dict(with_d=False)),                        # channels past one block (16 + 4 masked)
    ((1, 5, 9, 4), 4, dict(with_z=False, with_d=False, with_bias=False)),  # S = 4, no z / D / delta_bias
    ((2, 3, 20, 8), None, dict(with_z=False)),                       # the default chunk, longer than L
    ((2, 4, 1, 16), None, {}),                                       # a single position
])
@pytest.mark.parametrize('softplus', [True, False])
def test_scan_matches_reference(shape, chunk, flags, softplus):
    if not softplus and shape[2] > 30:
        pytest.skip('delta_softplus=False is covered on the shorter shapes')
    raw = _time_major(make_inputs(*shape, **flags))
    if not softplus:  # then delta + delta_bias must be positive for a decaying state
        raw.update({k: raw[k].abs() for k in ('delta', 'delta_bias') if raw[k] is not None})
    x = _leaves(raw)
    out, last = triton_scan.selective_scan_triton(**x, delta_softplus=softplus, return_last_state=True,
                                                  chunk_len=chunk)
    ref, ref_last = selective_scan_reference(**x, delta_softplus=softplus, return_last_state=True)
    _assert_rel_close(out, ref, 1e-5, 'output')
    _assert_rel_close(last, ref_last, 1e-5, 'last state')
    weight = torch.randn_like(ref)
    grads, grads_ref = _grads(out, x, weight), _grads(ref, x, weight)
    for k in grads_ref:
        _assert_rel_close(grads[k], grads_ref[k], 1e-4, f'grad {k}')


def test_scan_saves_chunk_states_only_for_autograd():
    x = _leaves(_time_major(make_inputs(1, 4, 40, 16)))
    args = [x[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
    with torch.no_grad():
        _, states, last = triton_scan.selective_scan_fwd(*args, None, True, False, False, 16)
        _, saved, _ = triton_scan.selective_scan_fwd(*args, None, True, True, True, 16)
    assert states.shape == (1, 0, 16, 4) and last.numel() == 0  # inference: nothing beyond the output
    assert saved.shape == (1, 2, 16, 4)  # ceil(40 / 16) - 1 chunk ends, fp32 (S, dim) each
    first_chunk = {k: v[..., :16] if v is not None and v.dim() == 3 else v for k, v in x.items()}
    _, ref_state = selective_scan_reference(**first_chunk, delta_softplus=True, return_last_state=True)
    _assert_rel_close(saved[:, 0].transpose(1, 2), ref_state, 1e-5, 'state after the first chunk')
    with pytest.raises(RuntimeError, match='save_states=True'):
        triton_scan.selective_scan_bwd(torch.ones(40, 1, 4, device=DEVICE), *args, None, states, True, 16)


def _orders(length, paths):
    g = torch.Generator().manual_seed(length)
    cols = [torch.arange(length), torch.arange(length).flip(0), torch.randperm(length, generator=g)][:paths]
    return torch.stack(cols, dim=1).to(DEVICE)


def test_scan_reads_z_through_token_orders():
    """z read through an (L, paths) index = z gathered into (paths * B, dim, L) first; gradients summed back."""
    batch, paths, dim, length = 2, 3, 4, 12
    x = _leaves(_time_major(make_inputs(batch * paths, dim, length, 4)))
    z_src = torch.randn(length, batch, dim, device=DEVICE, requires_grad=True)
    order = _orders(length, paths)
    z_gathered = z_src.index_select(0, order.flatten()).view(length, paths * batch, dim).permute(1, 2, 0)
    rest = {k: v for k, v in x.items() if k != 'z'}
    out = triton_scan.selective_scan_triton(**rest, z=z_src.permute(1, 2, 0), delta_softplus=True, chunk_len=4,
                                            z_order=order)
    ref = selective_scan_reference(**rest, z=z_gathered, delta_softplus=True)
    _assert_rel_close(out, ref, 1e-5, 'output')
    weight = torch.randn_like(ref)
    tensors = dict(rest, z=z_src)
    grads, grads_ref = _grads(out, tensors, weight), _grads(ref, tensors, weight)
    for k in grads_ref:
        _assert_rel_close(grads[k], grads_ref[k], 1e-4, f'grad {k}')


@pytest.mark.parametrize('batch,dim,length,kernel,bias,activation', [
    (2, 5, 37, 4, True, 'silu'),
    (1, 70, 9, 4, True, 'silu'),    # channels past one block, length shorter than a tile
    (2, 8, 3, 4, False, None),      # length shorter than the kernel, no bias, no activation
    (2, 6, 40, 3, True, 'swish'),   # another kernel size
])
def test_conv_matches_reference(batch, dim, length, kernel, bias, activation):
    x_tm = torch.randn(length, batch, dim, device=DEVICE, requires_grad=True)
    w = torch.randn(dim, kernel, device=DEVICE, requires_grad=True)
    b = torch.randn(dim, device=DEVICE, requires_grad=True) if bias else None
    out = causal_conv1d(x_tm.permute(1, 2, 0), w, b, activation, backend='triton')
    ref = causal_conv1d_reference(x_tm.permute(1, 2, 0), w, b, activation)
    assert out.dtype == x_tm.dtype and out.permute(2, 0, 1).is_contiguous()  # time-major result
    _assert_rel_close(out, ref, 1e-5, 'output')
    weight = torch.randn_like(ref)
    tensors = dict(x=x_tm, w=w, b=b)
    grads, grads_ref = _grads(out, tensors, weight), _grads(ref, tensors, weight)
    for k in grads_ref:
        _assert_rel_close(grads[k], grads_ref[k], 1e-5, f'grad {k}')


def test_conv_reads_through_token_orders():
    batch, paths, dim, length = 2, 3, 6, 21
    x_src = torch.randn(length, batch, dim, device=DEVICE, requires_grad=True)
    w, b = torch.randn(dim, 4, device=DEVICE), torch.randn(dim, device=DEVICE)
    order = _orders(length, paths)
    out = triton_conv.causal_conv1d_triton(x_src.permute(1, 2, 0), w, b, 'silu', order=order)
    gathered = x_src.index_select(0, order.flatten()).view(length, paths * batch, dim).permute(1, 2, 0)
    ref = causal_conv1d_reference(gathered, w, b, 'silu')
    _assert_rel_close(out, ref, 1e-5, 'output')
    weight = torch.randn_like(ref)
    g, = torch.autograd.grad((out * weight).sum(), x_src)
    g_ref, = torch.autograd.grad((ref * weight).sum(), x_src)
    _assert_rel_close(g, g_ref, 1e-5, 'grad x')


def _mix_reference(xz, order, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A_log, D, dt_rank):
    """`MambaMixer.mix` spelt out on the reference ops."""
    length, dim = xz.shape[0], conv_w.shape[0]
    if order is not None:
        xz = xz.index_select(0, order.flatten()).view(length, -1, xz.shape[-1])
    x, z = xz.split(dim, dim=-1)
    xc = causal_conv1d_reference(x.permute(1, 2, 0), conv_w, conv_b, 'silu').permute(2, 0, 1)
    state = A_log.shape[1]
    dt, B, C = F.linear(xc, x_proj_w).split([dt_rank, state, state], dim=-1)
    y = selective_scan_reference(
        xc.permute(1, 2, 0), F.linear(dt, dt_proj_w).permute(1, 2, 0), -torch.exp(A_log), B.permute(1, 2, 0),
        C.permute(1, 2, 0), D, z.permute(1, 2, 0), dt_bias, delta_softplus=True)
    return y.permute(2, 0, 1)


@pytest.mark.parametrize('paths', [None, 3])
def test_fused_mix_matches_reference_ops(paths):
    """The one-function mixer (re-computes conv output, x_proj output and delta in backward), several chunks,
    and the gate's product that re-computes y, against the reference ops with plain autograd."""
    batch, length, dim, state, rank = 2, 21, 8, 4, 2  # three chunks of 8, the last one partial
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()  # noqa: E731
    params = dict(conv_w=r(dim, 4), conv_b=r(dim), x_proj_w=r(rank + 2 * state, dim) * 0.3,
                  dt_proj_w=r(dim, rank) * 0.3, dt_bias=r(dim), A_log=r(dim, state), D=r(dim))
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    xz = r(length, batch, 2 * dim)
    order = _orders(length, paths) if paths else None
    args = (xz, order, *params.values(), rank)
    out = triton_mix.mamba_mix_triton(*args, chunk=8)
    ref = _mix_reference(*args)
    _assert_rel_close(out, ref, 1e-5, 'output')
    weights = torch.rand(1, paths or 1, batch, 1, device=DEVICE, requires_grad=True)
    shape = (length, paths or 1, batch, dim)
    got = triton_mix.weigh_paths_triton(out.view(shape), weights, *args, chunk=8)
    expected = ref.view(shape) * weights
    tensors = dict(params, xz=xz, weights=weights)
    loss_weight = torch.randn(shape, device=DEVICE)
    grads, grads_ref = _grads(got, tensors, loss_weight), _grads(expected, tensors, loss_weight)
    for k in grads_ref:
        _assert_rel_close(grads[k], grads_ref[k], 1e-4, f'grad {k}')


@pytest.fixture(scope='module')
def tiny_reference():
    """A tiny model on the reference backends and its logits and parameter gradients for one batch."""
    torch.manual_seed(0)
    model = timm.create_model('rsmamba_small', scan_backend='reference', conv_backend='reference', num_classes=5,
                              **dict(TINY, intermediate_size=32, state_size=4)).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    logits = model(x)
    logits.logsumexp(-1).sum().backward()
    return model, x, logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('token_order,gate_recompute', [('kernel', '1'), ('gather', '0')])
def test_tiny_model_matches_reference_backends(tiny_reference, monkeypatch, token_order, gate_recompute):
    """Eval mode (fixed shuffle permutations) so both see the same orders; gradients flow all the same."""
    monkeypatch.setenv(token_orders.TOKEN_ORDER_ENV_VAR, token_order)
    monkeypatch.setenv(triton_support.GATE_RECOMPUTE_ENV_VAR, gate_recompute)
    ref_model, x, ref_logits, ref_grads = tiny_reference
    model = timm.create_model('rsmamba_small', scan_backend='triton', conv_backend='triton', num_classes=5,
                              **dict(TINY, intermediate_size=32, state_size=4)).to(DEVICE).eval()
    model.load_state_dict(ref_model.state_dict())
    assert 'scan_backend=triton, conv_backend=triton' in repr(model.blocks[0].mixer)
    logits = model(x)
    _assert_rel_close(logits, ref_logits, 1e-5, 'logits')
    logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        _assert_rel_close(g, ref_grads[name], 1e-4, f'grad {name}')


def block_saved_bytes_formula(batch, length, dim, inner, state, paths, chunk, act=2, autocast=True):
    """What autograd keeps for one MultiPathBlock (gate, Triton mixer, y re-computed for the gate) in training.

    ``act``: bytes of the activation dtype (2 under bf16 autocast, 4 in fp32). Parameters are not counted, but
    autocast's bf16 copies of the weights are.
    """
    tokens, f32, idx = batch * length, 4, 8
    n_chunks = -(-length // chunk)
    big = (f32 * tokens * dim                                     # pre-norm LayerNorm: its fp32 input x
           + act * tokens * dim                                   # in_proj: its input (pre-norm output)
           + act * tokens * 2 * inner                             # the mixer: xz, in_proj's output
           + f32 * paths * batch * (n_chunks - 1) * state * inner  # the scan's chunk-end states
           + act * tokens * inner)                                # out_proj: the merged orders
    small = (2 * f32 * tokens                                     # LayerNorm: mean and rstd
             + 2 * idx * length * paths                           # the order index and its inverse
             + act * paths * batch * (inner + dim)                # out_proj of the path means, the gate: inputs
             + act * batch * paths)                               # the gate's softmax weights
    weight_copies = act * (3 * inner * dim + paths * paths * dim) if autocast else 0  # in_proj, out_proj, gate
    return big + small + weight_copies


def _saved_bytes_of_one_block(model, batch, img_size):
    """Unique storages autograd saves during one block's forward (fake tensors: shapes only, no compute)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, img_size, img_size)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        tokens = model._pos_embed(model.patch_embed(x)).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.blocks[0](tokens, model.pre_norm, torch.randperm(tokens.shape[1]))
    return sum(saved.values())


@pytest.mark.skipif(DEVICE != 'cpu', reason='accounts with CPU fake tensors (shapes only)')
def test_saved_bytes_per_block_match_formula():
    """rsmamba_base, batch 128, 224 px, bf16 autocast: autograd keeps what the formula (docs/gpu-triton.md) says."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        model = timm.create_model('rsmamba_base', scan_backend='triton', conv_backend='triton').train()
        measured = _saved_bytes_of_one_block(model, 128, 224)
    expected = block_saved_bytes_formula(128, 784, 192, 384, 16, 3, triton_scan.CHUNK)
    assert measured == expected, f'{measured / 1e6:.3f} MB saved per block, formula says {expected / 1e6:.3f} MB'
    assert measured < 410e6  # 405 MB: 24 blocks keep 9.7 GB at batch 128 (fused mamba-ssm: 47 GB measured)


@pytest.mark.skipif(DEVICE != 'cpu', reason='accounts with CPU fake tensors (shapes only)')
def test_train_step_at_batch_128_fits_16_gib():
    """Peak memory of a whole rsmamba_base train step (forward, backward, AdamW) at batch 128, 224 px, bf16
    autocast, without checkpointing, tracked on fake tensors: activations, backward temporaries, weights,
    gradients, optimizer state."""
    pytest.importorskip('torch.distributed')
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    with FakeTensorMode():
        model = timm.create_model('rsmamba_base', scan_backend='triton', conv_backend='triton').train()
        opt = torch.optim.AdamW(model.parameters(), foreach=False)
        x, target = torch.randn(128, 3, 224, 224), torch.randint(0, 21, (128,))
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
        peak = tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']
    assert peak < 12 * 2 ** 30, f'train step peak {peak / 2 ** 30:.2f} GiB'  # 10.5 GiB: 16 GiB with room to spare


def test_ops_are_custom_ops_with_fake_and_autograd():
    x = _leaves(_time_major(make_inputs(2, 6, 20, 16)))
    scan_args = (*(x[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')), None, True, True, False, 8)
    conv_args = (x['u'], torch.randn(6, 4, device=DEVICE), torch.randn(6, device=DEVICE), None, True)
    checks = ('test_schema', 'test_autograd_registration', 'test_faketensor')
    for op, args in ((triton_scan.selective_scan_fwd, scan_args), (triton_conv.causal_conv1d_fwd, conv_args)):
        result = torch.library.opcheck(op, args, test_utils=checks)
        assert set(result.values()) == {'SUCCESS'}, result


def test_torch_compile_fullgraph_traces_the_ops():
    """dynamo traces the ops without a graph break (under the interpreter with backend='eager': inductor would
    need the kernels compiled; test_gpu.py compiles with inductor on CUDA)."""
    x = _leaves(_time_major(make_inputs(2, 6, 20, 16)))

    def scan_and_conv(u, delta, A, B, C, D, z, delta_bias):
        u = causal_conv1d(u, A[:, :4], D, 'silu', backend='triton')
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend='triton')

    compiled = torch.compile(scan_and_conv, fullgraph=True, backend='eager' if DEVICE == 'cpu' else 'inductor')
    out = compiled(**x)
    torch.testing.assert_close(out, scan_and_conv(**x))
    grads = torch.autograd.grad(out.sum(), [x['u'], x['A']])
    grads_eager = torch.autograd.grad(scan_and_conv(**x).sum(), [x['u'], x['A']])
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)
    if DEVICE == 'cpu':
        with pytest.raises(Exception, match='cannot trace interpreted Triton kernels'):
            torch.compile(scan_and_conv, fullgraph=True, backend='aot_eager')(**x)


def test_backend_errors_name_what_can_run(monkeypatch):
    u = torch.randn(1, 4, 8)
    monkeypatch.setattr(triton_support, 'interpreter_requested', lambda: False)
    with pytest.raises(RuntimeError, match="scan backend 'triton' cannot run here: CPU tensors need "
                                           "TRITON_INTERPRET=1.*Backends that can: 'auto', 'cpu_kernel'"):
        selective_scan(u, u, torch.randn(4, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8), backend='triton')
    with pytest.raises(RuntimeError, match="conv backend 'triton' cannot run here.*'auto', 'cpu_kernel', 'torch'"):
        causal_conv1d(u, torch.randn(4, 4), backend='triton')
    assert 'not on mps' in triton_support.unavailable_reason(torch.device('mps'))
    monkeypatch.setitem(sys.modules, 'triton', None)  # as if triton were not installed
    assert 'triton does not import' in triton_support.unavailable_reason(torch.device('cuda'))


def test_auto_prefers_triton_on_cuda_and_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv('RSMAMBA_SCAN_BACKEND', raising=False)
    monkeypatch.delenv('RSMAMBA_CONV_BACKEND', raising=False)
    cuda = torch.device('cuda')
    monkeypatch.setattr(triton_support, 'cuda_probe_error', lambda: None)
    assert resolve_scan_backend(None, cuda) == 'triton' and resolve_conv_backend(None, cuda) == 'triton'
    assert resolve_scan_backend(None, torch.device('cpu')) == 'cpu_kernel'  # CPU keeps its C++ default
    monkeypatch.setattr(triton_support, 'cuda_probe_error', lambda: 'ptxas not found')
    monkeypatch.setattr(triton_support, '_warned', set())
    with pytest.warns(UserWarning, match=r'Triton kernels do not run on this GPU \(ptxas not found\)'):
        assert resolve_scan_backend(None, cuda) in ('mamba_ssm', 'compiled')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per reason, not at every forward
        assert resolve_conv_backend(None, cuda) in ('causal_conv1d', 'torch')
    monkeypatch.setenv(token_orders.TOKEN_ORDER_ENV_VAR, 'sideways')
    with pytest.raises(ValueError, match='RSMAMBA_TOKEN_ORDER'):
        token_orders.token_order_mode()


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs Python, not Triton's compiler: compile every kernel for sm_90 (ptxas ships with triton)
    in a process without TRITON_INTERPRET, so that a compile error shows here and not in a GPU session."""
    import subprocess
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')):
        pytest.skip('this triton has no bundled ptxas (an AMD or CPU-only build)')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
    result = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu', 'triton_compile_check.py')],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count('compiled for sm_90') == 12, result.stdout
