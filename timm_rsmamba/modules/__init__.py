from .mamba_mixer import MambaMixer
