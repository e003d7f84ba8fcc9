from ._base import SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "SchedulerOutput",
]
