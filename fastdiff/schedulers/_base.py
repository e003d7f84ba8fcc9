"""What every fastdiff scheduler shares: diffusers-style config handling, timestep lookup without host
syncs, per-device coefficient tables, and the one step skeleton (validate, locate, plan, draw noise, pick
the backend, fused or reference call, output) that a sampler fills in through a few hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .. import coefs, ops, reference
from ..coefs import VarMode
from ..noise import as_seed_tensor, philox_normal, randn_tensor
from ._config import ConfigMixin
from ._output import SchedulerOutput  # noqa: F401  (scheduler files import it from here)


class SchedulerBase(ConfigMixin):
    """Base of the drop-in schedulers: diffusers' scheduler contract, with one step skeleton (``_step``).

    A sampler is one file (see docs/adding-a-sampler.md) that defines:

    - ``__init__`` with diffusers' exact arguments, calling ``self._register_config(locals(), backend)`` first;
    - ``set_timesteps`` (installing the schedule with ``_set_schedule``) and diffusers' other public methods;
    - ``step`` with diffusers' exact signature, calling ``self._step(...)`` with its sampler options;
    - ``_coef_table(*key)``: the coefficient rows of the current schedule (``fastdiff.coefs``), float64;
    - ``_plan(i, timestep, model_output, sample, opts)``: which row, whether noise, history in and out;
    - ``_reference_step(plan, model_output, sample, noise, opts)``: the op-by-op reference;
    - optionally ``_locate`` (how the step index is found), ``_advance`` (per-loop state after a step),
      ``_channel_factors`` (a learned variance doubles the model output's channels);

    and registers its class with ``@register`` (``_registry.py``).

    **The rule every sampler keeps**: per-step state (the row, the noise offset, the history slots, the solver
    order) is a pure function of the step index and the loop's first index. ``GraphSampler`` runs the Python
    of a loop once, while capturing, and replays the recorded kernels afterwards; anything that changes from
    one loop to the next without being a function of the step index would be frozen at its capture value.
    Device tensors the kernels read (tables, seeds, offsets, history buffers) are allocated once per schedule
    and reused, never re-created per step, so their addresses stay valid across replays.
    """

    order = 1
    # Whether a plan without tensors of its own (no history, corrector, learned variance, thresholding or
    # reference-only path: ``_is_plain``) is a function of the step index, the step's tensor shapes and dtypes,
    # and its options alone. Then a CPU step that ran once reruns through a cached lane (``kernels.eager.Lane``)
    # without planning, selecting or building StepParams again. A sampler whose plan reads the timestep's value
    # beyond the index, or keeps state in ``_plan``, leaves this False.
    _plain_plans = False

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ timesteps

    def _set_schedule(self, timesteps: np.ndarray, device, fingerprint: Optional[bytes] = None) -> None:
        """Install integer or float timesteps (descending) and reset the per-schedule caches.

        ``fingerprint``: the bytes of everything else the coefficient tables read (the sigmas), from a sampler
        whose tables are a function of the timesteps, these bytes and the config. When the new schedule's
        timesteps, fingerprint, device, config, backend and environment equal the previous schedule's (a loop
        calling set_timesteps before each batch), the per-schedule caches are kept: tables, validation, plans,
        lanes, history buffers. That is what a second loop over the same schedule would use anyway."""
        integer = np.issubdtype(timesteps.dtype, np.integer)
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(
            dtype=torch.int64 if integer else torch.float32, device=device
        )
        self._timestep_values = timesteps
        env = ops.environment()  # FASTDIFF_BACKEND and TRITON_INTERPRET, read once per schedule
        config = self.__dict__.get("_internal_dict")
        key = None
        if fingerprint is not None:
            key = (fingerprint, timesteps.dtype.str, timesteps.tobytes(), self.timesteps.device, env, self.backend)
        last = self.__dict__.get("_schedule_key")
        if key is None or last is None or last[1] is not config or last[0] != key:
            values = timesteps.tolist()
            # value -> first index (later entries of the reversed walk overwrite: the smallest index wins)
            self._index_of = dict(zip(reversed(values), range(len(values) - 1, -1, -1)))
            self._tables = {}
            self._device_cache = {}
        self._schedule_key = (key, config)
        self._env = env
        self._reset_loop_state()

    def _check_ready(self) -> None:
        """diffusers' error for a ``step`` of a scheduler that needs ``set_timesteps`` first."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )

    def _timestep_value(self, timestep):
        """A Python number for ``timestep``: an element of ``self.timesteps`` is read from the host copy (no
        device sync); another tensor costs one host read (a sync for a CUDA tensor)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"`timestep` must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
            i = self._element_index(timestep)
            return self._timestep_values[i].item() if i is not None else timestep.item()
        return timestep.item() if isinstance(timestep, np.generic) else timestep

    def _element_index(self, timestep: torch.Tensor) -> Optional[int]:
        """The index of ``timestep`` when it is a view of an element of ``self.timesteps`` (how pipelines
        iterate), found from its storage offset without reading the device."""
        ts = self.timesteps
        if timestep._base is ts:  # the common case, checked first: ~0.1 us against ~3 us for the storage test
            i = timestep.storage_offset() - ts.storage_offset()
            return i if 0 <= i < len(ts) else None
        if (
            timestep.device == ts.device
            and timestep.dtype == ts.dtype
            and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()
        ):
            i = timestep.storage_offset() - ts.storage_offset()
            if 0 <= i < len(ts):
                return i
        return None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> Optional[int]:
        """Index of ``timestep`` in ``self.timesteps`` (the first match), or None when it is not in the schedule.
        No device sync when ``timestep`` is an element of ``self.timesteps`` itself."""
        if schedule_timesteps is not None:
            values = np.asarray(torch.as_tensor(schedule_timesteps).cpu())
            matches = np.flatnonzero(values == self._timestep_value(timestep))
            return int(matches[0]) if len(matches) else None
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
            i = self._element_index(timestep)
            if i is not None:
                return i
        value = self._timestep_value(timestep)
        if isinstance(value, float) and value.is_integer() and self.timesteps.dtype == torch.int64:
            value = int(value)
        return self._index_of.get(value)

    def _schedule_error(self, value) -> ValueError:
        shown = self._timestep_values.tolist()
        shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-6:]
        return ValueError(f"`timestep`={value!r} is not in the schedule; expected one of scheduler.timesteps {shown}")

    def _reset_loop_state(self) -> None:
        """Forget per-loop Python state (step counters, multistep history) without touching the device tables."""

    # ------------------------------------------------------------------ device-side tables

    def _device_table(self, key, device) -> torch.Tensor:
        """The float32 coefficient table for ``key`` on ``device``, built once per set_timesteps."""
        self._row(key, 0, device)
        return self._tables[(key, torch.device(device))]

    def _row(self, key, row, device) -> tuple:
        """(device row, its values as Python floats) of table ``key`` at ``row`` (an index, or a tuple for a
        table of several rows per step). Every row's view and list are made at the first step of a schedule,
        in two calls, so a step pays one dict lookup."""
        rows = self._device_cache.get(("rows", key, device))
        if rows is None:
            rows = self._device_cache[("rows", key, device)] = self._make_rows(key, device)
        shape, views, values = rows
        k = row if isinstance(row, int) else int(np.ravel_multi_index(row, shape))
        return views[k], values[k]

    def _select(self, device, x_dtype, ins, outs) -> str:
        """``ops.select`` for this scheduler's request, with the environment read at ``set_timesteps``, memoized
        per schedule (the answer depends only on these and the environment)."""
        key = ("select", self.backend, device, x_dtype, tuple(ins), tuple(outs))
        backend = self._device_cache.get(key)
        if backend is None:
            backend = self._device_cache[key] = ops.select(self.backend, device, x_dtype, ins, outs, env=self._env)
        return backend

    def _make_rows(self, key, device) -> tuple:
        """(table shape, row views, row values) of table ``key`` on ``device``. A schedule whose table has the
        same float32 values as an earlier one of this scheduler (a loop calling set_timesteps before each batch)
        gets the earlier device table and views back: no upload, no new views, and the torch backend's programs
        (keyed by row values) carry over."""
        host = self._tables.get((key, None))
        if host is None:
            host = self._tables[(key, None)] = self._coef_table(*key)
        flat = host.reshape(-1, coefs.NCOEF).astype(np.float32)
        memo = self.__dict__.setdefault("_rows_memo", {})
        device = torch.device(device)
        fingerprint = (host.shape, flat.tobytes())
        hit = memo.get((key, device))
        if hit is not None and hit[0] == fingerprint:
            table, rows = hit[1], hit[2]
        else:
            table = to_device(torch.from_numpy(flat.reshape(host.shape)), device)
            # values as tuples: the torch backend keys its programs by them without a per-step copy
            rows = (host.shape[:-1], table.reshape(-1, coefs.NCOEF).unbind(0), [tuple(r) for r in flat.tolist()])
            if len(memo) >= 8:
                memo.clear()
            memo[(key, device)] = (fingerprint, table, rows)
        self._tables[(key, device)] = table
        return rows

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
            lambda: to_device(torch.tensor([float(value)], dtype=torch.float32), device),
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

    # ------------------------------------------------------------------ the step skeleton

    def _step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        opts: dict,
        *,
        generator=None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """What every ``step`` does: validate, locate the step, plan it (the sampler's hook), draw its noise,
        then one fused call on the backend ``ops.select`` picks, or the sampler's reference step."""
        vkey = None
        if type(model_output) is torch.Tensor and type(sample) is torch.Tensor:
            # the checks depend on these alone: passed once per schedule, a loop's later steps look them up
            vkey = (
                "valid",
                model_output.shape,
                sample.shape,
                model_output.dtype,
                sample.dtype,
                model_output.device,
                sample.device,
                guidance_scale is None,
            )
            batch = self._device_cache.get(vkey)
            if batch is None:
                batch = self._device_cache[vkey] = self._validate_step(model_output, sample, guidance_scale)
        else:
            batch = self._validate_step(model_output, sample, guidance_scale)
        if noise_seed is not None:  # at every step, also one that draws no noise: a bad seed must not pass silently
            check_noise_seed(noise_seed, batch)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either `generator` or `variance_noise`, not both")
        i = self._locate(timestep)
        lkey = None
        if (
            vkey is not None
            and self._plain_plans
            and guidance_scale is None
            and noise_seed is None
            and variance_noise is None
            and sample.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and sample.is_contiguous()
            and model_output.is_contiguous()
        ):
            lkey = _lane_key(i, vkey, self.backend, opts)
            lane = self._device_cache.get(lkey) if lkey is not None else None
            if lane is not None:  # this step ran before with the same row and call shape: straight to its program
                plan, run = lane
                noise = None
                if plan.noise_dtype is not None:
                    noise = self._draw_noise(
                        sample.shape, generator, sample.device, plan.noise_dtype, None, None, batch, plan.offset
                    )[0]
                prev, x0 = run(sample, model_output, noise)
                self.last_backend = "torch"
                self._advance(plan)
                return self._output(prev, x0, return_dict)
        plan = self._plan(i, timestep, model_output, sample, opts)
        device = sample.device
        noise = seed = offset = None
        if plan.noise_dtype is not None:
            noise, seed, offset = self._draw_noise(
                sample.shape, generator, device, plan.noise_dtype, noise_seed, variance_noise, batch, plan.offset
            )
        m = plan.model_output if plan.model_output is not None else model_output
        out_dtype = plan.out_dtype or torch.result_type(sample, m)
        x0_dtype = plan.x0_dtype or out_dtype
        ins = [t.dtype for t in (m, noise, plan.var, *plan.hist, plan.last) if t is not None]
        outs = (
            [out_dtype]
            + ([x0_dtype] if plan.write_x0 else [])
            + ([plan.corr_out.dtype] if plan.corr_out is not None else [])
        )
        backend = "reference" if plan.reference_only else self._select(device, sample.dtype, ins, outs)
        if backend == "reference":
            if seed is not None:
                noise = self._philox_noise(seed, offset, sample, plan.noise_dtype)
            m = self._reference_guided(m, guidance_scale, guidance_rescale)
            prev, x0 = self._reference_step(plan, m, sample, noise, opts)
        else:
            coef, values = (plan.coef, None) if plan.coef is not None else self._row(plan.table_key, plan.row, device)
            guidance = mscale = None
            if guidance_scale is not None:
                guidance, mscale = self._guidance_args(m, guidance_scale, guidance_rescale, device)
            p = ops.StepParams(
                sample,
                m,
                coef,
                prev=_empty_like(sample, out_dtype),
                x0=(plan.x0_out if plan.x0_out is not None else _empty_like(sample, x0_dtype))
                if plan.write_x0
                else None,
                noise=noise,
                seed=seed,
                offset=offset,
                guidance=guidance,
                mscale=mscale,
                var=plan.var,
                hist=plan.hist,
                last=plan.last,
                corr=plan.corr_out,
                clip_range=plan.clip_range,
                var_mode=plan.var_mode,
                coef_values=values,
            )
            if plan.thresholding:
                p.thresh = self._threshold(p, backend)
                p.clip_range = 0.0
            ops.fused_step(p, backend)
            prev, x0 = p.prev, p.x0
        self.last_backend = backend
        if lkey is not None and backend == "torch" and _is_plain(plan, model_output):
            lane = ops.plain_lane(  # values: the host row the fused call above was given
                values, plan.noise_dtype is not None, plan.clip_range, plan.write_x0, out_dtype, x0_dtype
            )
            self._device_cache[lkey] = (dataclasses.replace(plan, model_output=None), lane)
        self._advance(plan)
        return self._output(prev, x0, return_dict)

    def _output(self, prev, x0, return_dict: bool):
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # hooks a sampler defines (see docs/adding-a-sampler.md)

    def _locate(self, timestep) -> Optional[int]:
        """The schedule index of this step: by value here (no sync for an element of ``self.timesteps``);
        sigma-space samplers count steps instead. None for a timestep outside the schedule that the sampler
        handles itself (DDIM)."""
        i = self.index_for_timestep(timestep)
        if i is None:
            raise self._schedule_error(self._timestep_value(timestep))
        return i

    def _plan(self, i, timestep, model_output, sample, opts: dict) -> StepPlan:
        """This step's row, noise, history and outputs."""
        raise NotImplementedError

    def _reference_step(self, plan: StepPlan, model_output, sample, noise, opts: dict) -> tuple:
        """(prev_sample, pred_original_sample) of the reference implementation, op by op like diffusers."""
        raise NotImplementedError

    def _coef_table(self, *key) -> np.ndarray:
        """(steps, ..., NCOEF) float64 rows for the current schedule (``fastdiff.coefs``)."""
        raise NotImplementedError

    def _advance(self, plan: StepPlan) -> None:
        """Move the per-loop state past this step (a step counter, the multistep history)."""

    def draws_noise(self, step_kwargs: Optional[dict] = None) -> bool:
        """Whether a loop calling ``step(..., **step_kwargs)`` draws Gaussian noise in some step (so a
        ``generator`` is consumed during the loop, not only for the starting noise)."""
        return False

    # ------------------------------------------------------------------ pieces of the skeleton

    def _threshold(self, p: ops.StepParams, backend: str) -> torch.Tensor:
        """Dynamic thresholding needs the per-sample quantile of |x0| before the step: a pass writing only a
        float32 x0 (every backend runs that exactly), then torch.quantile. Returns the (B,) bounds."""
        raw = torch.empty(p.sample.shape, dtype=torch.float32, device=p.sample.device)
        ops.fused_step(
            dataclasses.replace(p, prev=None, x0=raw, corr=None, last=None, hist=(), clip_range=0.0), backend
        )
        ratio, max_value = self.config.dynamic_thresholding_ratio, self.config.sample_max_value
        thresh = torch.quantile(raw.reshape(raw.shape[0], -1).abs(), ratio, dim=1)
        return thresh.clamp(min=1, max=max_value).contiguous()

    def _validate_step(self, model_output, sample, guidance_scale):
        """Check the step's tensors (types, devices, shapes; a doubled batch under guidance, doubled channels
        for a learned variance). Returns the number of samples the step produces."""
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
        batch = guidance_batch(model_output, guidance_scale)
        shape = tuple(sample.shape)
        lead = (shape[0] * (2 if guidance_scale is not None else 1),)
        expected = [lead + ((shape[1] * f,) + shape[2:] if len(shape) >= 2 else ()) for f in self._channel_factors()]
        if tuple(model_output.shape) not in expected:
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)}; expected {' or '.join(map(str, expected))} "
                f"for `sample` of shape {shape}"
                + (" under classifier-free guidance" if guidance_scale is not None else "")
            )
        return batch

    def _channel_factors(self) -> tuple:
        """How many times the sample's channels the model output may have (2 with a learned variance)."""
        return (1,)

    def _draw_noise(self, shape, generator, device, dtype, noise_seed, variance_noise, batch, offset: int):
        """Returns (noise tensor or None, seed tensor or None, offset tensor or None)."""
        if variance_noise is not None:
            if tuple(variance_noise.shape) != tuple(shape):
                raise ValueError(f"`variance_noise` has shape {tuple(variance_noise.shape)}; expected {tuple(shape)}")
            return variance_noise.to(device), None, None
        if noise_seed is not None:
            if generator is not None:
                raise ValueError("pass either `generator` or `noise_seed`, not both")
            return None, self._seed_tensor(noise_seed, batch, device), self._offset_tensor(offset, device)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype), None, None

    @staticmethod
    def _philox_noise(seed, offset, sample, dtype):
        """The Philox normals the kernels draw for ``seed`` at step ``offset``, for the reference step."""
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

    # ------------------------------------------------------------------ forward noising

    def _add_noise(self, x, noise, index: torch.Tensor, noise_seed, table_key, make_table, reference_fn):
        """Forward noising through ``ops.add_noise``: (P, Q) rows from ``make_table()`` (float32 (n, 2) on
        x's device, cached per ``table_key``) gathered at ``index`` (1 or B int64 indices); the reference
        backend calls ``reference_fn(x, noise, index)``."""
        if noise is None and noise_seed is None:
            raise ValueError("`noise` is required (or pass `noise_seed` for in-kernel Philox noise)")
        if noise is not None:
            if tuple(noise.shape) != tuple(x.shape):
                raise ValueError(
                    f"`noise` has shape {tuple(noise.shape)}; expected {tuple(x.shape)} like original_samples"
                )
            if noise.device != x.device:
                raise ValueError(f"`noise` is on {noise.device}; expected {x.device} like original_samples")
        ins = [noise.dtype] if noise is not None else []
        backend = self.last_backend = ops.select(self.backend, x.device, x.dtype, ins, [x.dtype])
        if backend == "reference":
            if noise is None:
                noise = self._add_noise_philox(x, noise_seed)
            return reference_fn(x, noise, index)
        seed = self._seed_tensor(noise_seed, x.shape[0], x.device) if noise is None else None
        offset = self._offset_tensor(0, x.device) if noise is None else None
        table = self._cached(("add_noise", table_key, x.device), make_table)
        return ops.add_noise(x, table, index.to(x.device), backend=backend, noise=noise, seed=seed, offset=offset)


