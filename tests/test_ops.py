"""The fast scan and conv backends against plain sequential / textbook references."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from timm_rsmamba.ops import causal_conv1d, resolve_scan_backend, selective_scan
from timm_rsmamba.ops.conv import (
    causal_conv1d_cpu_kernel, causal_conv1d_reference, causal_conv1d_torch, resolve_conv_backend)
from timm_rsmamba.ops import conv as conv_module
from timm_rsmamba.ops import scan as scan_module
from timm_rsmamba.ops.compiled import CompiledKernels
from timm_rsmamba.ops import cpu_kernel as cpu_kernel_module
from timm_rsmamba.ops import triton_support
from timm_rsmamba.ops.scan import (
    BACKEND_ENV_VAR, selective_scan_chunked, selective_scan_compiled, selective_scan_cpu_kernel,
    selective_scan_reference)


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """The spec's recurrence written out with Python scalars-per-position loops (float64)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    delta = F.softplus(delta)
    b, d, L = u.shape
    y = torch.zeros(b, d, L, dtype=torch.float64)
    for bi in range(b):
        h = torch.zeros(d, A.shape[1], dtype=torch.float64)
        for t in range(L):
            h = torch.exp(delta[bi, :, t, None] * A) * h + delta[bi, :, t, None] * u[bi, :, t, None] * B[bi, None, :, t]
            y[bi, :, t] = h @ C[bi, :, t]
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def make_inputs(b, d, L, n, with_d=True, with_z=True, with_bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + d * 100 + L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) * 8 - 0.1,
        B=r(b, n, L), C=r(b, n, L), D=r(d) if with_d else None, z=r(b, d, L) if with_z else None,
        delta_bias=r(d) if with_bias else None)


def test_reference_matches_naive_loop():
    x = make_inputs(2, 3, 9, 4)
    y = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(y.double(), naive_scan(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,chunk', [
    ((2, 6, 37, 16), 8),      # length not a multiple of the chunk
    ((2, 6, 1, 16), None),    # a single position
    ((1, 8, 300, 16), 32),    # long sequence, many chunks
    ((3, 4, 20, 4), 1),       # chunk of one position
    ((2, 5, 17, 8), 64),      # chunk longer than the sequence
])
@pytest.mark.parametrize('opts', [dict(), dict(with_d=False, with_z=False, with_bias=False)])
def test_chunked_matches_reference_values_and_grads(shape, chunk, opts):
    assert_matches_reference(make_inputs(*shape, **opts), selective_scan_chunked, chunk_len=chunk)


def test_softplus_gradient_is_finite_where_exp_underflows_against_one():
    """Where 1 + exp(-|x|) rounds to 1 (|x| > 17 in float32), the log1p branch not taken divided 0 by 0, and
    torch.where's backward turned that into a NaN gradient (0 * inf): the compiled backend trained to NaN
    under inductor's AVX2 code. The gradient must be sigmoid(x), finite everywhere."""
    x = torch.tensor([-40., -20., -17., -1., 1., 17., 20., 40.], requires_grad=True)
    scan_module._softplus(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()))


@pytest.mark.parametrize('opts', [dict(), dict(with_d=False, with_z=False, with_bias=False)])
def test_compiled_matches_reference_values_and_grads(opts):
    """torch.compile'd chunk kernels (forced even at this size), a tail chunk included; the last state too
    (the forward keeps states state-major, it must come back as (batch, dim, state))."""
    x = make_inputs(2, 6, 37, 16, **opts)
    assert_matches_reference(x, selective_scan_compiled, chunk_len=8, min_compile_elements=0)
    with_grad = leaf_copies(x)  # same graphs
    _, h_new = selective_scan_compiled(**with_grad, delta_softplus=True, return_last_state=True, chunk_len=8,
                                       min_compile_elements=0)
    _, h_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    assert h_new.shape == h_ref.shape and h_new.is_contiguous()
    torch.testing.assert_close(h_new, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,chunk', [
    ((2, 6, 37, 16), 8),      # the unrolled 16-state groups; a tail chunk
    ((2, 20, 45, 16), 8),     # 20 channels: a full and a partial vector block
    ((2, 6, 1, 16), None),    # a single position
    ((1, 8, 300, 16), 32),    # long sequence, many chunks
    ((3, 5, 20, 4), 3),       # a state smaller than a register group
    ((1, 70, 50, 19), 7),     # 19 states (full groups and a tail), one sequence cut into ranges of blocks
])
@pytest.mark.parametrize('opts', [dict(), dict(with_d=False, with_z=False, with_bias=False)])
def test_cpu_kernel_matches_reference_values_and_grads(shape, chunk, opts):
    """The C++ forward and backward against the sequential reference and its autograd."""
    x = make_inputs(*shape, **opts)
    assert_matches_reference(x, selective_scan_cpu_kernel, chunk_len=chunk)
    assert cpu_kernel_module.CPU_KERNELS.library is not None, cpu_kernel_module.CPU_KERNELS.error
    _, h_new = selective_scan_cpu_kernel(**x, delta_softplus=True, return_last_state=True, chunk_len=chunk)
    _, h_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    assert h_new.shape == h_ref.shape and h_new.is_contiguous()
    torch.testing.assert_close(h_new, h_ref, rtol=1e-5, atol=1e-5)


