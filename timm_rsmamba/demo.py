"""A web demo of a trained scene classifier: upload or pick an aerial image, see its top-5 classes.

    python -m timm_rsmamba.demo --checkpoint output/train/quickstart/model_best.pth.tar
    python -m timm_rsmamba.demo --model hf-hub:ORG/rsmamba-base-ucm --share

The model loads as in validate.py (``build_eval_model``: checkpoint, ``hf-hub:``/``local-dir:`` or a timm name
with ``--pretrained``), images decode with ``load_image`` (TIFF, 16-bit, palette) and go through timm's eval
transform for the model's pretrained_cfg. :class:`Classifier` predicts without Gradio; :func:`build_app` puts
it on a Gradio page whose ``/predict`` endpoint takes an image and returns the label confidences. ``app.py`` at
the repository root runs the same app as a HuggingFace Space (docs/demo.md).
"""
import argparse
import html
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform

from .data import DataError, convert_image, image_mode_for_channels, load_image
from .evaluation import _class_map_names, _data_config, build_eval_model
from .malloc import MALLOC_CHOICES, MALLOC_HELP, configure_malloc

__all__ = ['Classifier', 'example_images', 'build_app', 'launch', 'space_argv', 'main']

_logger = logging.getLogger('timm_rsmamba.demo')  # also under python -m

SAMPLE_DIR = Path(__file__).resolve().parents[1] / 'sample_data' / 'ucmerced' / 'val'
SPACE_ENV = {'RSMAMBA_DEMO_CHECKPOINT': '--checkpoint', 'RSMAMBA_DEMO_MODEL': '--model',
             'RSMAMBA_DEMO_CLASS_MAP': '--class-map'}
SPACE_MODEL_DIR = 'model'  # a Space without settings loads local-dir:model (config.json + model.safetensors)


class Classifier:
    """A model with its class names and eval preprocessing; ``predict`` maps one image to its top-k classes."""

    def __init__(self, model: torch.nn.Module, model_name: str, label_names: Sequence[str], data_config: Dict,
                 device: str = 'cpu', source: str = ''):
        if len(label_names) != model.num_classes:
            raise DataError(f'{len(label_names)} class names for a {model.num_classes}-class model')
        self.model = model.to(device).eval()
        self.model_name, self.source, self.device = model_name, source or model_name, torch.device(device)
        self.label_names = [str(n) for n in label_names]
        self.data_config = data_config
        self.image_mode = image_mode_for_channels(data_config['input_size'][0])
        self.transform = create_transform(**data_config, is_training=False)

    @classmethod
    def load(cls, checkpoint: str = '', model_name: Optional[str] = None, pretrained: bool = False,
             class_map: str = '', device: str = 'cpu') -> 'Classifier':
        """Load as inference.py does; a model must know its class names (from the checkpoint or --class-map)."""
        em = build_eval_model(model_name, checkpoint, pretrained)
        names = _class_map_names(class_map) if class_map else em.label_names
        if names is None:
            raise DataError(f'{checkpoint or model_name} carries no class names: pass --class-map FILE (one name '
                            f'per line, in the model\'s index order)')
        if len(names) != em.model.num_classes:
            raise DataError(f'--class-map {class_map} lists {len(names)} classes, the model has '
                            f'{em.model.num_classes}')
        return cls(em.model, em.model_name, names, _data_config(argparse.Namespace(), em), device,
                   source=checkpoint or em.model_name)

    @torch.inference_mode()
    def predict(self, image, topk: int = 5) -> Dict[str, float]:
        """Top-k class names and probabilities, best first. ``image``: a path, bytes, a file object or PIL image."""
        if isinstance(image, Image.Image):
            image = convert_image(image, self.image_mode)
        else:
            name = os.path.basename(image) if isinstance(image, (str, os.PathLike)) else 'the image'
            try:
                image = load_image(image, self.image_mode)
            except UnidentifiedImageError as e:  # its message is the file object's repr
                raise DataError(f'cannot read {name}: not an image format Pillow can decode. Upload a JPEG, PNG '
                                f'or TIFF file.') from e
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f'cannot read {name} as an image: {e}. Upload a JPEG, PNG or TIFF file.') from e
        x = self.transform(image).unsqueeze(0).to(self.device)
        probs = self.model(x).float().softmax(-1)[0]
        values, indices = probs.topk(min(topk, len(self.label_names)))
        return {self.label_names[i]: float(v) for v, i in zip(values.tolist(), indices.tolist())}

    def describe(self) -> str:
        """Markdown: what is loaded, and its classes."""
        size = 'x'.join(str(s) for s in self.data_config['input_size'][1:])
        return (f'**Model:** `{self.model_name}` from `{self.source}`, {len(self.label_names)} classes, '
                f'{size} px input, on {self.device.type}.\n\n**Classes:** {", ".join(self.label_names)}')


def example_images(folder=None) -> List[str]:
    """The first image of each class folder in ``folder`` (sorted), one example per class. Default: the UC Merced
    sample beside the package when it is there (a source checkout or a Space), else none."""
    from .data.stats import find_images
    if folder is None and not SAMPLE_DIR.is_dir():
        return []
    folder = Path(folder or SAMPLE_DIR)
    if not folder.is_dir():
        raise DataError(f'--examples {folder}: no such folder')
    examples = []
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            examples.append(find_images(cls_dir)[0])
        except DataError:  # a class folder without images
            continue
    return examples