@dataclass
class StepPlan:
    """What a sampler's ``_plan`` hook says about one step; the skeleton does the rest.

    table_key/row: the coefficient row is ``_coef_table(*table_key)[row]`` (or ``coef``, a ready row for a
    step off the schedule). noise_dtype: the dtype this step's Gaussian noise is drawn in (None: no noise);
    offset: its Philox step offset. model_output/var/var_mode: the part of the model output the step reads
    as m and a learned variance. hist/x0_out: earlier converted outputs read (up to three), and where this
    step's goes. last/corr_out: the previous step's starting sample, which turns on the corrector row
    (``coefs.L_*``), and where the corrected sample goes.
    out_dtype/x0_dtype: output dtypes (default: the promoted type of sample and model output).
    reference_only: a configuration the coefficient row cannot express, run by the reference step (say why).
    state: whatever the sampler's ``_reference_step`` and ``_advance`` need (timesteps, sigmas, order)."""

    i: Optional[int]
    table_key: tuple = ()
    row: Any = None
    coef: Optional[torch.Tensor] = None
    noise_dtype: Optional[torch.dtype] = None
    offset: int = 0
    model_output: Optional[torch.Tensor] = None
    var: Optional[torch.Tensor] = None
    var_mode: int = VarMode.FIXED
    hist: tuple = ()
    x0_out: Optional[torch.Tensor] = None
    last: Optional[torch.Tensor] = None
    corr_out: Optional[torch.Tensor] = None
    write_x0: bool = True
    out_dtype: Optional[torch.dtype] = None
    x0_dtype: Optional[torch.dtype] = None
    clip_range: float = 0.0
    thresholding: bool = False
    reference_only: bool = False
    state: dict = field(default_factory=dict)


