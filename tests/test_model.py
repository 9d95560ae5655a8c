"""The RSMamba model against the spec: counts, semantics restated by hand, timm surface, checkpoints."""

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_rsmamba  # noqa: F401  (registers the models)
from timm_rsmamba.models.rsmamba import CLS_TOKEN_POSITIONS, PATH_TYPES, POS_EMBED_TYPES

from conftest import TINY


def tiny(**kw):
    return timm.create_model('rsmamba_small', num_classes=kw.pop('num_classes', 5), **dict(TINY, **kw))


# ---- independent restatement of the spec ------------------------------------------------------
def spec_mixer(m, u):
    """The spec's mixer pseudo-code with a sequential scan, reading the module's parameters."""
    E, S, R = m.intermediate_size, m.state_size, m.dt_rank
    x, z = (u @ m.in_proj.weight.T).split(E, dim=-1)                       # (B, L, E)
    L = u.shape[1]
    xp = F.pad(x.transpose(1, 2), (3, 0))
    x = sum(m.conv1d.weight[:, 0, k, None] * xp[:, :, k:k + L] for k in range(4)) + m.conv1d.bias[:, None]
    x = F.silu(x).transpose(1, 2)                                           # (B, L, E)
    dt_low, Bm, Cm = (x @ m.x_proj.weight.T).split([R, S, S], dim=-1)
    dt = F.softplus(dt_low @ m.dt_proj.weight.T + m.dt_proj.bias)
    A = -torch.exp(m.A_log)
    h = torch.zeros(u.shape[0], E, S)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ m.out_proj.weight.T


def test_mixer_matches_spec_pseudocode():
    m = tiny().blocks[0].mixer
    u = torch.randn(2, 9, 32)
    torch.testing.assert_close(m(u), spec_mixer(m, u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,expected', [
    ('rsmamba_small', 4_355_157), ('rsmamba_base', 6_381_141),
    ('rsmamba_large', 16_246_549), ('rsmamba_huge', 33_053_141)])
def test_parameter_counts_match_spec(name, expected):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=21)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.pos_embed.shape[1] == 784  # 28 x 28 tokens at 224 px


def test_corner_padding_grid_by_hand():
    model = tiny(img_size=224, depth=1)
    assert model.patch_embed.grid_size == (28, 28)
    # pad = (28-1)*8 + 16 - 224 = 8 px on bottom/right only: the top-left patch sees the raw image
    x = torch.randn(1, 3, 224, 224)
    tokens = model.patch_embed(x)
    w = model.patch_embed.proj.weight
    torch.testing.assert_close(tokens[0, 0, 0], (x[0, :, :16, :16, None] * w.permute(1, 2, 3, 0)).sum((0, 1, 2)),
                               rtol=1e-4, atol=1e-4)
    # last patch covers rows/cols 216..231, half of it padding
    last = (F.pad(x, (0, 8, 0, 8))[0, :, 216:, 216:, None] * w.permute(1, 2, 3, 0)).sum((0, 1, 2))
    torch.testing.assert_close(tokens[0, -1, -1], last, rtol=1e-4, atol=1e-4)


def test_block_reverse_and_gate_by_hand():
    model = tiny(path_type='forward_reverse_gate').eval()
    blk, norm = model.blocks[0], model.pre_norm
    x = torch.randn(2, 16, 32)
    y_f = blk.mixer(norm(x))
    y_r = blk.mixer(norm(x.flip(1))).flip(1)  # run on the flipped sequence, flip back
    g = torch.softmax(torch.cat([y_f.mean(1), y_r.mean(1)], -1) @ blk.gate.weight.T, -1)
    assert torch.allclose(g.sum(-1), torch.ones(2))
    expected = x + g[:, :1, None] * y_f + g[:, 1:, None] * y_r
    torch.testing.assert_close(blk(x, norm), expected, rtol=1e-4, atol=1e-5)


def test_block_mean_paths_by_hand():
    model = tiny(path_type='forward_reverse_shuffle_mean').eval()
    blk, norm = model.blocks[0], model.pre_norm
    x = torch.randn(2, 16, 32)
    perm = torch.randperm(16)
    y_s = torch.empty_like(x)
    y_s[:, perm] = blk.mixer(norm(x[:, perm]))  # un-shuffle by scattering back
    expected = x + (blk.mixer(norm(x)) + blk.mixer(norm(x.flip(1))).flip(1) + y_s) / 3
    torch.testing.assert_close(blk(x, norm, perm), expected, rtol=1e-4, atol=1e-5)


