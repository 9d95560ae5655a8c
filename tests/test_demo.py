"""The web demo (timm_rsmamba.demo, app.py): predictions against an independent reference, start-up errors of
the CLI, and the Gradio app through gradio_client against a server on 127.0.0.1 (no other network traffic).

The reference is computed here: torchvision transforms + the checkpoint's model + softmax.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

import timm_rsmamba  # noqa: F401
from timm_rsmamba.data import DataError
from timm_rsmamba.demo import Classifier, example_images, space_argv

REPO = Path(__file__).resolve().parents[1]
SAMPLE_VAL = REPO / 'sample_data' / 'ucmerced' / 'val'
TINY = dict(img_size=32, depth=2, embed_dim=32, intermediate_size=64)
CLASSES = ['river', 'airplane', 'beach', 'forest', 'harbor', 'agricultural']  # 6: more than the top 5 shown
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)
IMAGES = [SAMPLE_VAL / 'beach' / 'beach27.jpg', SAMPLE_VAL / 'forest' / 'forest33.jpg']


def _save_checkpoint(path, label_names=True):
    """A tiny model saved with the keys train.py writes (arch, model_kwargs, label_names, pretrained_cfg)."""
    torch.manual_seed(0)
    model = timm.create_model('rsmamba_small', num_classes=len(CLASSES), **TINY)
    with torch.no_grad():  # a decisive head, so the probabilities differ between images
        model.head.weight.mul_(20)
    cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear', mean=MEAN, std=STD,
               num_classes=len(CLASSES))
    ckpt = {'state_dict': model.state_dict(), 'arch': 'rsmamba_small', 'model_kwargs': TINY,
            'num_classes': len(CLASSES), 'pretrained_cfg': cfg, 'epoch': 1}
    if label_names:
        ckpt['label_names'], cfg['label_names'] = CLASSES, tuple(CLASSES)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp('demo') / 'model_best.pth.tar')


def _reference_top5(checkpoint, image_path):
    model = timm.create_model('rsmamba_small', num_classes=len(CLASSES), **TINY)
    model.load_state_dict(torch.load(checkpoint, weights_only=False)['state_dict'])
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    with torch.no_grad():
        probs = model.eval()(tf(Image.open(image_path).convert('RGB'))[None]).softmax(-1)[0]
    values, indices = probs.topk(5)
    return [(CLASSES[i], v) for v, i in zip(values.tolist(), indices.tolist())]


def test_predict_matches_independent_reference(checkpoint):
    clf = Classifier.load(str(checkpoint))
    assert clf.label_names == CLASSES and clf.model_name == 'rsmamba_small'
    for path in IMAGES:
        got = clf.predict(str(path))
        ref = _reference_top5(checkpoint, path)
        assert list(got) == [name for name, _ in ref]  # names, best first
        assert list(got.values()) == pytest.approx([p for _, p in ref], abs=1e-5)
    assert clf.predict(Image.open(IMAGES[0])) == pytest.approx(clf.predict(str(IMAGES[0])), abs=1e-6)
    assert len(clf.predict(str(IMAGES[0]), topk=10)) == len(CLASSES)


def test_predict_rejects_undecodable_images(checkpoint, tmp_path):
    clf = Classifier.load(str(checkpoint))
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(IMAGES[0].read_bytes()[:2000])
    with pytest.raises(DataError, match=r'cannot read truncated\.jpg as an image: image file is truncated'):
        clf.predict(str(truncated))
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not an image')
    with pytest.raises(DataError, match=r'cannot read notes\.png: not an image format'):
        clf.predict(str(not_an_image))


def test_class_map_names_a_model_without_them(tmp_path):
    ckpt = _save_checkpoint(tmp_path / 'nameless.pth.tar', label_names=False)
    with pytest.raises(DataError, match='carries no class names: pass --class-map'):
        Classifier.load(str(ckpt))
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('\n'.join(CLASSES) + '\n')
    assert Classifier.load(str(ckpt), class_map=str(class_map)).label_names == CLASSES
    class_map.write_text('\n'.join(CLASSES[:4]) + '\n')
    with pytest.raises(DataError, match='lists 4 classes, the model has 6'):
        Classifier.load(str(ckpt), class_map=str(class_map))


def test_examples_are_one_image_per_class():
    examples = example_images()
    classes = sorted(p.name for p in SAMPLE_VAL.iterdir())
    assert [Path(e).parent.name for e in examples] == classes
    assert all(Path(e).parent.parent == SAMPLE_VAL for e in examples)
    with pytest.raises(DataError, match='no such folder'):
        example_images('/nonexistent/examples')


def test_space_variables_become_demo_flags(tmp_path):
    assert space_argv({'RSMAMBA_DEMO_MODEL': 'hf-hub:org/rsmamba', 'RSMAMBA_DEMO_CLASS_MAP': 'c.txt'},
                      str(tmp_path)) == ['--model', 'hf-hub:org/rsmamba', '--class-map', 'c.txt']
    assert space_argv({}, str(tmp_path)) == []
    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'config.json').write_text('{}')
    assert space_argv({}, str(tmp_path)) == ['--model', 'local-dir:model']
    assert space_argv({'RSMAMBA_DEMO_CHECKPOINT': 'best.pth.tar'}, str(tmp_path)) == ['--checkpoint', 'best.pth.tar']


def _run(args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1', GRADIO_ANALYTICS_ENABLED='False')
    for var in ('RSMAMBA_DEMO_MODEL', 'RSMAMBA_DEMO_CHECKPOINT', 'RSMAMBA_DEMO_CLASS_MAP'):
        env.pop(var, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('case', ['missing', 'nameless', 'no_model'])
def test_bad_start_up_exits_2_with_a_message(case, tmp_path):
    if case == 'missing':
        args, expect = ['-m', 'timm_rsmamba.demo', '--checkpoint', str(tmp_path / 'nope.pth.tar')], 'does not exist'
    elif case == 'nameless':
        ckpt = _save_checkpoint(tmp_path / 'nameless.pth.tar', label_names=False)
        args, expect = ['-m', 'timm_rsmamba.demo', '--checkpoint', str(ckpt)], 'carries no class names'
    else:  # app.py in an unconfigured Space
        args, expect = [str(REPO / 'app.py')], 'RSMAMBA_DEMO_MODEL'
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and 'Traceback' not in proc.stderr


# ---- the Gradio app, through gradio_client ---------------------------------------------------------------

_LOOPBACK = {'127.0.0.1', '::1', 'localhost'}


@pytest.fixture
def loopback_only(monkeypatch):
    """Record every connection or name lookup beyond this machine (refused as if offline); none may happen.

    gradio_client's hub headers and telemetry would call huggingface.co: huggingface_hub read HF_HUB_OFFLINE and
    HF_HUB_DISABLE_TELEMETRY at import, so its constants are set here.
    """
    import huggingface_hub.constants as hub_constants
    monkeypatch.setenv('GRADIO_ANALYTICS_ENABLED', 'False')
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hub_constants, 'HF_HUB_DISABLE_TELEMETRY', True)
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    attempts = []

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
            attempts.append(address)
            raise OSError(f'network disabled in this test: {address}')
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and host not in _LOOPBACK:
            attempts.append(host)
            raise socket.gaierror(f'network disabled in this test: {host}')
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, 'connect', connect)
    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
    yield
    assert not attempts, f'the demo reached beyond 127.0.0.1: {attempts}'


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_app_predicts_through_the_client(checkpoint, tmp_path, loopback_only):
    try:
        from gradio_client import Client, handle_file
        from gradio_client.exceptions import AppError
    except ImportError:
        pytest.skip('gradio is not installed (pip install -e ".[test]" or ".[demo]" brings it)')
    from timm_rsmamba.demo import build_app, launch
    stubs_before = set((REPO / 'timm_rsmamba').rglob('*.pyi'))
    app = build_app(Classifier.load(str(checkpoint)), [str(p) for p in IMAGES])
    assert set((REPO / 'timm_rsmamba').rglob('*.pyi')) == stubs_before  # Gradio writes stubs for component classes
    port = _free_port()
    launch(app, '127.0.0.1', port, block=False)
    try:
        client = Client(f'http://127.0.0.1:{port}/', verbose=False)
        assert '/predict' in client.view_api(print_info=False, return_format='dict')['named_endpoints']
        tiff = tmp_path / 'beach.tif'  # browsers cannot show TIFF; the API still takes it
        Image.open(IMAGES[0]).save(tiff)
        for path in [*IMAGES, tiff]:
            result = client.predict(handle_file(str(path)), api_name='/predict')
            ref = _reference_top5(checkpoint, path)
            assert result['label'] == ref[0][0]
            assert [c['label'] for c in result['confidences']] == [name for name, _ in ref]
            assert [c['confidence'] for c in result['confidences']] == pytest.approx([p for _, p in ref], abs=1e-5)
        truncated = tmp_path / 'truncated.jpg'
        truncated.write_bytes(IMAGES[0].read_bytes()[:2000])
        with pytest.raises(AppError, match=r'cannot read truncated\.jpg as an image: image file is truncated'):
            client.predict(handle_file(str(truncated)), api_name='/predict')
        not_an_image = tmp_path / 'notes.png'
        not_an_image.write_text('not an image')
        with pytest.raises(AppError, match=r'cannot read notes\.png: not an image format Pillow can decode'):
            client.predict(handle_file(str(not_an_image)), api_name='/predict')
    finally:
        app.close()