_LANE_OPTION_TYPES = (type(None), bool, int, float, str)


def _lane_key(i, vkey: tuple, backend, opts: dict) -> Optional[tuple]:
    """The lane of step ``i`` for these tensors (``vkey``) and options; None when an option is not a plain value
    (a tensor option, e.g. per-token timesteps, is never keyed)."""
    values = tuple(opts.values())
    for v in values:
        if type(v) not in _LANE_OPTION_TYPES:
            return None
    return ("lane", i, vkey, backend, values)


def _is_plain(plan: StepPlan, model_output: torch.Tensor) -> bool:
    """A plan the lane runs: the fused row of the table, the model output as it came, noise at most from a
    generator, and no tensors of its own."""
    return (
        plan.coef is None
        and plan.i is not None
        and (plan.model_output is None or plan.model_output is model_output)
        and plan.var is None
        and not plan.hist
        and plan.x0_out is None
        and plan.last is None
        and plan.corr_out is None
        and not plan.thresholding
        and not plan.reference_only
    )


def _empty_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous output like ``t`` (``torch.empty_like`` costs ~3 us here, ``torch.empty(shape)`` ~8 us)."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def check_noise_seed(noise_seed, batch: int) -> None:
    """``noise_seed``: an int (seeds noise_seed .. noise_seed + B - 1), B ints, or an integer tensor of B seeds."""
    if isinstance(noise_seed, torch.Tensor):
        ints, count = noise_seed.dtype in (torch.int64, torch.int32), noise_seed.numel()
        shown = f"a {noise_seed.dtype} tensor of {count} elements"
    elif isinstance(noise_seed, (list, tuple)):
        ints, count, shown = all(type(s) is int for s in noise_seed), len(noise_seed), repr(noise_seed)
    else:
        ints, count, shown = type(noise_seed) is int, batch, repr(noise_seed)
    expected = f"an int, a list of {batch} ints or an int64 tensor of {batch} seeds (one per sample)"
    if not ints:
        raise TypeError(f"`noise_seed` must be {expected}, got {shown}")
    if count != batch:
        raise ValueError(f"`noise_seed` must give one seed per sample: batch is {batch}, got {shown}")


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait: a copy from pinned memory is asynchronous, where one
    from ordinary (pageable) memory blocks until the GPU has finished everything queued before it, a host
    sync at the first step after each ``set_timesteps``."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


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