def build_app(classifier: Classifier, examples: Sequence[str] = (), topk: int = 5):
    """The Gradio page: an image in, a gr.Label of the top-k classes out; the API endpoint is ``/predict``.

    The page opens with the first example classified; picking or uploading an image classifies it. Uploads reach
    ``Classifier.predict`` undecoded, so a file that is no image gets its readable error, not Gradio's. (A gr.Image
    subclass could do the same, but Gradio writes a .pyi stub beside the module of every component class.)
    """
    import gradio as gr

    def predict(image):
        """``image``: a path (examples), or the upload's file record (the events with preprocess=False)."""
        path = image.get('path') if isinstance(image, dict) else image
        if path is None:
            raise gr.Error('No image: upload one or pick an example.')
        try:
            return classifier.predict(path, topk)
        except DataError as e:
            raise gr.Error(html.escape(str(e)), print_exception=False) from e

    def show(image):  # the page's own events: no error for a cleared image
        return None if image is None else predict(image)

    with gr.Blocks(title='RSMamba scene classification') as app:
        gr.Markdown('# RSMamba: remote-sensing scene classification\n'
                    'Upload an aerial image or pick an example: the model shows its five most likely scene '
                    'classes.\n\n' + classifier.describe())
        with gr.Row():
            with gr.Column():
                image = gr.Image(type='filepath', image_mode=None, label='Aerial image', height=320,
                                 sources=['upload', 'clipboard'], value=examples[0] if examples else None)
                button = gr.Button('Classify', variant='primary')
            label = gr.Label(num_top_classes=topk, label=f'Top-{topk} classes')
        if examples:
            gr.Examples(list(examples), inputs=image, outputs=label, fn=show, run_on_click=True, cache_examples=False,
                        examples_per_page=len(examples), label='UC Merced sample images (one per class)',
                        api_visibility='private')
            app.load(lambda: predict(examples[0]), None, label, api_visibility='private')
        # preprocess=False: uploads reach predict undecoded (Gradio's own decoding fails with an unreadable message)
        button.click(predict, image, label, api_name='predict', preprocess=False)
        image.upload(show, image, label, api_visibility='private', preprocess=False)
        image.clear(lambda: None, None, label, api_visibility='private')
    return app


def launch(app, host: Optional[str] = None, port: Optional[int] = None, share: bool = False, block: bool = True):
    """Serve the app; host/port default to Gradio's (GRADIO_SERVER_NAME/PORT, which Spaces set; else 127.0.0.1)."""
    return app.launch(server_name=host, server_port=port, share=share, show_error=True, prevent_thread_lock=not block)


def space_argv(environ: Mapping[str, str] = os.environ, cwd: str = '.') -> List[str]:
    """demo flags from a Space's variables (RSMAMBA_DEMO_MODEL/CHECKPOINT/CLASS_MAP); else local-dir:model."""
    argv = []
    for var, flag in SPACE_ENV.items():
        if environ.get(var):
            argv += [flag, environ[var]]
    if not argv and os.path.isfile(os.path.join(cwd, SPACE_MODEL_DIR, 'config.json')):
        argv = ['--model', f'local-dir:{SPACE_MODEL_DIR}']
    return argv


def build_parser():
    p = argparse.ArgumentParser(description='RSMamba web demo (Gradio): upload an image, see the top-5 classes')
    p.add_argument('--checkpoint', default='', metavar='FILE', help='train.py checkpoint (.pth.tar) or weights file')
    p.add_argument('--model', '-m', default=None, metavar='MODEL',
                   help='hf-hub:ORG/REPO, local-dir:DIR or a timm name (default: the checkpoint\'s architecture)')
    p.add_argument('--pretrained', action='store_true',
                   help='load the model name\'s pretrained weights (implied without --checkpoint)')
    p.add_argument('--class-map', default='', metavar='FILE',
                   help='class names in the model\'s index order (.txt, one per line), for a model without them')
    p.add_argument('--examples', default=None, metavar='DIR',
                   help='folder of class folders; the first image of each is an example (default: the UC Merced '
                        'sample in sample_data/, when present)')
    p.add_argument('--topk', type=int, default=5, metavar='N', help='classes shown (default: 5)')
    p.add_argument('--device', default=None, help='device (default: cuda if available, else cpu)')
    p.add_argument('--host', default=None, help='address to serve on (default: 127.0.0.1; 0.0.0.0 for everyone)')
    p.add_argument('--port', type=int, default=None, metavar='N', help='port (default: 7860, or the next free one)')
    p.add_argument('--share', action='store_true', help='also serve on a public gradio.live link (72 h)')
    p.add_argument('--malloc', default='auto', choices=MALLOC_CHOICES, help=MALLOC_HELP)
    return p


def main(argv=None):
    logging.basicConfig(format='%(message)s')  # warnings from every library, progress from this package only
    logging.getLogger('timm_rsmamba').setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if not args.checkpoint and not args.model:
        _fail('no model: pass --checkpoint FILE (a train.py checkpoint) or --model hf-hub:ORG/REPO | '
              'local-dir:DIR (in a Space, set RSMAMBA_DEMO_MODEL or RSMAMBA_DEMO_CHECKPOINT; docs/demo.md)')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    configure_malloc(args.malloc, huge_pages=True)
    try:
        classifier = Classifier.load(args.checkpoint, args.model, args.pretrained or not args.checkpoint,
                                     args.class_map, device)
        _logger.info(f'{classifier.model_name}: {len(classifier.label_names)} classes; a first forward (the CPU '
                     f'kernels build on first use, about 30 s)')
        classifier.predict(Image.new(classifier.image_mode, classifier.data_config['input_size'][:0:-1]))
        examples = example_images(args.examples)
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail('the demo needs Gradio: pip install "timm-rsmamba[demo]" (or pip install gradio)')
    launch(build_app(classifier, examples, args.topk), args.host, args.port, args.share)


def _fail(message: str):
    _logger.error(f'error: {message}')
    sys.exit(2)


if __name__ == '__main__':
    main()
