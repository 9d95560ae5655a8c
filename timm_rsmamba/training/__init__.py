"""Training for timm-rsmamba: timm's train.py flags and machinery, plus what remote-sensing runs need."""
from .args import ConfigError, build_parser, parse_args
from .checkpoint import (AtomicCheckpointSaver, CheckpointError, atomic_save, find_resume_checkpoint,
                         load_initial_checkpoint, restore_training_state)
from .curves import plot_training_curves
from .engine import evaluate, format_eta, train_one_epoch
from .runner import build_datasets, build_model, epoch_seed, setup_device, train, weights_digest