def original_block(blk, norm, x, perm):
    """The published block: pre-norm and the whole mixer (projections included) on every token order."""
    y_f = blk.mixer(norm(x))
    y_r = blk.mixer(norm(x.flip(1))).flip(1)
    y_s = torch.empty_like(x)
    y_s[:, perm] = blk.mixer(norm(x[:, perm]))
    outs = [y_f, y_r, y_s]
    g = torch.softmax(torch.cat([o.mean(1) for o in outs], -1) @ blk.gate.weight.T, -1)
    return x + sum(g[:, i, None, None] * o for i, o in enumerate(outs))


def test_block_projects_once_yet_computes_the_original_values_and_grads():
    """Default three gated orders, random shuffle: values and every parameter's gradient as the original."""
    model = tiny().train()
    blk, norm = model.blocks[0], model.pre_norm
    x = torch.randn(2, 16, 32, requires_grad=True)
    perm = torch.randperm(16)
    weight = torch.randn(2, 16, 32)
    params = [x] + list(blk.parameters()) + list(norm.parameters())
    expected = original_block(blk, norm, x, perm)
    grads_expected = torch.autograd.grad((expected * weight).sum(), params)
    got = blk(x, norm, perm)
    grads = torch.autograd.grad((got * weight).sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_identity_shuffle_equals_forward_path():
    model = tiny().eval()
    blk, norm = model.blocks[0], model.pre_norm
    x = torch.randn(2, 16, 32)
    paths = torch.cat([x, x.flip(1), x], 0)
    y = blk.mixer(norm(paths)).chunk(3)
    torch.testing.assert_close(y[2], y[0])
    y_f, y_r = y[0], y[1].flip(1)
    g = torch.softmax(torch.cat([y_f.mean(1), y_r.mean(1), y_f.mean(1)], -1) @ blk.gate.weight.T, -1)
    expected = x + g[:, :1, None] * y_f + g[:, 1:2, None] * y_r + g[:, 2:, None] * y_f
    torch.testing.assert_close(blk(x, norm, torch.arange(16)), expected, rtol=1e-4, atol=1e-5)


def test_shared_pre_norm_is_one_module():
    model = tiny(depth=3)
    names = [n for n, _ in model.named_parameters() if 'norm' in n]
    assert names == ['pre_norm.weight', 'pre_norm.bias', 'norm.weight', 'norm.bias', 'fc_norm.weight', 'fc_norm.bias']


@pytest.mark.parametrize('path_type', PATH_TYPES)
@pytest.mark.parametrize('cls_pos', CLS_TOKEN_POSITIONS)
def test_all_path_types_and_token_positions_train(path_type, cls_pos):
    model = tiny(path_type=path_type, cls_token_position=cls_pos)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().mean().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('pe', POS_EMBED_TYPES)
def test_pos_embed_types(pe):
    model = tiny(pos_embed_type=pe, cls_token_position='head')
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (model.pos_embed is not None) == (pe == 'learnable')


def test_sine_table_by_hand():
    model = tiny(pos_embed_type='sine')
    table = model.sine_pos_embed[0]  # (16, 32) for a 4x4 grid, 8 frequencies per quarter
    omega = 1 / 10000 ** (torch.arange(8) / 8)
    # token 5 = (i=1, j=1) in mmpretrain's meshgrid order: first half encodes i, second half j
    i, j = divmod(6, 4)
    expected = torch.cat([torch.sin(i * omega), torch.cos(i * omega), torch.sin(j * omega), torch.cos(j * omega)])
    torch.testing.assert_close(table[6], expected)


def test_class_token_positions_in_sequence():
    from timm_rsmamba.models.rsmamba import insert_extra_tokens, split_extra_tokens
    patches = torch.arange(6.).view(1, 6, 1)
    extra = torch.tensor([[[100.], [200.]]])
    assert insert_extra_tokens(patches, extra[:, :1], 'head').flatten().tolist() == [100, 0, 1, 2, 3, 4, 5]
    assert insert_extra_tokens(patches, extra[:, :1], 'tail').flatten().tolist() == [0, 1, 2, 3, 4, 5, 100]
    assert insert_extra_tokens(patches, extra[:, :1], 'middle').flatten().tolist() == [0, 1, 2, 100, 3, 4, 5]
    assert insert_extra_tokens(patches, extra, 'head_tail').flatten().tolist() == [100, 0, 1, 2, 3, 4, 5, 200]
    for pos, n in [('head', 1), ('tail', 1), ('middle', 1), ('head_tail', 2)]:
        e, p = split_extra_tokens(insert_extra_tokens(patches, extra[:, :n], pos), pos, n)
        assert torch.equal(p, patches) and torch.equal(e, extra[:, :n])


def test_eval_is_deterministic_train_is_not():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        a, b = model(x), model(x)
    assert not torch.equal(a, b)


def test_eval_shuffle_random_restores_original_behaviour():
    model = tiny(eval_shuffle='random').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_fixed_permutations_depend_on_seed_and_block():
    a, b = tiny(shuffle_seed=0), tiny(shuffle_seed=1)
    pa, pb = a.shuffle_permutations(16), b.shuffle_permutations(16)
    assert not torch.equal(pa[0], pa[1]) and not torch.equal(pa[0], pb[0])
    assert all(sorted(p.tolist()) == list(range(16)) for p in pa)
    assert torch.equal(pa[0], tiny(shuffle_seed=0).shuffle_permutations(16)[0])


@pytest.mark.parametrize('backend', ['chunked', 'compiled', 'cpu_kernel'])
def test_fast_backend_matches_reference_on_whole_model(backend, monkeypatch):
    monkeypatch.setattr('timm_rsmamba.ops.scan.MIN_COMPILE_ELEMENTS', 0)  # compile even this small model
    model = timm.create_model('rsmamba_small', num_classes=7, img_size=48, depth=3, scan_backend=backend).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        fast = model(x)
        for blk in model.blocks:
            blk.mixer.scan_backend = 'reference'
            blk.mixer.conv_backend = 'reference'
        ref = model(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_scan_backend_kwarg_and_repr():
    model = tiny(scan_backend='reference')
    assert 'scan_backend=reference' in repr(model)
    with pytest.raises(ValueError, match="unknown selective-scan backend 'bogus'"):
        tiny(scan_backend='bogus')


def test_features_intermediates_and_pre_logits():
    model = tiny(depth=4, cls_token_position='head').eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    final, nlc = model.forward_intermediates(x, indices=2, output_fmt='NLC')
    assert final.shape == (2, 17, 32) and [f.shape for f in nlc] == [(2, 16, 32)] * 2
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    fnet = timm.create_model('rsmamba_small', features_only=True, out_indices=(0, 1), **dict(TINY))
    outs = fnet(x)
    assert [o.shape for o in outs] == [(2, 32, 4, 4)] * 2
    assert fnet.feature_info.channels() == [32, 32] and fnet.feature_info.reduction() == [8, 8]
    kept = model.prune_intermediate_layers(indices=[1])
    assert len(model.blocks) == 2 and kept == [1]


def test_grad_checkpointing_same_gradients():
    model = tiny(depth=3, drop_path_rate=0.).eval()  # eval: fixed permutations, still differentiable
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_in_train_mode_reuses_the_drawn_permutation():
    """Recomputation must see the permutation drawn in the forward, not a fresh one."""
    model = tiny(depth=2, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_timm_surface_roundtrip(tmp_path):
    model = tiny()
    assert model.pretrained_cfg['interpolation'] == 'bicubic'
    assert model.pretrained_cfg['first_conv'] == 'patch_embed.proj'
    assert model.pretrained_cfg['label_names'][0] == 'harbor'  # the authors' class order, not alphabetical
    model.reset_classifier(45)
    assert model.get_classifier().out_features == 45 and model(torch.randn(1, 3, 32, 32)).shape == (1, 45)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    ms = tiny(in_chans=13)
    assert ms(torch.randn(1, 13, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match='in_chans'):
        ms(torch.randn(1, 3, 32, 32))

    # a model rebuilt from its own pretrained_cfg has the same cfg and the same data config
    src = tiny()
    again = timm.create_model('rsmamba_small', pretrained_cfg=src.pretrained_cfg, num_classes=5, **TINY)
    assert again.pretrained_cfg == src.pretrained_cfg
    assert timm.data.resolve_data_config({}, model=again) == timm.data.resolve_data_config({}, model=src)

    # global_pool: class-token pooling and back; drop_path ramps linearly from 0 to drop_path_rate
    tok = tiny(cls_token_position='head')
    assert tok.global_pool == 'token'
    tok.reset_classifier(7, global_pool='avg')
    assert tok.global_pool == 'avg' and tok(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match='class tokens'):
        tiny().reset_classifier(3, global_pool='token')
    ramp = tiny(depth=3, drop_path_rate=0.2)
    assert [getattr(b.drop_path, 'drop_prob', 0.) for b in ramp.blocks] == pytest.approx([0., 0.1, 0.2])
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in tiny(depth=3).blocks)  # default: the original


def test_no_weight_decay_and_layer_decay_groups():
    from timm.optim import create_optimizer_v2
    model = tiny(depth=3)
    assert {'pos_embed', 'cls_token'} <= set(model.no_weight_decay())
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == 5  # stem, 3 blocks, final norm/head
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.blocks[0].mixer.A_log) in no_decay and id(model.pos_embed) in no_decay


def test_dynamic_img_size_and_wrong_size_error():
    model = tiny(dynamic_img_size=True)
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 5)
    with pytest.raises(ValueError, match='dynamic_img_size'):
        tiny(dynamic_img_size=False)(torch.randn(1, 3, 48, 48))


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match='timm_rsmamba.convert'):
        timm.create_model('rsmamba_base.ucm', pretrained=True)


