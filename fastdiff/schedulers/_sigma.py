"""Shared by the sigma-space schedulers (Euler, Euler ancestral, DPM-Solver++): diffusers' step-index
bookkeeping without host syncs, and forward noising indexed by schedule step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..schedules import alphas_cumprod_from_betas, make_betas
from ._base import SchedulerBase

SIGMA_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class SigmaSchedulerBase(SchedulerBase):
    """Step-index tracking like diffusers': the first ``step``/``scale_model_input`` finds the index of its
    timestep (the second match when a timestep repeats, as diffusers does), later calls advance a counter.
    Finding the index never syncs when the timestep is an element of ``self.timesteps``."""

    def _init_betas(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale):
        self.betas = make_betas(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale,
            schedules=SIGMA_BETA_SCHEDULES,
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        if rescale:
            # zero terminal SNR would make sigma infinite; diffusers pins abar_T to 2^-24
            self.alphas_cumprod[-1] = 2**-24
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        sigmas = sigmas.astype(np.float32)
        # the tables of a sigma sampler read the timesteps, the sigmas and the config: the same three keep them
        self._set_schedule(timesteps, device, fingerprint=sigmas.tobytes())
        self._sigma_values = sigmas
        self.sigmas = torch.from_numpy(self._sigma_values.copy())
        self._step_index = None
        self._begin_index = None
        self._reset_loop_state()

    def _reset_loop_state(self) -> None:
        self._step_index = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index instead of finding the first timestep's (img2img, inpainting)."""
        self._begin_index = begin_index

    def _first_index(self, timestep) -> int:
        if self._begin_index is not None:
            return self._begin_index
        starts = self._cached(("loop starts",), self._loop_starts)
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
            i = self._element_index(timestep)  # an element of self.timesteps, as loops pass them: no search
            if i is not None and starts[i] is not None:
                return starts[i]
        i = self.index_for_timestep(timestep)  # by value; raises or returns None when it is not in the schedule
        if i is None:
            raise self._schedule_error(self._timestep_value(timestep))
        return starts[i]

    def _loop_starts(self) -> list:
        """Per schedule index j, where a loop whose first timestep is timesteps[j] starts: the second position of
        that value when it repeats, else its only one (diffusers' rule); None for a value equal to no entry (NaN)."""
        values = self._timestep_values
        starts = []
        for v in values:
            matches = np.flatnonzero(values == v)
            starts.append(int(matches[1]) if len(matches) > 1 else int(matches[0]) if len(matches) else None)
        return starts

    def _locate(self, timestep) -> int:
        """diffusers' step-index rule: the first step of a loop finds its timestep (or starts at begin_index),
        later steps count on."""
        if self._step_index is None:
            self._step_index = self._first_index(timestep)
        if self._step_index >= len(self._timestep_values):
            raise ValueError(
                f"step {self._step_index} is past the last of {len(self._timestep_values)} inference steps; call "
                "set_timesteps again to start a new loop"
            )
        return self._step_index

    def _advance(self, plan) -> None:
        self._step_index = plan.i + 1

    # ------------------------------------------------------------------ forward noising

    def _add_noise_rows(self) -> np.ndarray:
        """(P, Q) per schedule step: noisy = P * x + Q * noise."""
        raise NotImplementedError

    def _step_indices(self, timesteps: torch.Tensor, device) -> torch.Tensor:
        """Schedule index per entry of ``timesteps`` (int64, on ``device``), diffusers' rules: begin_index /
        step_index when set; else by value, the second match when a value repeats. Host lookup for CPU
        timesteps; device-side comparison for CUDA ones (-1 where a value is missing: NaN output)."""
        n = timesteps.numel()
        if self._begin_index is not None:
            i = self._step_index if self._step_index is not None else self._begin_index
            return torch.full((n,), i, dtype=torch.int64, device=device)
        if timesteps.device.type == "cpu":
            idx = []
            for v in timesteps.tolist():
                matches = np.flatnonzero(self._timestep_values == v)
                if len(matches) == 0:
                    raise ValueError(f"`timesteps` value {v} is not in the schedule {self._timestep_values.tolist()}")
                idx.append(int(matches[1] if len(matches) > 1 else matches[0]))
            return torch.tensor(idx, dtype=torch.int64).to(device)
        sched = self.timesteps.to(timesteps.device)
        match = sched[None, :] == timesteps.to(sched.dtype)[:, None]
        count = match.sum(1)
        second = match & (match.cumsum(1) == 2)
        idx = torch.where(count > 1, second.int().argmax(1), match.int().argmax(1))
        return torch.where(count > 0, idx, torch.full_like(idx, -1)).to(device)

    def add_noise(
        self, original_samples: torch.Tensor, noise: Optional[torch.Tensor], timesteps, *, noise_seed=None
    ) -> torch.Tensor:
        """Forward noising at the schedule steps of ``timesteps`` (1 or B entries), one launch."""
        x = original_samples
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("`original_samples` must be a floating-point tensor")
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        timesteps = timesteps.reshape(-1)
        if timesteps.numel() not in (1, x.shape[0]):
            raise ValueError(f"`timesteps` must have 1 or batch={x.shape[0]} entries, got {timesteps.numel()}")
        index = self._step_indices(timesteps, x.device)

        def table():
            return torch.from_numpy(self._add_noise_rows().astype(np.float32)).contiguous().to(x.device)

        return self._add_noise(x, noise, index, noise_seed, "steps", table, self._reference_add_noise)

    def _reference_add_noise(self, x, noise, index):
        sigmas = self.sigmas.to(device=x.device, dtype=x.dtype)
        sigma = sigmas[index.to(x.device)].flatten()
        while sigma.ndim < x.ndim:
            sigma = sigma.unsqueeze(-1)
        return x + noise * sigma
