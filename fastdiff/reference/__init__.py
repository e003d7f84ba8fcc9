"""Pure-PyTorch samplers written op by op the way diffusers writes them: the definition of "correct".

These functions take plain scalars and tensors (no scheduler object) so that each reads like the
paper it implements. The fast paths are tested against them and against diffusers itself.
"""

from .common import add_noise, apply_guidance, get_velocity, rescale_noise_cfg, threshold_sample
from .ddim import ddim_step
from .ddpm import ddpm_step, ddpm_variance
from .dpmsolver import alpha_sigma, dpm_eps, dpm_update, dpm_x0
from .euler import euler_ancestral_step, euler_step
from .flow_match import flow_match_euler_step, flow_match_euler_step_per_token, scale_noise
from .unipc import unipc_alpha_sigma, unipc_convert, unipc_correct, unipc_predict

__all__ = [
    "add_noise",
    "alpha_sigma",
    "dpm_eps",
    "dpm_update",
    "dpm_x0",
    "euler_ancestral_step",
    "euler_step",
    "flow_match_euler_step",
    "flow_match_euler_step_per_token",
    "scale_noise",
    "apply_guidance",
    "ddim_step",
    "ddpm_step",
    "ddpm_variance",
    "get_velocity",
    "rescale_noise_cfg",
    "threshold_sample",
    "unipc_alpha_sigma",
    "unipc_convert",
    "unipc_correct",
    "unipc_predict",
]
