"""The tools around timm: timm's model API contract, and transformers loading RSMamba hub folders offline."""
import numpy as np
import pytest
import torch
from PIL import Image

import timm
from timm.models import get_model_input_config, get_model_traits
from timm.models._manipulate import reinit_non_persistent_buffers
from timm_rsmamba import hub

TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)
LABELS = ['field', 'forest', 'harbor']


def tiny(**kwargs):
    return timm.create_model('rsmamba_small', num_classes=len(LABELS), **dict(TINY, **kwargs))


# ---- timm's model API contract (timm 1.0.31) ---------------------------------------------------------------
def test_attributes_timm_reads_from_every_model():
    model = tiny(in_chans=13)
    assert model.in_chans == 13 and model.num_classes == 3
    assert model.num_features == model.head_hidden_size == 32
    assert model.global_pool == 'avg' and model.num_prefix_tokens == 0 and model.dynamic_img_size is True
    assert model.pretrained_cfg is model.default_cfg and model.pretrained_cfg['first_conv'] == 'patch_embed.proj'
    assert model.get_submodule(model.pretrained_cfg['first_conv']).in_channels == 13
    assert model.get_submodule(model.pretrained_cfg['classifier']) is model.get_classifier()
    # timm's export and data helpers take the channels and size from the model itself, not its source cfg
    assert get_model_traits(model)['in_chans'] == 13
    assert get_model_input_config(model)['input_size'] == (13, 32, 32)
    assert timm.data.resolve_input_data_config(model)['input_size'][0] == 13  # the size is only a recommendation
    fixed = tiny(in_chans=13, dynamic_img_size=False)
    assert timm.data.resolve_input_data_config(fixed)['input_size'] == (13, 32, 32)
    assert [i['num_chs'] for i in model.feature_info] == [32, 32]


def test_feature_wrappers_and_forward_contract():
    x = torch.randn(2, 3, 32, 32)
    model = tiny().eval()
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 32)
    assert model.forward_head(feats).shape == (2, 3) and model.forward_head(feats, pre_logits=True).shape == (2, 32)
    net = timm.create_model('rsmamba_small', features_only=True, out_indices=(-1,), **TINY)
    assert [o.shape for o in net(x)] == [(2, 32, 4, 4)]


def test_meta_device_construction_then_reinit_buffers_equals_a_normal_model():
    """timm (and transformers) build on the meta device and then recompute the buffers the state dict omits."""
    for kwargs in (dict(), dict(pos_embed_type='sine')):
        ref = tiny(**kwargs).eval()
        model = tiny(device='meta', **kwargs).to_empty(device='cpu')
        assert 'eval_perms' not in model.state_dict()
        model.load_state_dict(ref.state_dict())
        assert reinit_non_persistent_buffers(model) == ['(root)']
        assert torch.equal(model.eval_perms, ref.eval_perms)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def test_eval_permutations_follow_the_module_device_and_the_seed():
    model = tiny(shuffle_seed=3)
    expected = torch.randperm(16, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))  # block 1's draw
    assert torch.equal(model.shuffle_permutations(16)[1], expected)
    assert model.shuffle_permutations(16, 'meta')[0].device.type == 'meta'
    model.shuffle_seed = 4  # another seed than the buffer's: drawn anew, not the stale buffer
    assert torch.equal(model.shuffle_permutations(16)[0],
                       torch.randperm(16, generator=torch.Generator().manual_seed(4 * 1_000_003)))


# ---- transformers --------------------------------------------------------------------------------------------
@pytest.fixture
def transformers(monkeypatch):
    module = pytest.importorskip('transformers', reason='transformers is in the test extra: pip install -e ".[test]"')
    for var in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'):
        monkeypatch.setenv(var, '1')
    return module


def _hub_folder(tmp_path, writer):
    torch.manual_seed(0)
    model = tiny().eval()
    out = tmp_path / writer
    if writer == 'timm_rsmamba':
        hub.save_pretrained_folder(model, out, label_names=LABELS)
    else:
        timm.models.save_for_hf(model, out, model_config=dict(label_names=LABELS), safe_serialization=True)
    return model, out


@pytest.mark.parametrize('writer', ['timm_rsmamba', 'timm'])
def test_transformers_loads_hub_folders_with_timms_logits(tmp_path, transformers, writer):
    model, folder = _hub_folder(tmp_path, writer)
    hf = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=0, atol=0)
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        torch.testing.assert_close(hf(pixel_values=x).logits, reloaded(x), rtol=0, atol=0)


def test_transformers_pipeline_matches_timms_preprocessing(tmp_path, transformers):
    model, folder = _hub_folder(tmp_path, 'timm_rsmamba')
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    classify = transformers.pipeline('image-classification', model=str(folder))
    got = {r['label']: r['score'] for r in classify(image, top_k=len(LABELS))}
    # the independent route: timm loads the folder and applies its own eval transform of the folder's data config
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=reloaded))
    with torch.no_grad():
        probs = reloaded(transform(image)[None]).softmax(-1)[0]
    assert got == pytest.approx({name: p.item() for name, p in zip(LABELS, probs)}, abs=1e-6)


def test_transformers_fix_touches_only_rsmamba_configs():
    from timm_rsmamba.transformers_compat import drop_duplicate_num_classes
    ours = dict(architecture='rsmamba_small', num_classes=3, model_args=dict(num_classes=3, depth=2))
    assert drop_duplicate_num_classes(ours) == dict(architecture='rsmamba_small', num_classes=3,
                                                    model_args=dict(depth=2))
    other = dict(architecture='resnet18', num_classes=3, model_args=dict(num_classes=3))
    assert drop_duplicate_num_classes(other) is other


# ---- FX symbolic tracing (timm's create_feature_extractor) --------------------------------------------------
@pytest.mark.parametrize('kwargs', [dict(), dict(cls_token_position='head'), dict(pos_embed_type='sine')])
def test_fx_feature_extractor_returns_block_outputs_and_logits(kwargs):
    model = tiny(depth=3, **kwargs).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes={'blocks.1': 'mid', 'head': 'logits'})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        _, (mid,) = model.forward_intermediates(x, indices=[1], output_fmt='NLC')
        torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=0)
    seq = out['mid'] if model.num_prefix_tokens == 0 else out['mid'][:, 1:]  # intermediates drop class tokens
    torch.testing.assert_close(seq, mid, rtol=0, atol=0)


def test_fx_feature_net_draws_fresh_shuffles_in_training():
    """The random draw is a step of the traced graph, not a constant from trace time."""
    net = timm.create_model('rsmamba_small', features_only=True, feature_cls='fx', out_indices=(0, 1), **TINY)
    x = torch.randn(1, 3, 32, 32)
    assert not torch.equal(net(x)[1], net(x)[1])
    net.eval()
    torch.testing.assert_close(net(x)[1], net(x)[1], rtol=0, atol=0)
