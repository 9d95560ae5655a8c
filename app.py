"""HuggingFace Space entry point: the web demo of ``python -m timm_rsmamba.demo``, configured by the Space's
variables (docs/demo.md): RSMAMBA_DEMO_MODEL (hf-hub:ORG/REPO or local-dir:DIR), RSMAMBA_DEMO_CHECKPOINT (a
train.py checkpoint in the Space) and RSMAMBA_DEMO_CLASS_MAP; without them it loads local-dir:model.
"""
from timm_rsmamba.demo import main, space_argv

if __name__ == '__main__':
    main(space_argv())
