"""What every fastdiff scheduler shares: diffusers-style config handling, timestep lookup without
host syncs, per-device coefficient tables, noise drawing and the fused-step call."""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import _backend, coefs, ops, reference
from ..noise import as_seed_tensor, philox_normal, randn_tensor
from ._config import ConfigMixin
from ._output import SchedulerOutput  # noqa: F401  (scheduler files import it from here)


class SchedulerBase(ConfigMixin):
    """Base of the drop-in schedulers. Subclasses define ``__init__`` with diffusers' exact keyword
    arguments (calling ``_register_config(locals())`` first), ``set_timesteps``, ``step`` and
    ``_coef_table``."""

    order = 1

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ timesteps

    def _set_schedule(self, timesteps: np.ndarray, device) -> None:
        """Install integer or float timesteps (descending) and reset the per-schedule caches."""
        dtype = torch.int64 if np.issubdtype(timesteps.dtype, np.integer) else torch.float32
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(dtype=dtype, device=device)
        self._timestep_values = timesteps
        self._index_of = {}
        for i, t in enumerate(timesteps.tolist()):
            self._index_of.setdefault(t, i)
        self._tables = {}
        self._device_cache = {}

    def index_for_timestep(self, timestep) -> int:
        """Index of ``timestep`` in ``self.timesteps`` without a device sync when ``timestep`` is an
        element of ``self.timesteps`` itself (how pipelines iterate); otherwise by value."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"`timestep` must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
            ts = self.timesteps
            if (
                timestep.device == ts.device
                and timestep.dtype == ts.dtype
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
            ):
                i = timestep.storage_offset() - ts.storage_offset()
                if 0 <= i < len(ts):
                    return i
            timestep = timestep.item()  # a copy elsewhere: one host read (a sync for CUDA tensors)
        value = timestep.item() if isinstance(timestep, np.generic) else timestep
        if isinstance(value, float) and value.is_integer() and self.timesteps.dtype == torch.int64:
            value = int(value)
        i = self._index_of.get(value)
        if i is None:
            shown = self._timestep_values.tolist()
            shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-6:]
            raise ValueError(
                f"`timestep`={value!r} is not in the schedule; expected one of scheduler.timesteps {shown}"
                + ("" if getattr(self, "num_inference_steps", None) else " (call set_timesteps first?)")
            )
        return i

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is None: call `set_timesteps` before `step`")

    def _reset_loop_state(self) -> None:
        """Forget per-loop Python state (multistep history) without touching the device tables."""

    # ------------------------------------------------------------------ device-side tables

    def _device_table(self, key, device) -> torch.Tensor:
        """The float32 coefficient table for ``key`` on ``device``, built once per set_timesteps."""
        device = torch.device(device)
        full_key = (key, device)
        table = self._tables.get(full_key)
        if table is None:
            host = self._tables.get((key, None))
            if host is None:
                host = self._coef_table(*key)
                self._tables[(key, None)] = host
            table = torch.from_numpy(host.astype(np.float32)).to(device)
            self._tables[full_key] = table
        return table

    def _cached(self, key, make):
        value = self._device_cache.get(key)
        if value is None:
            value = make()
            self._device_cache[key] = value
        return value

    def _scalar(self, value, device) -> torch.Tensor:
        """A float32 device scalar holding ``value`` (cached: no host-to-device copy per step)."""
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=torch.float32).reshape(1)
        return self._cached(
            ("scalar", float(value), torch.device(device)),
            lambda: torch.tensor([float(value)], dtype=torch.float32, device=device),
        )

    def _seed_tensor(self, seed, batch, device) -> torch.Tensor:
        if isinstance(seed, torch.Tensor):
            return as_seed_tensor(seed, batch, device)
        key = ("seed", tuple(seed) if isinstance(seed, (list, tuple)) else seed, batch, torch.device(device))
        return self._cached(key, lambda: as_seed_tensor(seed, batch, device))

    def _offset_tensor(self, i: int, device) -> torch.Tensor:
        """Device int64 (1,) holding ``i``: a view into a cached arange, so no copy per step."""
        n = max(len(self.timesteps), i + 1)
        offs = self._cached(
            ("offsets", n, torch.device(device)), lambda: torch.arange(n, dtype=torch.int64, device=device)
        )
        return offs[i : i + 1]

    # ------------------------------------------------------------------ validation

    def _validate_step(self, model_output, sample, guidance_scale, channel_factor: int = 1):
        """Check the step's tensors (types, devices, shapes; a doubled batch under guidance, doubled channels
        for a learned variance). Returns the number of samples the step produces."""
        batch = guidance_batch(model_output, guidance_scale) if isinstance(model_output, torch.Tensor) else None
        shape = tuple(getattr(sample, "shape", ()))
        expected = shape
        if shape:
            rest = ((shape[1] * channel_factor,) + shape[2:]) if len(shape) >= 2 else ()
            expected = (shape[0] * (2 if guidance_scale is not None else 1),) + rest
        self._check_tensors(model_output, sample, [expected])
        return batch

    @staticmethod
    def _reference_noise(noise, seed, offset, sample, dtype):
        """Noise for a reference step: the drawn tensor, or the Philox normals the kernels draw for ``seed``."""
        if seed is None:
            return noise
        z = philox_normal(seed, sample[0].numel(), offset, coefs.STREAM_STEP)
        return z.reshape(sample.shape).to(dtype)

    @staticmethod
    def _add_noise_philox(x, noise_seed):
        """The Philox noise the add-noise kernels draw for ``noise_seed`` (offset 0, the add-noise stream)."""
        seeds = as_seed_tensor(noise_seed, x.shape[0], x.device)
        z = philox_normal(seeds, x[0].numel(), 0, coefs.STREAM_ADD_NOISE)
        return z.reshape(x.shape).to(x.dtype)

    @staticmethod
    def _reference_guided(model_output, guidance_scale, guidance_rescale: float):
        """The guided model output, combined op by op as diffusers pipelines do."""
        if guidance_scale is None:
            return model_output
        guided = reference.apply_guidance(model_output, guidance_scale)
        if guidance_rescale > 0:
            guided = reference.rescale_noise_cfg(guided, model_output.chunk(2)[1], guidance_rescale)
        return guided

    def _guidance_args(self, model_output, guidance_scale, guidance_rescale: float, device):
        """(device guidance scalar, per-sample rescale factors) for the fused step."""
        if guidance_scale is None:
            return None, None
        mscale = rescale_factor(model_output, guidance_scale, guidance_rescale) if guidance_rescale > 0 else None
        return self._scalar(guidance_scale, device), mscale

    @staticmethod
    def _check_tensors(model_output, sample, expected_mo_shape):
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {t.dtype}")
        if sample.ndim < 1:
            raise ValueError(f"`sample` must have a batch dimension, got shape {tuple(sample.shape)}")
        if model_output.device != sample.device:
            raise ValueError(
                f"`model_output` is on {model_output.device} but `sample` is on {sample.device}; "
                "expected the same device"
            )
        if tuple(model_output.shape) not in expected_mo_shape:
            shapes = " or ".join(str(s) for s in expected_mo_shape)
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)}; expected {shapes} for `sample` of shape "
                f"{tuple(sample.shape)}"
            )

    # ------------------------------------------------------------------ the fused call

    def _resolve_backend(self, device) -> str:
        # resolved once per (request, FASTDIFF_BACKEND, device): resolving checks imports and the environment
        key = (self.backend, os.environ.get("FASTDIFF_BACKEND"), device)
        backend = self._resolved.get(key)
        if backend is None:
            backend = self._resolved[key] = _backend.resolve(self.backend, device)
        self.last_backend = backend
        return backend

    def _add_noise_backend(self, backend: str, x: torch.Tensor, noise) -> str:
        """The backend add_noise runs on (recorded in ``last_backend``; pass it with ``routed=True``): noise
        of another dtype than the sample goes to Triton rather than being rounded by the CUDA extension."""
        if backend == "cuda":
            backend = self.last_backend = ops.route(
                backend, x.dtype, [noise.dtype] if noise is not None else [], [x.dtype]
            )
        return backend

    def _draw_noise(self, shape, generator, device, dtype, noise_seed, variance_noise, batch, i):
        """Returns (noise tensor or None, seed tensor or None, offset tensor or None)."""
        if variance_noise is not None:
            if tuple(variance_noise.shape) != tuple(shape):
                raise ValueError(f"`variance_noise` has shape {tuple(variance_noise.shape)}; expected {tuple(shape)}")
            return variance_noise.to(device), None, None
        if noise_seed is not None:
            if generator is not None:
                raise ValueError("pass either `generator` or `noise_seed`, not both")
            return None, self._seed_tensor(noise_seed, batch, device), self._offset_tensor(i, device)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype), None, None

    def _fused(
        self,
        backend,
        coef,
        model_output,
        sample,
        *,
        out_dtype,
        noise=None,
        seed=None,
        offset=None,
        guidance=None,
        mscale=None,
        var=None,
        var_mode=coefs.VAR_FIXED,
        hist=(),
        clip_range=0.0,
        thresholding=False,
        write_x0=True,
        x0_dtype=None,
        x0_out=None,
    ):
        """One fused step with this scheduler's clipping/thresholding. Dynamic thresholding needs the
        per-sample quantile of |x0| first: a pass that writes only x0, then torch.quantile."""
        if backend == "cuda":  # routed once here, to say which kernel runs (some dtype mixes go to Triton)
            outs = [out_dtype] + ([x0_out.dtype if x0_out is not None else x0_dtype or out_dtype] if write_x0 else [])
            ins = [t.dtype for t in (model_output, noise, var, *hist) if t is not None]
            backend = self.last_backend = ops.route(backend, sample.dtype, ins, outs)
        thresh = None
        # the thresholding pass writes a float32 x0 only, which every backend the route can pick runs exactly
        common = dict(
            backend=backend, routed=True, noise=noise, seed=seed, offset=offset, guidance=guidance, mscale=mscale
        )
        if thresholding:
            _, raw = ops.fused_step(sample, model_output, coef, out_dtype=torch.float32, write_prev=False, **common)
            ratio, max_value = self.config.dynamic_thresholding_ratio, self.config.sample_max_value
            thresh = torch.quantile(raw.reshape(raw.shape[0], -1).abs(), ratio, dim=1)
            thresh = thresh.clamp(min=1, max=max_value).contiguous()
            clip_range = 0.0
        return ops.fused_step(
            sample,
            model_output,
            coef,
            out_dtype=out_dtype,
            write_x0=write_x0,
            x0_dtype=x0_dtype,
            thresh=thresh,
            var=var,
            var_mode=var_mode,
            hist=hist,
            clip_range=clip_range,
            x0_out=x0_out,
            **common,
        )


def guidance_batch(model_output: torch.Tensor, guidance_scale) -> int:
    """Number of samples the step produces: half the batch under classifier-free guidance."""
    if guidance_scale is None:
        return model_output.shape[0]
    if model_output.shape[0] % 2:
        raise ValueError(
            f"`model_output` must hold an (unconditional, conditional) doubled batch when `guidance_scale` is "
            f"given; got an odd batch of {model_output.shape[0]}"
        )
    return model_output.shape[0] // 2


def rescale_factor(model_output: torch.Tensor, guidance_scale, guidance_rescale: float) -> torch.Tensor:
    """Per-sample multiplier that applies diffusers' ``rescale_noise_cfg`` to the guided output:
    guided * (r * std_cond / std_guided + 1 - r). Shape (B,), float32."""
    uncond, cond = model_output.float().chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    dims = list(range(1, cond.ndim))
    ratio = cond.std(dim=dims) / guided.std(dim=dims)
    return (guidance_rescale * ratio + (1 - guidance_rescale)).contiguous()