def with_low_rank_dt(x, rank):
    """The inputs with delta replaced by a low-rank dt (batch, rank, L) and a projection (dim, rank)."""
    b, d, L = x['u'].shape
    g = torch.Generator().manual_seed(rank)
    return dict(x, delta=torch.randn(b, rank, L, generator=g),
                delta_proj_weight=torch.randn(d, rank, generator=g) * 0.5 / rank ** 0.5)


def reference_of_projected_delta(delta, delta_proj_weight, **rest):
    """The sequential reference on delta = W dt, projected by einsum."""
    return selective_scan_reference(delta=torch.einsum('dr,brl->bdl', delta_proj_weight, delta), **rest)


@pytest.mark.parametrize('shape,rank,chunk', [
    ((2, 20, 45, 16), 5, 8),    # a full and a partial block; 45 positions: a tile, rows of 8 and a tail
    ((1, 70, 50, 19), 3, 7),    # one sequence cut into ranges of blocks (an item's blocks start past 0)
    ((2, 6, 1, 16), 4, None),   # a single position
    ((1, 16, 300, 16), 48, 32),  # a rank of 48 (rsmamba_base's is 12), many tiles and chunks
])
@pytest.mark.parametrize('backend', ['cpu_kernel', 'chunked'])
def test_scan_projects_a_low_rank_delta(shape, rank, chunk, backend):
    """delta_proj_weight: the C++ scan projects dt itself, tile by tile (forward and backward), the others get
    it projected first (by `selective_scan`); the values and every gradient, dt's and the weight's included,
    as the reference's on the einsum-projected delta."""
    x = with_low_rank_dt(make_inputs(*shape), rank)
    if backend == 'cpu_kernel':
        assert_matches_reference(x, selective_scan_cpu_kernel, reference_of_projected_delta, chunk_len=chunk)
    else:
        assert_matches_reference(x, selective_scan, reference_of_projected_delta, backend=backend)


def test_cpu_kernel_projected_delta_gradcheck_float64():
    """float64 gradcheck of the C++ scan projecting dt, z read and y written through token orders."""
    order = token_orders(5)
    s = with_low_rank_dt(make_inputs(6, 3, 5, 2, dtype=torch.float64), 2)
    s = {k: v.double().requires_grad_() for k, v in s.items()}
    s['z'] = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    names = list(s)
    assert torch.autograd.gradcheck(
        lambda *args: selective_scan(**dict(zip(names, args)), delta_softplus=True, backend='cpu_kernel',
                                     z_order=order, out_order=order), tuple(s.values()))