# ---- the authors' checkpoint layout ----------------------------------------------------------------
def to_original_layout(model):
    """Hand-written inverse of the spec's key list: our names -> mmpretrain ImageClassifier names."""
    out = {}
    for k, v in model.state_dict().items():
        p = k.split('.')
        if k.startswith('blocks.') and p[2] == 'mixer':
            nk = f'backbone.layers.{p[1]}.' + '.'.join(p[3:])
        elif k.startswith('blocks.') and p[2] == 'gate':
            nk = f'backbone.gate_layers.{p[1]}.0.weight'
        else:
            nk = {'patch_embed.proj.weight': 'backbone.patch_embed.projection.weight', 'pos_embed': 'backbone.pos_embed',
                  'cls_token': 'backbone.cls_token'}.get(k)
            if nk is None:
                head, leaf = k.split('.')
                nk = {'pre_norm': 'backbone.pre_norm', 'norm': 'backbone.ln1', 'fc_norm': 'backbone.ln2',
                      'head': 'head.fc'}[head] + '.' + leaf
        out[nk] = v.clone()
    return out


@pytest.mark.parametrize('cls_pos', ['none', 'head', 'head_tail', 'middle'])
def test_original_checkpoint_loads_and_reproduces_logits(tmp_path, cls_pos):
    src = tiny(cls_token_position=cls_pos, num_classes=21).eval()
    keys = to_original_layout(src)
    assert 'backbone.layers.0.A_log' in keys and 'head.fc.bias' in keys
    path = tmp_path / 'original.pth'
    torch.save({'meta': {'epoch': 500}, 'state_dict': keys}, path)
    dst = timm.create_model('rsmamba_small', pretrained=True, num_classes=21, cls_token_position=cls_pos,
                            pretrained_cfg_overlay=dict(file=str(path)), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_unmatched_original_keys_are_named():
    from timm_rsmamba.models.rsmamba import checkpoint_filter_fn
    model = tiny()
    keys = to_original_layout(model)
    keys['backbone.mystery.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match='backbone.mystery.weight'):
        checkpoint_filter_fn({'state_dict': keys}, model)


def test_original_checkpoint_of_another_variant_is_named():
    from timm_rsmamba.models.rsmamba import checkpoint_filter_fn
    keys = to_original_layout(tiny())
    deeper = timm.create_model('rsmamba_small', num_classes=21, **dict(TINY, depth=3))
    with pytest.raises(ValueError, match=r'missing from the checkpoint: blocks\.2\.'):
        checkpoint_filter_fn({'state_dict': keys}, deeper)
    wider = timm.create_model('rsmamba_small', num_classes=21, **dict(TINY, intermediate_size=96))
    with pytest.raises(ValueError, match=r'shaped differently .*blocks\.0\.mixer\.A_log \(64, 16\) vs \(96, 16\)'):
        checkpoint_filter_fn({'state_dict': keys}, wider)


def test_original_checkpoint_at_a_larger_size_interpolates_pos_embed(tmp_path):
    """The paper's 384 px experiment in miniature: an original-layout file from 32 px (4x4 grid, class token
    at the tail) loaded at 64 px (8x8): patch rows are an antialiased bicubic upsampling (timm's choice), the
    class-token row stays last."""
    src = tiny(cls_token_position='tail', num_classes=21)
    path = tmp_path / 'original.pth'
    torch.save({'state_dict': to_original_layout(src)}, path)
    big = timm.create_model('rsmamba_small', pretrained=True, num_classes=21, cls_token_position='tail',
                            pretrained_cfg_overlay=dict(file=str(path)), **dict(TINY, img_size=64))
    d = src.pos_embed.shape[-1]
    grid = src.pos_embed[0, :16].reshape(4, 4, d).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(8, 8), mode='bicubic', align_corners=False, antialias=True)[0].permute(1, 2, 0)
    torch.testing.assert_close(big.pos_embed[0, :64], expected.reshape(64, d))
    torch.testing.assert_close(big.pos_embed[0, 64], src.pos_embed[0, 16])
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 21)


