"""Drop-in ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler`` (the "Euler" and "Euler a"
samplers): one fused launch per step, diffusers' constructor, API and noise draws."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..schedules import TIMESTEP_SPACINGS, check_choice, check_sigma_spacing_flags, euler_schedule
from ._base import StepPlan
from ._predict import ve_x0
from ._registry import register
from ._sigma import SigmaSchedulerBase

EULER_PREDICTIONS = ("epsilon", "v_prediction", "sample", "original_sample")


class _EulerCommon(SigmaSchedulerBase):
    """What Euler and Euler a share: scale_model_input, init_noise_sigma, forward noising, outputs."""

    order = 1
    _plain_plans = True  # a plan is a function of the step index, the output dtype and the s_* options

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The starting noise's std, a 0-d float32 tensor like diffusers' (sigma_max, or sqrt(sigma_max^2 + 1)
        for "leading" spacing)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1): the VE sample rescaled to the model's unit-variance input."""
        i = self._locate(timestep)
        self.is_scale_input_called = True
        return sample / self._cached(("input_scales",), self._input_scales)[i]

    def _input_scales(self) -> list:
        """sqrt(sigma^2 + 1) per step as Python floats, once per schedule, with torch's float32 ops as diffusers
        forms it from its 0-d sigma (the same bits: torch's square root is not always correctly rounded, so
        numpy's would differ by an ulp at some sigmas): one division per call instead of four tensor ops."""
        return ((torch.from_numpy(self._sigma_values.astype(np.float32)) ** 2 + 1) ** 0.5).tolist()

    def _add_noise_rows(self) -> np.ndarray:
        rows = np.ones((len(self._sigma_values), 2))
        rows[:, 1] = self._sigma_values
        return rows

    def _check_timestep(self, timestep) -> None:
        if isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor)
            and not timestep.is_floating_point()
            and self.timesteps.is_floating_point()
        ):
            raise ValueError(
                f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{type(self).__name__}"
                ".step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
            )

    def _euler_plan(self, i, model_output, table_key, noise: bool, **state) -> StepPlan:
        """Euler's outputs as diffusers forms them: prev in the model output's dtype, x0 in float32 or wider."""
        return StepPlan(
            i,
            table_key=table_key,
            row=i,
            noise_dtype=model_output.dtype if noise else None,
            offset=i,
            out_dtype=model_output.dtype,
            x0_dtype=torch.promote_types(model_output.dtype, torch.float32),
            state=state,
        )