class _RecordScans(TorchDispatchMode):
    """The delta argument's shape and the projection weight of every C++ scan forward that runs."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.rsmamba.cpu_selective_scan_fwd.default:
            projection = args[13] if len(args) > 13 else (kwargs or {}).get('delta_proj')
            self.calls.append((tuple(args[1].shape), projection))
        return func(*args, **(kwargs or {}))


def test_model_hands_dt_proj_to_the_cpu_scan():
    """On CPU the mixer gives the C++ scan the low-rank dt and dt_proj's weight, so the full delta is never
    made; a model on another scan gets delta projected first and the same logits."""
    import timm
    from conftest import TINY
    model = timm.create_model('rsmamba_small', **TINY).eval()
    mixer = model.blocks[0].mixer
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), _RecordScans() as recorded:
        y = model(x)
    assert recorded.calls and all(shape[-1] == mixer.dt_rank and w is not None and w.shape == (
        mixer.intermediate_size, mixer.dt_rank) for shape, w in recorded.calls), recorded.calls
    for block in model.blocks:
        block.mixer.scan_backend = 'reference'
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_cpu_kernel_refuses_a_projection_of_the_wrong_shape():
    x = with_low_rank_dt(make_inputs(2, 6, 9, 4), 3)
    with pytest.raises(ValueError, match=r'low-rank dt \(L, batch, rank\)'):
        selective_scan(**dict(x, delta_proj_weight=torch.randn(6, 4)), delta_softplus=True, backend='cpu_kernel')
    with pytest.raises(ValueError, match=r'delta \(9, 2, 3\) does not match u'):
        selective_scan(**dict(x, delta_proj_weight=None), delta_softplus=True, backend='cpu_kernel')


@pytest.mark.parametrize('loss_on', ['output and last state', 'last state only', 'output only'])
def test_cpu_kernel_last_state_is_differentiable(loss_on):
    """A loss on the last state: its gradient enters the C++ backward as the carry into the last position. The
    backward gets no zeros for an output the loss does not use (autograd's materialised gradients are off), so
    each output alone must give the reference's gradients too."""
    x = make_inputs(2, 20, 37, 16)
    xs_ref = leaf_copies(x)
    xs_new = leaf_copies(x)
    weight = torch.randn(2, 20, 16)
    for xs, fn in ((xs_ref, selective_scan_reference), (xs_new, selective_scan_cpu_kernel)):
        y, h = fn(**xs, delta_softplus=True, return_last_state=True)
        loss = {'output and last state': y.sum() + (h * weight).sum(), 'last state only': (h * weight).sum(),
                'output only': (y * y).sum()}[loss_on]
        loss.backward()
    for name, t in xs_ref.items():
        if t is None:
            continue
        if t.grad is None:  # the last state does not depend on C, D or z
            assert loss_on == 'last state only' and name in ('C', 'D', 'z') and not xs_new[name].grad.any(), name
        else:
            assert ((xs_new[name].grad - t.grad).abs().max() / t.grad.abs().max()) < 1e-4, name


@pytest.mark.parametrize('backend', ['cpu_kernel', 'chunked'])
@pytest.mark.parametrize('loss_on', ['output and sum', 'sum only'])
def test_scan_returns_its_output_summed_over_positions(backend, loss_on):
    """return_out_sum: (out, last state, sum), the sum and every gradient through it as torch's sum of the
    reference's out. The C++ scan sums out as it writes it (here back in token order through out_order, which
    leaves the sums as they are), and adds the sum's gradient to dout's at every position; with a loss on the
    sum only, it gets no dout at all."""
    order = token_orders(37)
    x = make_inputs(6, 20, 37, 16)  # 3 token orders of 2 sequences
    xs_ref = leaf_copies(x)
    xs_new = leaf_copies(x)
    y_ref = selective_scan_reference(**xs_ref, delta_softplus=True)
    y, last, total = selective_scan(**xs_new, delta_softplus=True, return_last_state=True, backend=backend,
                                    out_order=order, return_out_sum=True)
    assert total.shape == (6, 20) and last.shape == (6, 20, 16)
    torch.testing.assert_close(total, y_ref.sum(-1), rtol=1e-5, atol=1e-4)
    w_out, w_sum = torch.randn(6, 20, 37), torch.randn(6, 20)
    loss_ref = (y_ref.sum(-1) * w_sum).sum()
    loss_new = (total * w_sum).sum()
    if loss_on == 'output and sum':  # out is back in token order: the reference's, put back by assignment
        loss_ref = loss_ref + (put_back_in_token_order(y_ref, order) * w_out).sum()
        loss_new = loss_new + (y * w_out).sum()
    loss_ref.backward()
    loss_new.backward()
    assert_grads_close(xs_ref, xs_new)


def test_cpu_kernel_out_sum_gradcheck_float64():
    """float64 gradcheck of the C++ scan's sums of out (z read and out written through token orders)."""
    order = token_orders(5)
    s = make_inputs(6, 3, 5, 2, dtype=torch.float64)
    s = {k: v.requires_grad_() for k, v in s.items()}
    s['z'] = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    names = list(s)
    assert torch.autograd.gradcheck(
        lambda *args: selective_scan(**dict(zip(names, args)), delta_softplus=True, backend='cpu_kernel',
                                     z_order=order, out_order=order, return_out_sum=True), tuple(s.values()))


def test_cpu_kernel_gradients_repeat_bit_for_bit():
    """The parameter gradients sum over work items that threads take in any order: the sums must not depend on
    it (exact resume compares weights bit for bit)."""
    x = {k: (v.requires_grad_() if v is not None else None) for k, v in make_inputs(4, 40, 50, 16).items()}
    xc, w, b = torch.randn(4, 40, 70, requires_grad=True), torch.randn(40, 4, requires_grad=True), torch.randn(40)
    weight = torch.randn(4, 40, 50)
    runs = []
    for _ in range(6):
        y = selective_scan_cpu_kernel(**x, delta_softplus=True)
        params = [x['A'], x['D'], x['delta_bias'], x['B']]
        conv = causal_conv1d_cpu_kernel(xc, w, b.requires_grad_(), 'silu')
        runs.append(torch.autograd.grad((y * weight).sum() + conv.square().sum(), params + [w, b]))
    for run in runs[1:]:
        assert all(torch.equal(g, g0) for g, g0 in zip(run, runs[0]))


def test_cpu_kernel_conv_gradcheck_float64():
    """float64 gradcheck through the C++ conv's own float64 build."""
    x = torch.randn(2, 20, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    for activation in (None, 'silu'):
        assert torch.autograd.gradcheck(lambda *a: causal_conv1d_cpu_kernel(*a, activation), (x, w, b))
    assert cpu_kernel_module.CPU_KERNELS.library is not None, cpu_kernel_module.CPU_KERNELS.error


def test_cpu_kernel_inlined_math_over_extreme_inputs():
    """The kernel's own exp, log1p and sigmoid at the ends of their ranges: softplus from -60 to 60 (and none),
    decays that underflow to 0, z that saturates the gate, positive A (growing states); and a NaN in delta or z
    propagates."""
    x = make_inputs(2, 16, 24, 16)
    x['delta'] = torch.linspace(-60, 60, x['delta'].numel()).reshape(x['delta'].shape)
    x['z'] = torch.linspace(-150, 150, x['z'].numel()).reshape(x['z'].shape)
    x['A'][:, :4] *= 40  # delta A far below the smallest normal exponent
    no_softplus = dict(x, delta=x['delta'].sigmoid() * 3, delta_bias=None, delta_softplus=False)
    grow = dict(make_inputs(2, 16, 12, 16), delta_softplus=True)
    grow['A'] = grow['A'].abs() * 0.2  # exp(delta A) > 1: the overflow-guarded path; states reach 1e8
    for kw in (dict(x, delta_softplus=True), no_softplus, grow):
        ours, ref = selective_scan_cpu_kernel(**kw), selective_scan_reference(**kw)
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-6
    x['delta'][0, 3, 5] = float('nan')
    y = selective_scan_cpu_kernel(**x, delta_softplus=True)
    assert y[0, 3, 5:].isnan().all() and not y[0, 3, :5].isnan().any() and not y[1].isnan().any()
    x['delta'][0, 3, 5], x['z'][1, 2, 7] = 0.0, float('nan')  # a NaN gate: only its own output
    y = selective_scan_cpu_kernel(**x, delta_softplus=True)
    assert y[1, 2, 7].isnan() and y.isnan().sum() == 1


def _fresh_kernels(monkeypatch):
    """A not-yet-loaded CPU_KERNELS in place of the shared one, for tests that break its build."""
    kernels = cpu_kernel_module._CpuKernels()
    for module in (cpu_kernel_module, scan_module, conv_module):
        monkeypatch.setattr(module, 'CPU_KERNELS', kernels)
    return kernels


def test_cpu_kernel_build_failure_falls_back_to_compiled(monkeypatch):
    kernels = _fresh_kernels(monkeypatch)
    monkeypatch.setattr(cpu_kernel_module, '_SOURCE', cpu_kernel_module._SOURCE.with_name('missing.cpp'))
    x = make_inputs(1, 4, 10, 4)
    with pytest.warns(UserWarning, match=r"building the C\+\+ CPU kernels \(missing.cpp\) failed.*torch.compile'd"):
        y = selective_scan_cpu_kernel(**x, delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_reference(**x, delta_softplus=True), rtol=1e-5, atol=1e-5)
    assert kernels.error and kernels.library is None  # it does not try again
    order, x = token_orders(10), make_inputs(3, 4, 10, 4)  # the fallback puts the paths back in token order too
    torch.testing.assert_close(selective_scan_cpu_kernel(**x, delta_softplus=True, out_order=order),
                               put_back_in_token_order(selective_scan_reference(**x, delta_softplus=True), order),
                               rtol=1e-5, atol=1e-5)
    _, total = selective_scan_cpu_kernel(**x, delta_softplus=True, out_order=order, return_out_sum=True)
    torch.testing.assert_close(total, selective_scan_reference(**x, delta_softplus=True).sum(-1), rtol=1e-5, atol=1e-4)
    xc, w = torch.randn(2, 6, 9), torch.randn(6, 4)
    torch.testing.assert_close(causal_conv1d_cpu_kernel(xc, w, None, 'silu'),
                               causal_conv1d_reference(xc, w, None, 'silu'))


def test_cpu_kernel_refuses_other_devices():
    x = {k: (v.to('meta') if v is not None else None) for k, v in make_inputs(1, 2, 4, 4).items()}
    with pytest.raises(RuntimeError, match="'cpu_kernel' runs on CPU tensors only, got meta"):
        selective_scan(**x, backend='cpu_kernel')


def test_compiled_runs_chunked_for_states_it_does_not_unroll(monkeypatch):
    """States beyond MAX_COMPILED_STATE never reach the compiler (it would unroll them all)."""
    kernels = _broken_compiler(monkeypatch, scan_module, '_CHUNK_KERNELS')
    x = make_inputs(1, 3, 12, scan_module.MAX_COMPILED_STATE + 1)
    assert_matches_reference(x, selective_scan_compiled, min_compile_elements=0)
    assert kernels.usable  # no compile was attempted


def test_softplus_matches_float64_over_the_whole_range():
    """The exp/log softplus of the fast kernels against torch's softplus in float64: within a few ulps."""
    x = torch.cat([torch.linspace(-100, 100, 400_001), torch.randn(100_000) * 4])
    exact = F.softplus(x.double())
    fast = scan_module._softplus(x).double()
    keep = exact > 1e-30  # below that fp32 underflows, in torch's softplus too
    assert ((fast - exact).abs() / exact)[keep].max() < 1e-6


def _broken_compiler(monkeypatch, module, attr):
    """Replace a module's CompiledKernels by one whose compiled functions fail as a missing compiler would."""
    def broken(*args, **kwargs):
        raise RuntimeError('no C++ compiler')
    working = getattr(module, attr)
    kernels = CompiledKernels(working.owner, working.options, **working.eager)
    kernels._compiled = {name: broken for name in kernels.eager}
    monkeypatch.setattr(module, attr, kernels)
    return kernels


def test_scan_compile_failure_falls_back_to_eager(monkeypatch):
    kernels = _broken_compiler(monkeypatch, scan_module, '_CHUNK_KERNELS')
    x = make_inputs(1, 4, 10, 4)
    with pytest.warns(UserWarning, match=r"scan backend 'compiled': torch.compile failed.*no C\+\+ compiler"):
        y = selective_scan_compiled(**x, delta_softplus=True, min_compile_elements=0)
    torch.testing.assert_close(y, selective_scan_reference(**x, delta_softplus=True), rtol=1e-5, atol=1e-5)
    assert not kernels.usable  # it does not try again: later calls run the eager chunked scan
    assert_matches_reference(x, selective_scan_compiled, min_compile_elements=0)


def test_conv_compile_failure_falls_back_to_eager(monkeypatch):
    kernels = _broken_compiler(monkeypatch, conv_module, '_CONV_KERNELS')
    monkeypatch.setattr(conv_module, 'MIN_COMPILE_ELEMENTS', 0)
    x, w, b = torch.randn(2, 6, 9, requires_grad=True), torch.randn(6, 4), torch.randn(6)
    with pytest.warns(UserWarning, match=r"conv backend 'torch': torch.compile failed.*no C\+\+ compiler"):
        out = causal_conv1d_torch(x, w, b, 'silu')
    out.sum().backward()
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, b, 'silu'))
    assert not kernels.usable


