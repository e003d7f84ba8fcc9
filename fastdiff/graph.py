"""``GraphSampler``: the whole sampling loop (model call, guidance combine, step, for every step)
captured once as one CUDA graph and replayed per call.

Discipline (after gpt-fast): static input and output buffers allocated once; new seeds, latents,
conditioning and guidance scale are copied into them in place; warm-up on a side stream; a private
memory pool per sampler; capture time and graph memory reported apart from replay time. Before
capture, one warm-up pass runs with ``torch.cuda.set_sync_debug_mode("error")`` so a model that
synchronizes with the host (``.item()``, ``.cpu()``, a branch on a device value) is caught with a clear
error instead of a failed capture.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from .loop import (
    adapter_for,
    as_fastdiff_scheduler,
    check_device,
    check_dtype,
    check_finite_latents,
    check_guidance,
    check_model_call,
    check_model_kwargs,
    check_shape,
    check_step_kwargs,
    check_steps,
    denoise,
    doubled_kwargs,
    initial_noise,
    model_device,
    nonfinite_counts,
    raise_if_nonfinite,
    schedule_key,
    set_schedule,
)
from .noise import as_seed_tensor

logger = logging.getLogger("fastdiff")


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """One warm-up stream per device: libraries (cuBLAS, cuDNN) keep a workspace per stream for the life of
    the process, so a new stream per capture would grow memory with every capture."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _structure(kwargs) -> tuple:
    """What a captured graph depends on in the conditioning: its nesting (SDXL's ``added_cond_kwargs`` is a
    dict of tensors), each tensor's shape, dtype and device, and every other value. Tensor values do not
    matter: they are copied into the static buffers per call."""
    leaves, spec = tree_flatten(kwargs)
    return (
        str(spec),
        tuple(
            (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else (type(v).__name__, repr(v))
            for v in leaves
        ),
    )


class GraphCaptureError(RuntimeError):
    """The model (or its inputs) cannot be captured into a CUDA graph; the message says why."""


@dataclass
class _Static:
    """What a captured loop reads: static input buffers and the graph's own scheduler copy (its device tables
    must outlive the capture, unchanged). Per call, new inputs are copied into these tensors in place."""

    scheduler: object
    latents: torch.Tensor  # starting noise (used when the caller brings latents)
    use_latents: torch.Tensor  # () float: 1 -> take `latents`, 0 -> draw from `seeds`
    seeds: torch.Tensor  # (B,) int64 per-sample seeds
    guidance: Optional[torch.Tensor]  # (1,) float32
    kwargs: dict  # conditioning (the doubled batch under guidance)
    shape: tuple
    dtype: torch.dtype
    nonfinite: Optional[torch.Tensor] = None  # (steps, 4) int64 NaN/inf counts per step under check_finite


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    static: _Static
    out: torch.Tensor
    capture_seconds: float
    graph_bytes: int  # growth of the sampler's private pool during this capture (graphs share the pool)
    static_bytes: int  # the static input buffers and the output
    replays: int = 0


class GraphSampler:
    """Sample with the whole loop as one CUDA graph.

    ``GraphSampler(model, scheduler, shape, dtype=torch.float16, num_inference_steps=50,
    guidance_scale=None)``, then ``sampler(seed=0)`` / ``sampler(latents=x)`` /
    ``sampler(model_kwargs=..., uncond_kwargs=..., guidance_scale=7.5)`` returns the final sample.

    The first call for a (shape, dtype, steps, guided?, conditioning shapes) key captures a graph
    (``stats``: ``capture_seconds`` including warm-up, ``graph_bytes`` by which the capture grew the
    sampler's private memory pool (later graphs of one sampler reuse it, so theirs can be small),
    ``static_bytes`` of its static input buffers and output); later calls copy the new inputs into the
    static buffers and replay. The guidance scale lives in a device scalar, so changing it does not
    recapture. Noise is Philox, drawn in the kernels from per-sample seeds, so each replay with a new
    seed draws fresh noise. ``fallback="eager"`` runs the eager loop with a warning when the model
    cannot be captured; the default ``"error"`` raises :class:`GraphCaptureError`. ``adapter`` says how the
    model is called (SD3, Flux and Wan transformers are recognised by class; see ``fastdiff.sample``), and
    ``schedule_kwargs`` go to ``scheduler.set_timesteps`` (custom ``sigmas``, Flux's ``mu``).
    ``release()`` frees the graphs, their memory pool and the static buffers.

    Needs a CUDA GPU (the model's device, or ``device``); ``shape`` and ``dtype`` follow ``fastdiff.sample``'s
    rules, checked at construction. ``check_finite=True``: the captured loop also counts NaN/inf in every step's
    model output and result into a device buffer, read once after each replay; a non-finite step raises
    ``FloatingPointError`` naming the first one.
    """

    def __init__(
        self,
        model,
        scheduler,
        shape,
        dtype: torch.dtype = torch.float16,
        num_inference_steps: int = 50,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        step_kwargs: Optional[dict] = None,
        fallback: str = "error",
        device=None,
        max_graphs: int = 4,
        warmup: int = 1,
        backend: Optional[str] = None,
        adapter=None,
        schedule_kwargs: Optional[dict] = None,
        check_finite: bool = False,
    ):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"`max_graphs` must be an int >= 1, got {max_graphs!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"`warmup` must be an int >= 0, got {warmup!r}")
        if fallback not in ("error", "eager"):
            raise ValueError(f"`fallback` must be 'error' or 'eager', got {fallback!r}")
        if check_finite not in (True, False):
            raise TypeError(f"`check_finite` must be True or False, got {check_finite!r}")
        if not callable(model):
            raise TypeError(f"`model` must be callable as model(x, t, **kwargs), got {type(model).__name__}")
        check_guidance(guidance_scale, guidance_rescale)
        self.adapter = adapter_for(model, adapter)
        self.schedule_kwargs = dict(schedule_kwargs or {})
        self.model = model
        self.scheduler = as_fastdiff_scheduler(scheduler, backend)
        self.shape = check_shape(shape)
        self.dtype = check_dtype(dtype)
        self.num_inference_steps = check_steps(num_inference_steps)
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.step_kwargs = check_step_kwargs(step_kwargs, self.scheduler)
        self.fallback = fallback
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.check_finite = check_finite
        if device is not None:
            self.device = check_device(device)
        else:
            self.device = model_device(model, "cuda")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"GraphSampler captures the loop as a CUDA graph and needs a CUDA GPU; `model` "
                    f"({type(model).__name__}) has no parameters, so its device defaulted to cuda, and this torch "
                    f"sees no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is False). On a CPU, "
                    "run the loop eagerly with fastdiff.sample(model, scheduler, shape=...)"
                )
        self._graphs: dict = {}
        self._pool = None
        self._eager_reason: Optional[str] = None
        self.stats: dict = {}

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def __call__(
        self,
        seed=None,
        *,
        latents=None,
        model_kwargs=None,
        uncond_kwargs=None,
        guidance_scale=None,
        shape=None,
        dtype=None,
        num_inference_steps=None,
    ) -> torch.Tensor:
        """Run the loop for new seeds or latents (and new conditioning / guidance scale): replays the graph
        captured for this key, capturing it first if needed. Returns a new tensor (B, C, ...)."""
        if latents is not None and not (isinstance(latents, torch.Tensor) and latents.is_floating_point()):
            shown = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise TypeError(f"`latents` must be a floating-point tensor (the starting noise), got {shown}")
        if latents is not None:
            shape = check_shape(tuple(latents.shape), "latents")
        else:
            shape = self.shape if shape is None else check_shape(shape)
        dtype = check_dtype(dtype or (latents.dtype if latents is not None else self.dtype))
        steps = self.num_inference_steps if num_inference_steps is None else check_steps(num_inference_steps)
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance(g, self.guidance_rescale)
        if seed is None and latents is None:
            raise ValueError("pass `seed` (Philox noise) or `latents` (the starting noise)")
        if g is not None and (model_kwargs is None or uncond_kwargs is None):
            raise ValueError("guidance needs `model_kwargs` and `uncond_kwargs`")
        if g is None and uncond_kwargs is not None:
            raise ValueError("`uncond_kwargs` is only used with a guidance scale")
        check_model_kwargs(model_kwargs, "model_kwargs")
        check_model_kwargs(uncond_kwargs, "uncond_kwargs")
        if self.device.type != "cuda":
            raise ValueError(
                f"GraphSampler needs a CUDA model, the model is on {self.device}; on a CPU, run the loop eagerly "
                "with fastdiff.sample(model, scheduler, shape=...)"
            )
        check_model_call(self.adapter, self.model, shape, dict(model_kwargs or {}))
        if self.check_finite and latents is not None:
            check_finite_latents(latents)
        call_kwargs = (
            doubled_kwargs(dict(uncond_kwargs), dict(model_kwargs), shape[0], self.adapter.shared)
            if g is not None
            else dict(model_kwargs or {})
        )
        call_kwargs = tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, call_kwargs)
        seeds = as_seed_tensor(seed if seed is not None else 0, shape[0], self.device)
        if latents is not None:
            latents = latents.to(device=self.device, dtype=dtype)
        if self._eager_reason is not None:
            return self._eager(shape, dtype, steps, g, call_kwargs, seeds, latents)
        key = (shape, dtype, steps, g is not None, _structure(call_kwargs), schedule_key(self.schedule_kwargs))
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, shape, dtype, steps, g, call_kwargs)
            except GraphCaptureError as exc:
                if self.fallback == "error":
                    raise
                warnings.warn(f"fastdiff: running the eager loop instead of a CUDA graph: {exc}", stacklevel=2)
                self._eager_reason = str(exc)
                return self._eager(shape, dtype, steps, g, call_kwargs, seeds, latents)
        self._load(entry.static, seeds, latents, g, call_kwargs)
        entry.graph.replay()
        entry.replays += 1
        if entry.static.nonfinite is not None:
            raise_if_nonfinite(entry.static.nonfinite, entry.static.scheduler)
        return entry.out.clone()

    def release(self) -> None:
        """Free every captured graph, the private memory pool and the static buffers."""
        self._graphs.clear()
        self._pool = None
        self._eager_reason = None  # a later call tries the capture again
        self.stats = {}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    # ------------------------------------------------------------------ internals

    def _static_inputs(self, shape, dtype, steps, g, call_kwargs) -> _Static:
        """Allocate the static buffers and this graph's scheduler copy, with its timesteps set."""
        dev = self.device
        sched = copy.deepcopy(self.scheduler)
        set_schedule(sched, steps, dev, self.schedule_kwargs)
        return _Static(
            scheduler=sched,
            latents=torch.zeros(shape, device=dev, dtype=dtype),
            use_latents=torch.zeros((), device=dev),
            seeds=torch.zeros(shape[0], dtype=torch.int64, device=dev),
            guidance=torch.tensor([float(g)], device=dev) if g is not None else None,
            kwargs=tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, call_kwargs),
            shape=tuple(shape),
            dtype=dtype,
            nonfinite=nonfinite_counts(len(sched.timesteps), dev) if self.check_finite else None,
        )

    def _run(self, st: _Static) -> torch.Tensor:
        """The captured program: starting noise, then every step. Reads only the static buffers and the
        scheduler copy's device tables (built by the first, uncaptured run)."""
        sched = st.scheduler
        sched._reset_loop_state()
        drawn = initial_noise(st.shape, st.dtype, self.device, seeds=st.seeds, backend=sched.backend)
        x = torch.where(st.use_latents > 0, st.latents, drawn) * sched.init_noise_sigma
        return denoise(
            self.model,
            sched,
            x,
            guidance_scale=st.guidance,
            guidance_rescale=self.guidance_rescale,
            cond_kwargs=st.kwargs,
            noise_seed=st.seeds,
            step_kwargs=self.step_kwargs,
            adapter=self.adapter,
            nonfinite=st.nonfinite,
        )

    @staticmethod
    def _load(st: _Static, seeds, latents, g, call_kwargs) -> None:
        """Copy this call's inputs into the static buffers (in place: the graph reads these addresses)."""
        st.seeds.copy_(seeds, non_blocking=True)
        if latents is not None:
            st.latents.copy_(latents)
            st.use_latents.fill_(1.0)
        else:
            st.use_latents.fill_(0.0)
        if st.guidance is not None:
            st.guidance.fill_(float(g))
        for dst, src in zip(tree_leaves(st.kwargs), tree_leaves(call_kwargs)):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)

    def _capture(self, key, shape, dtype, steps, g, call_kwargs) -> _Entry:
        dev = self.device
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        st = self._static_inputs(shape, dtype, steps, g, call_kwargs)

        # warm-up and capture on one side stream: libraries keep per-stream workspaces (cuBLAS), which a
        # capture on yet another stream would allocate inside this sampler's private pool for good
        side = _side_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._run(st)  # first pass: compiles kernels, fills the scheduler copy's device caches
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(max(self.warmup, 1)):
                    self._run(st)
            except RuntimeError as exc:
                if "synchroniz" in str(exc):
                    raise GraphCaptureError(
                        "the model synchronizes with the host during a step (a .item(), .cpu(), .tolist(), "
                        "print of a CUDA tensor, or a Python branch on a device value): a CUDA graph cannot "
                        f"contain that. The first such call raised: {exc}"
                    ) from exc
                raise
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph empties the cache on entry; empty it first so that the growth of reserved memory
        # across the capture is this graph's share of the private pool
        torch.cuda.empty_cache()
        reserved0 = torch.cuda.memory_reserved(dev)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                out = self._run(st)
        except RuntimeError as exc:
            raise GraphCaptureError(f"CUDA graph capture failed: {exc}") from exc
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        entry = _Entry(
            graph,
            st,
            out,
            seconds,
            graph_bytes=torch.cuda.memory_reserved(dev) - reserved0,
            static_bytes=sum(
                t.nbytes
                for t in (st.latents, st.use_latents, st.seeds, st.guidance, st.nonfinite, out, *tree_leaves(st.kwargs))
                if isinstance(t, torch.Tensor)
            ),
        )
        while len(self._graphs) >= self.max_graphs:  # evict the oldest only once the new graph exists
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = entry
        self.stats = dict(
            capture_seconds=seconds,
            graph_bytes=entry.graph_bytes,
            static_bytes=entry.static_bytes,
            graphs=len(self._graphs),
        )
        logger.info(
            "fastdiff: captured %d-step loop for %s %s in %.2f s (%.1f MB reserved for the graph, %.1f MB of "
            "static buffers)",
            steps,
            shape,
            dtype,
            seconds,
            entry.graph_bytes / 2**20,
            entry.static_bytes / 2**20,
        )
        return entry

    def _eager(self, shape, dtype, steps, g, call_kwargs, seeds, latents):
        sched = self.scheduler
        set_schedule(sched, steps, self.device, self.schedule_kwargs)
        if latents is None:
            latents = initial_noise(shape, dtype, self.device, seeds=seeds, backend=sched.backend)
        x = latents * sched.init_noise_sigma
        counts = nonfinite_counts(len(sched.timesteps), self.device) if self.check_finite else None
        out = denoise(
            self.model,
            sched,
            x,
            guidance_scale=g,
            guidance_rescale=self.guidance_rescale,
            cond_kwargs=call_kwargs,
            noise_seed=seeds,
            step_kwargs=self.step_kwargs,
            adapter=self.adapter,
            nonfinite=counts,
        )
        if counts is not None:
            raise_if_nonfinite(counts, sched)
        return out


__all__ = ["GraphSampler", "GraphCaptureError"]