@register(presets={"euler": ({}, {})})
class EulerDiscreteScheduler(_EulerCommon):
    """Euler sampler (Karras et al. 2022, Algorithm 2), as diffusers' ``EulerDiscreteScheduler``, with
    ``s_churn`` / ``s_tmin`` / ``s_tmax`` / ``s_noise`` in ``step``. Extras in ``step``: ``guidance_scale``,
    ``guidance_rescale``, ``noise_seed`` (see ``DDPMScheduler``)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        check_choice("prediction_type", prediction_type, EULER_PREDICTIONS)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_spacing_flags(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        full = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0).numpy()
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].astype(np.float32)
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            ts = (0.25 * np.log(full)).astype(np.float32)
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self._install(ts, np.concatenate([full, [0.0]]).astype(np.float32), None)
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None, sigmas=None):
        """Timesteps and sigmas for ``num_inference_steps`` steps (spacing and sigma options from the config),
        or custom ``timesteps`` or ``sigmas`` (n + 1 values, the last the final sigma)."""
        cfg = self.config
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise ValueError("custom `timesteps` cannot be combined with karras/exponential/beta sigmas")
        if timesteps is not None and cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            raise ValueError("custom `timesteps` cannot be used with timestep_type='continuous' and v_prediction")
        if num_inference_steps is not None:
            from ..schedules import check_num_inference_steps

            check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts, sig = euler_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            spacing=cfg.timestep_spacing,
            steps_offset=cfg.steps_offset,
            interpolation_type=cfg.interpolation_type,
            use_karras_sigmas=cfg.use_karras_sigmas,
            use_exponential_sigmas=cfg.use_exponential_sigmas,
            use_beta_sigmas=cfg.use_beta_sigmas,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
            final_sigmas_type=cfg.final_sigmas_type,
            timesteps=timesteps,
            sigmas=sigmas,
        )
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            ts = (0.25 * torch.log(torch.from_numpy(sig[:-1]))).numpy().astype(np.float32)
        self.num_inference_steps = len(ts)
        self._install(ts, sig, device)

    def _coef_table(self, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> np.ndarray:
        """Karras et al. 2022, Algorithm 2: optional churn to sigma_hat, x0, then one Euler step of
        d = (x - x0) / sigma_hat to the next sigma."""
        sig = self._sigma_values.astype(np.float64)
        sigma, sigma_next = sig[:-1], sig[1:]
        gamma = np.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (len(sig) - 1), 2**0.5 - 1), 0.0)
        sigma_hat = (sigma.astype(np.float32) * (gamma + 1).astype(np.float32)).astype(np.float64)  # as diffusers
        table = np.zeros((len(sigma), coefs.NCOEF))
        table[:, coefs.X_S], table[:, coefs.A_X], table[:, coefs.A_M] = ve_x0(
            self.config.prediction_type, sigma, sigma_hat
        )
        table[:, coefs.K_PRE] = np.where(gamma > 0, s_noise * np.sqrt(np.maximum(sigma_hat**2 - sigma**2, 0.0)), 0.0)
        # derivative = (x - x0) / sigma_hat; prev = x + derivative * (sigma_next - sigma_hat)
        with np.errstate(divide="ignore"):
            table[:, coefs.E_S] = 1.0 / sigma_hat
        table[:, coefs.E_X], table[:, coefs.E_0] = 1.0, -1.0
        table[:, coefs.C_X], table[:, coefs.C_E] = 1.0, sigma_next - sigma_hat
        return table

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One Euler step to the next sigma. With ``s_churn`` > 0 the sample is first pushed to a higher
        sigma with fresh noise (drawn like diffusers from ``generator``, or Philox with ``noise_seed``)."""
        self._check_timestep(timestep)
        return self._step(
            model_output,
            timestep,
            sample,
            {"s_churn": float(s_churn), "s_tmin": float(s_tmin), "s_tmax": float(s_tmax), "s_noise": float(s_noise)},
            generator=generator,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def draws_noise(self, step_kwargs=None) -> bool:
        return (step_kwargs or {}).get("s_churn", 0.0) > 0

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        sigma = float(self._sigma_values[i])
        churn = opts["s_churn"] / (len(self._sigma_values) - 1)
        gamma = min(churn, 2**0.5 - 1) if opts["s_tmin"] <= sigma <= opts["s_tmax"] else 0.0
        key = (opts["s_churn"], opts["s_tmin"], opts["s_tmax"], opts["s_noise"])
        return self._euler_plan(i, model_output, key, gamma > 0, gamma=gamma)

    def _reference_step(self, plan, model_output, sample, noise, opts):
        i = plan.i
        return reference.euler_step(
            model_output,
            sample,
            sigma=self.sigmas[i],
            sigma_next=self.sigmas[i + 1],
            prediction_type=self.config.prediction_type,
            gamma=plan.state["gamma"],
            s_noise=opts["s_noise"],
            noise=noise,
        )


@register(presets={"euler-a": ({}, {})})
class EulerAncestralDiscreteScheduler(_EulerCommon):
    """Ancestral Euler ("Euler a"), as diffusers' ``EulerAncestralDiscreteScheduler``: noise is drawn every
    step like diffusers (from ``generator`` or the global RNG), or in the kernel with ``noise_seed``."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        full = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.concatenate([full[::-1], [0.0]]).astype(np.float32)
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].astype(np.float32)
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self._install(ts, sigmas, None)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps and sigmas for ``num_inference_steps`` steps, spaced by ``config.timestep_spacing``."""
        from ..schedules import check_num_inference_steps

        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        ts, sig = euler_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            spacing=self.config.timestep_spacing,
            steps_offset=self.config.steps_offset,
        )
        self.num_inference_steps = num_inference_steps
        self._install(ts, sig, device)

    def _coef_table(self) -> np.ndarray:
        """Ancestral Euler: split the step to sigma_next into a deterministic step to sigma_down and fresh
        noise of std sigma_up."""
        sig = self._sigma_values.astype(np.float64)
        s_from, s_to = sig[:-1], sig[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            s_up = np.sqrt(np.maximum(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0))
            s_down = np.sqrt(np.maximum(s_to**2 - s_up**2, 0.0))
            table = np.zeros((len(s_from), coefs.NCOEF))
            table[:, coefs.X_S], table[:, coefs.A_X], table[:, coefs.A_M] = ve_x0(
                self.config.prediction_type, s_from, s_from
            )
            table[:, coefs.E_S], table[:, coefs.E_X], table[:, coefs.E_0] = 1.0 / s_from, 1.0, -1.0
        table[:, coefs.C_X], table[:, coefs.C_E] = 1.0, s_down - s_from
        table[:, coefs.SIGMA] = s_up
        return table

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One ancestral Euler step (noise drawn every step, as diffusers draws it)."""
        self._check_timestep(timestep)
        return self._step(
            model_output,
            timestep,
            sample,
            {},
            generator=generator,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def draws_noise(self, step_kwargs=None) -> bool:
        return True

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        return self._euler_plan(i, model_output, (), True)

    def _reference_step(self, plan, model_output, sample, noise, opts):
        return reference.euler_ancestral_step(
            model_output,
            sample,
            sigma=self.sigmas[plan.i],
            sigma_next=self.sigmas[plan.i + 1],
            prediction_type=self.config.prediction_type,
            noise=noise,
        )