def leaf_copies(x):
    """Inputs as fresh leaves that collect their own gradients (None stays None)."""
    return {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}


def assert_grads_close(xs_ref, xs_new):
    """Every given input's gradient within 1e-4 of the reference's, relative to the latter's largest."""
    for name, t in xs_ref.items():
        if t is not None:
            scale = t.grad.abs().max().clamp_min(1e-6)
            assert ((xs_new[name].grad - t.grad).abs().max() / scale) < 1e-4, name


def assert_matches_reference(x, scan_fn, reference=selective_scan_reference, **kwargs):
    """Values within 1e-5 and gradients of every input within 1e-4 (relative to the largest) of the reference."""
    xs_ref = leaf_copies(x)
    xs_new = leaf_copies(x)
    y_ref = reference(**xs_ref, delta_softplus=True)
    y_new = scan_fn(**xs_new, delta_softplus=True, **kwargs)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(y_ref)
    (y_ref * weight).sum().backward()
    (y_new * weight).sum().backward()
    assert_grads_close(xs_ref, xs_new)


@pytest.mark.parametrize('budget_chunks', [1, 3])
def test_chunked_backward_in_groups_of_chunks(monkeypatch, budget_chunks):
    """Backward re-computes states a group of chunks at a time: carries must cross group boundaries."""
    b, d, L, n, chunk = 2, 3, 29, 4, 4  # 8 chunks: groups of 1, and of 3 with a short last group
    monkeypatch.setattr(scan_module, 'PARALLEL_STATE_BUDGET', budget_chunks * chunk * b * d * n)
    assert_matches_reference(make_inputs(b, d, L, n), selective_scan_chunked, chunk_len=chunk)


