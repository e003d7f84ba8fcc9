"""fastdiff: faster sampling from existing diffusion models, same outputs.

Public API: drop-in schedulers named like diffusers' (``DDPMScheduler``, ``DDIMScheduler``, Euler, Euler
ancestral, DPM-Solver++), the sampling loop (``sample``, ``GraphSampler``), the reference samplers
(``fastdiff.reference``) and the custom ops (``fastdiff.ops``).
"""

__version__ = "0.1.0"

from .graph import GraphCaptureError, GraphSampler  # noqa: E402
from .sampling import release_cached_samplers, sample  # noqa: E402
from .schedulers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerOutput,
)

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "GraphCaptureError",
    "GraphSampler",
    "SchedulerOutput",
    "__version__",
    "release_cached_samplers",
    "sample",
]
