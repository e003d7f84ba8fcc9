"""fastdiff: faster sampling from existing diffusion models, same outputs.

Public API: drop-in schedulers named like diffusers' (every class in ``fastdiff.schedulers.SCHEDULERS``),
the sampling loop (``sample``, ``GraphSampler``), many samples over torch.distributed (``generate``,
``load_samples``), the reference samplers (``fastdiff.reference``) and the
custom ops (``fastdiff.ops``), and diffusers pipelines run through fastdiff (``fastdiff.integrations``).
"""

from . import integrations  # diffusers pipelines; imports diffusers only when a pipeline runs
from ._version import __version__
from .generate import generate, load_samples  # the function and the module share a name: the function wins
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
    "generate",
    "integrations",
    "load_samples",
    "release_cached_samplers",
    "sample",
    *sorted(SCHEDULERS),
]
