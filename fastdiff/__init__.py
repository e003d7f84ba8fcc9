"""fastdiff: faster sampling from existing diffusion models, same outputs.

Public API: drop-in schedulers named like diffusers' (every class in ``fastdiff.schedulers.SCHEDULERS``),
the sampling loop (``sample``, ``GraphSampler``), the reference samplers (``fastdiff.reference``) and the
custom ops (``fastdiff.ops``).
"""

from ._version import __version__
from .graph import GraphCaptureError, GraphSampler
from .sampling import release_cached_samplers, sample
from .schedulers import PRESETS, SCHEDULERS, SchedulerOutput

globals().update(SCHEDULERS)

__all__ = [
    "GraphCaptureError",
    "GraphSampler",
    "PRESETS",
    "SCHEDULERS",
    "SchedulerOutput",
    "__version__",
    "release_cached_samplers",
    "sample",
    *sorted(SCHEDULERS),
]