@pytest.mark.parametrize('L,chunk', [(23, None), (24, 6), (23, 5)])
def test_chunked_last_state_matches_reference(L, chunk):
    """Last state after position L-1, whether or not the last chunk is padded."""
    x = make_inputs(2, 4, L, 8)
    _, h_ref = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    _, h_new = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk_len=chunk)
    torch.testing.assert_close(h_new, h_ref, rtol=1e-5, atol=1e-5)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_chunked_is_vectorised_not_a_loop_over_positions():
    """Ops dispatched per scan (forward + backward) grow like sqrt(length), not like the length."""
    counts = []
    for L in (64, 1024):
        x = {k: (v.requires_grad_() if v is not None else None) for k, v in make_inputs(1, 2, L, 4).items()}
        with _CountOps() as ops:
            selective_scan_chunked(**x, delta_softplus=True).sum().backward()
        counts.append(ops.count)
    assert counts[1] < 5 * counts[0], counts  # 16x the positions; a per-position loop would be ~16x the ops


@pytest.mark.parametrize('scan_fn', [selective_scan_chunked, selective_scan_cpu_kernel])
def test_gradcheck_float64(scan_fn):
    """float64 gradcheck; for cpu_kernel through the C++ kernels' float64 build of the same loops."""
    x = make_inputs(1, 2, 6, 3, dtype=torch.float64)
    names = [k for k, v in x.items() if v is not None]

    def fn(*tensors):
        return scan_fn(**dict(zip(names, tensors)), delta_softplus=True, chunk_len=4)
    assert torch.autograd.gradcheck(fn, tuple(x[k].requires_grad_() for k in names))


