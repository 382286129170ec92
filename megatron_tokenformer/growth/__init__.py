"""Incremental scaling: grow a trained TokenFormer by appending key-value parameter tokens.

    expand.py      growth on global tensors, checkpoint in, grown checkpoint out (format side
                   only: tools/expand_params.py uses it without DeepSpeed)
    controller.py  the `growth` config schedule: growing a running job in place
"""
from .expand import KEY_INITS, TAUS, VALUE_INITS, GrowthError, GrowthOptions, expand_checkpoint, grow

__all__ = ["KEY_INITS", "TAUS", "VALUE_INITS", "GrowthError", "GrowthOptions", "expand_checkpoint", "grow"]
