"""Models shipped with fastdiff: a small digits denoiser (see ``MODEL_CARD.md``)."""

from .digits import (
    CHANNELS,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    DigitsUNet,
    from_unit_range,
    load_default_model,
    to_unit_range,
)

__all__ = [
    "CHANNELS",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SCHEDULER_CONFIG",
    "DigitsUNet",
    "from_unit_range",
    "load_default_model",
    "to_unit_range",
]