def test_chunked_accepts_time_major_views():
    """The mixer passes permuted views of (L, B, C) tensors; results must not depend on strides."""
    x = make_inputs(2, 4, 11, 8)
    views = {k: (v.permute(2, 0, 1).contiguous().permute(1, 2, 0) if v is not None and v.dim() == 3 else v)
             for k, v in x.items()}
    torch.testing.assert_close(
        selective_scan_chunked(**views, delta_softplus=True), selective_scan_reference(**x, delta_softplus=True),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', ['chunked', 'cpu_kernel'])
def test_bf16_autocast_on_cpu_accumulates_in_fp32(backend):
    x = make_inputs(2, 8, 64, 16)
    y32 = selective_scan_chunked(**x, delta_softplus=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y16 = selective_scan(**{k: (v.bfloat16() if v is not None else None) for k, v in x.items()},
                             delta_softplus=True, backend=backend)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    # inputs rounded to bf16 only: an fp32 recurrence keeps the error at bf16 input precision
    assert (y16.float() - y32).abs().max() / y32.abs().max() < 0.05


@pytest.mark.parametrize('L', [1, 3, 16])
def test_causal_conv_matches_reference(L):
    x = torch.randn(2, 6, L)
    w, b = torch.randn(6, 4), torch.randn(6)
    torch.testing.assert_close(causal_conv1d_torch(x, w, b, 'silu'), causal_conv1d_reference(x, w, b, 'silu'))
    x_tm = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out = causal_conv1d(x_tm, w, b, 'silu', backend='torch')
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, b, 'silu'))
    # first output only sees the first input: causality by hand
    torch.testing.assert_close(out[:, :, 0], F.silu(w[:, 3] * x[:, :, 0] + b), rtol=1e-5, atol=1e-6)


def test_backend_switch_env_and_errors(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_scan_backend(None, torch.device('cpu')) == 'cpu_kernel'
    assert resolve_scan_backend(None, torch.device('meta')) == 'chunked'  # devices without inductor support
    monkeypatch.setattr(triton_support, 'cuda_probe_error', lambda: None)
    assert resolve_scan_backend(None, torch.device('cuda')) == 'triton'  # CUDA: the Triton kernels first
    monkeypatch.setattr(triton_support, 'cuda_probe_error', lambda: 'Triton left out of this test')
    monkeypatch.setattr(triton_support, '_warned', {'Triton left out of this test'})
    monkeypatch.setattr(scan_module, 'mamba_ssm_fn', lambda: None)
    assert resolve_scan_backend(None, torch.device('cuda')) == 'compiled'  # CUDA without Triton nor the extra
    monkeypatch.setattr(scan_module, 'mamba_ssm_fn', lambda: object())
    assert resolve_scan_backend(None, torch.device('cuda')) == 'mamba_ssm'
    assert resolve_scan_backend('reference') == 'reference'
    monkeypatch.setenv(BACKEND_ENV_VAR, 'reference')
    assert resolve_scan_backend(None) == 'reference'
    assert resolve_scan_backend('chunked') == 'chunked'  # explicit argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV_VAR, 'warp-drive')
    with pytest.raises(ValueError, match="unknown selective-scan backend 'warp-drive'.*RSMAMBA_SCAN_BACKEND"):
        resolve_scan_backend(None)
    with pytest.raises(ValueError, match='unknown causal-conv1d backend'):
        resolve_conv_backend('nope')
    monkeypatch.delenv('RSMAMBA_CONV_BACKEND', raising=False)
    assert resolve_conv_backend(None, torch.device('cpu')) == 'cpu_kernel'
    assert resolve_conv_backend(None, torch.device('meta')) == 'torch'


def test_env_var_reaches_the_computation(monkeypatch):
    """The reference backend is selected through the environment: its result is the reference's, bit for bit."""
    x = make_inputs(1, 4, 10, 4)
    monkeypatch.setenv(BACKEND_ENV_VAR, 'reference')
    assert torch.equal(selective_scan(**x, delta_softplus=True), selective_scan_reference(**x, delta_softplus=True))


def test_mamba_ssm_backend_refuses_cpu_tensors():
    x = make_inputs(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match='mamba_ssm'):
        selective_scan(**x, backend='mamba_ssm')


@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('L', [1, 2, 9])
def test_causal_conv_gradients_match_reference(activation, L):
    x = torch.randn(2, 6, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_torch(*a, activation), (x, w, b))
    out = causal_conv1d_torch(x, w, b, activation)
    ref = causal_conv1d_reference(x, w, b, activation)
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    grads_ref = torch.autograd.grad(ref.sum(), (x, w, b))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr)


