"""Models shipped with fastdiff: a small digits denoiser and its flow-matching twin ``digits-flow`` (see
``MODEL_CARD.md``)."""

from .digits import (
    CHANNELS,
    FLOW_MODE_OVERRIDES,
    FLOW_SCHEDULER_CONFIG,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    DigitsUNet,
    from_unit_range,
    load_default_model,
    load_flow_model,
    to_unit_range,
)

__all__ = [
    "CHANNELS",
    "FLOW_MODE_OVERRIDES",
    "FLOW_SCHEDULER_CONFIG",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SCHEDULER_CONFIG",
    "DigitsUNet",
    "from_unit_range",
    "load_default_model",
    "load_flow_model",
    "to_unit_range",
]
