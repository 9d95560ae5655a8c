from .rsmamba import RSMamba, checkpoint_filter_fn, convert_mmpretrain