@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('L,dim', [(1, 6), (2, 20), (37, 20), (300, 40)])
def test_cpu_kernel_causal_conv_matches_reference(activation, L, dim):
    """The C++ conv forward and backward on time-major views (a full and a partial vector block; fewer positions
    than taps)."""
    x = torch.randn(L, 3, 2 * dim)[:, :, :dim].permute(1, 2, 0).requires_grad_()  # the mixer's strides
    w, b = torch.randn(dim, 4, requires_grad=True), torch.randn(dim, requires_grad=True)
    out = causal_conv1d(x, w, b, activation, backend='cpu_kernel')
    ref = causal_conv1d_reference(x, w, b, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert cpu_kernel_module.CPU_KERNELS.library is not None, cpu_kernel_module.CPU_KERNELS.error
    weight = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad((out * weight).sum(), (x, w, b)),
                        torch.autograd.grad((ref * weight).sum(), (x, w, b))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_cpu_kernel_conv_refuses_other_devices_and_runs_other_dtypes_in_torch():
    with pytest.raises(RuntimeError, match="conv backend 'cpu_kernel' runs on CPU tensors only, got meta"):
        causal_conv1d(torch.randn(1, 2, 5, device='meta'), torch.randn(2, 4, device='meta'), backend='cpu_kernel')
    x, w = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(3, 4)  # mixed dtypes: not for the C++ conv
    torch.testing.assert_close(causal_conv1d(x, w, None, 'silu', backend='cpu_kernel'),
                               causal_conv1d_reference(x, w.double(), None, 'silu'))
    w9 = torch.randn(3, 9)  # more taps than the C++ backward keeps registers for
    torch.testing.assert_close(causal_conv1d(x.float(), w9, None, 'silu', backend='cpu_kernel'),
                               causal_conv1d_reference(x.float(), w9, None, 'silu'))


@pytest.mark.parametrize('activation', [None, 'silu'])
def test_compiled_causal_conv_matches_reference(monkeypatch, activation):
    """The torch.compile'd conv kernels (forced at this size) on time-major views: values and gradients."""
    monkeypatch.setattr(conv_module, 'MIN_COMPILE_ELEMENTS', 0)
    x = torch.randn(11, 3, 6).permute(1, 2, 0).requires_grad_()
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    out = causal_conv1d_torch(x, w, b, activation)
    ref = causal_conv1d_reference(x, w, b, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert conv_module._CONV_KERNELS.usable  # it really ran compiled
    weight = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad((out * weight).sum(), (x, w, b)),
                        torch.autograd.grad((ref * weight).sum(), (x, w, b))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# ---- token orders: the C++ conv and scan read x and z through the multi-path block's order index -------------


def token_orders(length: int) -> torch.Tensor:
    """(L, 3): forward, reversed and a fixed shuffle, as the multi-path block builds them."""
    shuffle = torch.randperm(length, generator=torch.Generator().manual_seed(length))
    return torch.stack([torch.arange(length), torch.arange(length).flip(0), shuffle], dim=1)


def read_in_orders(source: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, C, L) -> (paths * B, C, L) by plain indexing: sequence p * B + b is source[b] in the order order[:, p]."""
    return torch.cat([source[:, :, order[:, p]] for p in range(order.shape[1])])


@pytest.mark.parametrize('backend', ['cpu_kernel', 'torch'])
@pytest.mark.parametrize('L,dim', [(1, 6), (37, 20)])
def test_conv_reads_token_orders(backend, L, dim):
    """x read through an (L, paths) order index (natively by the C++ conv, through a gathered copy by the others):
    values and gradients, summed back over the orders, as the reference conv of the indexed copy."""
    order = token_orders(L)
    x = torch.randn(L, 3, 2 * dim)[:, :, :dim].permute(1, 2, 0).requires_grad_()  # the mixer's strides
    w, b = torch.randn(dim, 4, requires_grad=True), torch.randn(dim, requires_grad=True)
    out = causal_conv1d(x, w, b, 'silu', backend=backend, order=order)
    ref = causal_conv1d_reference(read_in_orders(x, order), w, b, 'silu')
    assert out.shape == (3 * 3, dim, L)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad((out * weight).sum(), (x, w, b)),
                        torch.autograd.grad((ref * weight).sum(), (x, w, b))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('backend', ['cpu_kernel', 'chunked'])
def test_scan_reads_z_in_token_orders(backend):
    """z read through the order index (natively by the C++ scan, from a gathered copy by the others) against the
    reference scan of the indexed copy: values and the gradients of every input, z's summed over the orders."""
    batch, d, L, n = 2, 20, 37, 16
    order = token_orders(L)
    x = make_inputs(3 * batch, d, L, n)
    z_source = torch.randn(batch, d, L)
    ref_inputs = leaf_copies(x)
    new_inputs = leaf_copies(x)
    z_ref, z_new = z_source.clone().requires_grad_(), z_source.clone().requires_grad_()
    ref_inputs['z'], new_inputs['z'] = read_in_orders(z_ref, order), z_new
    y_ref = selective_scan_reference(**ref_inputs, delta_softplus=True)
    y_new = selective_scan(**new_inputs, delta_softplus=True, backend=backend, z_order=order)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(y_ref)
    (y_ref * weight).sum().backward()
    (y_new * weight).sum().backward()
    ref_inputs['z'], new_inputs['z'] = z_ref, z_new
    assert_grads_close(ref_inputs, new_inputs)


def put_back_in_token_order(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(paths * B, C, L) -> the same by indexed assignment: position l of sequence p * B + b goes to order[l, p]."""
    out = torch.zeros_like(y)
    batch = y.shape[0] // order.shape[1]
    for p in range(order.shape[1]):
        out[p * batch:(p + 1) * batch, :, order[:, p]] = y[p * batch:(p + 1) * batch]
    return out


@pytest.mark.parametrize('backend', ['cpu_kernel', 'chunked'])
def test_scan_writes_outputs_in_token_order(backend):
    """out_order (written through natively by the C++ scan, restored after by the others): values, the last
    state and every input's gradient as the reference scan's output put back by indexed assignment."""
    batch, d, L, n = 2, 20, 37, 16
    order = token_orders(L)
    x = make_inputs(3 * batch, d, L, n)
    ref_inputs = leaf_copies(x)
    new_inputs = leaf_copies(x)
    y_ref, last_ref = selective_scan_reference(**ref_inputs, delta_softplus=True, return_last_state=True)
    y_ref = put_back_in_token_order(y_ref, order)
    y_new, last_new = selective_scan(**new_inputs, delta_softplus=True, return_last_state=True, backend=backend,
                                     out_order=order)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_new, last_ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(y_ref)
    (y_ref * weight).sum().backward()
    (y_new * weight).sum().backward()
    assert_grads_close(ref_inputs, new_inputs)


def test_cpu_kernel_token_orders_gradcheck_float64():
    """float64 gradcheck of the C++ conv and scan reading through an order index (small shapes)."""
    order = token_orders(5)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda x, w, b: causal_conv1d(x, w, b, 'silu', backend='cpu_kernel', order=order), (x, w, b))
    s = make_inputs(6, 3, 5, 2, dtype=torch.float64)
    s = {k: v.requires_grad_() for k, v in s.items()}
    s['z'] = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    names = list(s)
    for out_order in (None, order):
        assert torch.autograd.gradcheck(
            lambda *args: selective_scan(**dict(zip(names, args)), delta_softplus=True, backend='cpu_kernel',
                                         z_order=order, out_order=out_order), tuple(s.values()))


def test_cpu_kernel_refuses_bad_token_orders():
    """The kernels read through the index unchecked, so the op checks it first and says what is wrong."""
    x = torch.randn(2, 3, 5)
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r'out of range \[0, 5\)'):
        causal_conv1d(x, w, None, 'silu', backend='cpu_kernel', order=token_orders(5) + 1)
    with pytest.raises(ValueError, match=r'out of range \[0, 5\)'):
        causal_conv1d(x, w, None, 'silu', backend='cpu_kernel', order=token_orders(5) - 1)
    with pytest.raises(ValueError, match='int64 token-order index'):
        causal_conv1d(x, w, None, 'silu', backend='cpu_kernel', order=token_orders(5).float())
    with pytest.raises(ValueError, match='with L = 5'):
        causal_conv1d(x, w, None, 'silu', backend='cpu_kernel', order=token_orders(4))
    s = make_inputs(6, 3, 5, 2)
    with pytest.raises(ValueError, match='read in 3 token orders'):
        selective_scan(**dict(s, z=torch.randn(3, 3, 5)), delta_softplus=True, backend='cpu_kernel',
                       z_order=token_orders(5))
    repeated = token_orders(5)
    repeated[1, 2] = repeated[0, 2]  # out's rows are written through it: none may be left unwritten
    with pytest.raises(ValueError, match='must be a permutation'):
        selective_scan(**s, delta_softplus=True, backend='cpu_kernel', out_order=repeated)
    with pytest.raises(ValueError, match='do not split into the 4 paths'):
        selective_scan(**s, delta_softplus=True, backend='cpu_kernel', out_order=token_orders(5).repeat(1, 2)[:, :4])