def test_checkpoint_at_other_size_resamples_pos_embed(tmp_path):
    src = tiny(cls_token_position='head')
    path = tmp_path / 'w.pth'
    torch.save(src.state_dict(), path)
    big = timm.create_model('rsmamba_small', pretrained=True, num_classes=5, cls_token_position='head',
                            pretrained_cfg_overlay=dict(file=str(path)), **dict(TINY, img_size=64))
    assert big.pos_embed.shape == (1, 1 + 8 * 8, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], src.pos_embed[:, 0])  # class-token row kept as is
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_pretrained_3_channel_weights_adapt_to_13_bands(tmp_path):
    src = tiny()
    path = tmp_path / 'w.pth'
    torch.save(src.state_dict(), path)
    ms = timm.create_model('rsmamba_small', pretrained=True, num_classes=5, in_chans=13,
                           pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    w3, w13 = src.patch_embed.proj.weight, ms.patch_embed.proj.weight
    assert w13.shape[1] == 13
    # timm's adapt_input_conv tiles the RGB kernels and rescales by 3/13
    torch.testing.assert_close(w13[:, :3], w3 * 3 / 13)
    torch.testing.assert_close(w13[:, 3:6], w3 * 3 / 13)


def test_pretrained_with_other_class_count_drops_the_head(tmp_path):
    src = tiny(num_classes=21)
    path = tmp_path / 'w.pth'
    torch.save(src.state_dict(), path)
    m = timm.create_model('rsmamba_small', pretrained=True, num_classes=45,
                          pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert m.head.out_features == 45
    torch.testing.assert_close(m.blocks[1].mixer.A_log, src.blocks[1].mixer.A_log)


def test_initialisation_follows_the_spec():
    """Spec: A_log = log(1..S) per channel, D = 1, pos_embed trunc-normal 0.02, patch conv Kaiming (fan_in,
    linear) = normal with std 1/sqrt(fan_in), mixer Linear/Conv1d at PyTorch's defaults (uniform within
    1/sqrt(fan_in)), class tokens at zero. Checked on the full-size base model, so the statistics are tight."""
    torch.manual_seed(0)
    model = timm.create_model('rsmamba_base', num_classes=21, cls_token_position='head')
    mixer = model.blocks[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1., 17.)).expand(384, 16))
    assert torch.equal(mixer.D, torch.ones(384))
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001 and model.pos_embed.abs().max() < 0.02 * 6
    assert torch.count_nonzero(model.cls_token) == 0
    w = model.patch_embed.proj.weight  # (192, 3, 16, 16): fan_in 768
    assert abs(w.std().item() - 768 ** -0.5) < 0.002 and abs(w.mean().item()) < 0.002
    for layer, fan_in in ((mixer.in_proj, 192), (mixer.out_proj, 384), (mixer.dt_proj, 12), (mixer.conv1d, 4)):
        bound = fan_in ** -0.5
        assert layer.weight.abs().max() <= bound + 1e-6 and layer.weight.abs().max() > 0.9 * bound, layer


def test_token_orders_read_by_the_kernels_match_a_gathered_copy(monkeypatch):
    """The C++ conv and scan read x and z through the blocks' order index ($RSMAMBA_TOKEN_ORDER=kernel, the default)
    or get a gathered copy (gather): the same logits bit for bit, and the same gradients up to summation order."""
    model = tiny()
    assert model.blocks[0].mixer.backend_names() == ('cpu_kernel', 'cpu_kernel')
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for mode in ('gather', 'kernel'):
        monkeypatch.setenv('RSMAMBA_TOKEN_ORDER', mode)
        model.zero_grad()
        torch.manual_seed(0)  # the same shuffles in training mode
        logits = model(x)
        logits.logsumexp(-1).sum().backward()
        results[mode] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(results['kernel'][0], results['gather'][0])
    for name, g in results['kernel'][1].items():
        torch.testing.assert_close(g, results['gather'][1][name], rtol=1e-4, atol=1e-6, msg=name)
