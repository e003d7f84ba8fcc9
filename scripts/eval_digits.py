#!/usr/bin/env python
"""Sample the embedded digits model with a pluggable scheduler and judge the samples.

A plain hand-written sampling loop (``sample``) drives any scheduler with the diffusers interface
(``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``). By default the
schedulers are diffusers' own ``DDPMScheduler`` / ``DDIMScheduler`` configured from
``fastdiff.models.digits.SCHEDULER_CONFIG``; ``--fastdiff`` swaps in fastdiff's drop-in schedulers.
Samples are scored with ``fastdiff.quality.judge`` (needs scikit-learn).

``--model digits-flow`` evaluates the flow-matching model instead, with ``--sampler euler-torch`` (a plain-torch
Euler flow sampler written here, on the same sigma schedule as diffusers' ``FlowMatchEulerDiscreteScheduler``),
``flow-euler`` (``FlowMatchEulerDiscreteScheduler``) or ``unipc`` (``UniPCMultistepScheduler`` in flow mode,
``--order``), each with ``--shift``.

Examples::

    python scripts/eval_digits.py --sampler ddim --steps 50 -n 200
    python scripts/eval_digits.py --sampler ddpm --steps 1000 -n 200
    python scripts/eval_digits.py --sampler ddim --steps 50 --guidance 2.5      # labels 0..9 cycled
    python scripts/eval_digits.py --preset card                                  # the MODEL_CARD figures
    python scripts/eval_digits.py --model digits-flow --sampler flow-euler --steps 20
    python scripts/eval_digits.py --model digits-flow --preset flow-card         # the digits-flow figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastdiff.models.digits import (  # noqa: E402
    CHANNELS,
    FLOW_MODE_OVERRIDES,
    FLOW_SCHEDULER_CONFIG,
    FLOW_SHIFT,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    load_default_model,
    load_flow_model,
    to_unit_range,
)

EPS_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler-torch", "flow-euler", "unipc")


def make_scheduler(sampler: str, backend: str = "diffusers", timestep_spacing: str = "trailing"):
    """A DDPM or DDIM scheduler from ``SCHEDULER_CONFIG``; ``backend`` is "diffusers" or "fastdiff"."""
    if backend == "diffusers":
        from diffusers import DDIMScheduler, DDPMScheduler
    elif backend == "fastdiff":
        from fastdiff import DDIMScheduler, DDPMScheduler
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if sampler == "ddpm":
        return DDPMScheduler(**SCHEDULER_CONFIG)
    if sampler == "ddim":
        return DDIMScheduler(**SCHEDULER_CONFIG, timestep_spacing=timestep_spacing)
    raise ValueError(f"unknown sampler {sampler!r}")


def make_flow_scheduler(sampler: str, backend: str = "diffusers", shift: float = FLOW_SHIFT, order: int = 2):
    """FlowMatchEuler (``sampler="flow-euler"``) or UniPC in flow mode (``"unipc"``, ``solver_order=order``) for the
    flow model, from ``FLOW_SCHEDULER_CONFIG`` / ``FLOW_MODE_OVERRIDES`` with ``shift``; ``backend`` is "diffusers"
    or "fastdiff"."""
    if backend not in ("diffusers", "fastdiff"):
        raise ValueError(f"backend must be 'diffusers' or 'fastdiff', got {backend!r}")
    name = {"flow-euler": "FlowMatchEulerDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}.get(sampler)
    if name is None:
        raise ValueError(f"sampler must be 'flow-euler' or 'unipc' for a scheduler, got {sampler!r}")
    module = __import__(backend)
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"{backend} has no {name}")
    if sampler == "flow-euler":
        return cls.from_config({**FLOW_SCHEDULER_CONFIG, "shift": shift})
    overrides = {**FLOW_MODE_OVERRIDES[name], "flow_shift": shift}
    num_train_timesteps = FLOW_SCHEDULER_CONFIG["num_train_timesteps"]
    return cls(num_train_timesteps=num_train_timesteps, **overrides, solver_order=order)


def flow_sigmas(steps: int, shift: float = FLOW_SHIFT, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(steps + 1,) fp32 sigmas from 1 to 0: diffusers' ``FlowMatchEulerDiscreteScheduler`` schedule (linspace of
    the timesteps from ``T`` to ``T * shifted(1 / T)``, divided by ``T``, shifted ``s -> shift s / (1 + (shift - 1)
    s)``, then 0), in float64 and rounded once."""

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    t = num_train_timesteps
    sigmas = shifted(torch.linspace(1.0, shifted(1.0 / t), steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@torch.no_grad()
def sample_flow_euler(
    model,
    n: int,
    steps: int,
    *,
    shift: float = FLOW_SHIFT,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Euler on the flow ODE, in plain torch: ``x <- x + (sigma_next - sigma) v(x, 1000 sigma)`` from pure noise at
    sigma 1 down to 0 on :func:`flow_sigmas`. Returns ``n`` images in ``[0, 1]``, (n, 1, 16, 16) fp32.

    Same conditioning and noise as :func:`sample` (one generator seeded with ``seed``; guidance
    ``v = v_u + w (v_c - v_u)``), so a deterministic scheduler there gives the same images to rounding.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    sigmas = flow_sigmas(steps, shift).to(device)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=gen, device=device)
        null = torch.full((b,), NULL_CLASS, dtype=torch.long, device=device)
        y = None if labels is None else labels[start : start + b].to(device)
        for i in range(steps):
            t = sigmas[i] * 1000
            if y is None:
                v = model(x, t, null)
            elif guidance_scale == 1.0:
                v = model(x, t, y)
            else:
                v_c, v_u = model(torch.cat([x, x]), t, torch.cat([y, null])).chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        out.append(to_unit_range(x.float()))
    return torch.cat(out)


@torch.no_grad()
def sample(
    model,
    scheduler,
    n: int,
    steps: int,
    *,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    clipped_eps: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Generate ``n`` images in ``[0, 1]``, (n, 1, 16, 16) fp32.

    Unconditional (label ``NULL_CLASS``) when ``labels`` is None; otherwise classifier-free guidance
    ``eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)`` (``guidance_scale=1`` is plain
    conditional sampling and runs one model call per step). The initial noise and the per-step noise
    come from one ``torch.Generator`` seeded with ``seed``; batches are drawn in order from it.

    ``eta`` and ``clipped_eps`` (DDIM's ``use_clipped_model_output``: re-derive ``eps`` from the clipped
    ``x0``) go to ``step`` where the scheduler takes them. With ``clip_sample=True``, DDIM's default
    (``clipped_eps=False``) pairs the clipped ``x0`` with the unclipped ``eps``; under guidance scales
    >= 2 that inconsistency wrecks the samples of this model, while ``clipped_eps=True`` (or DDPM, whose
    posterior mean uses the clipped ``x0``) keeps them clean (see ``MODEL_CARD.md``).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    params = _step_params(scheduler)
    step_kwargs = {"eta": eta} if "eta" in params else {}
    if "generator" in params:  # diffusers' UniPC takes none
        step_kwargs["generator"] = gen
    # diffusers' flow schedulers start from unit noise and have no init_noise_sigma / scale_model_input
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    if clipped_eps:
        if "use_clipped_model_output" not in params:
            raise ValueError(f"{type(scheduler).__name__}.step takes no use_clipped_model_output")
        step_kwargs["use_clipped_model_output"] = True
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=gen, device=device)
        x = x * init_sigma
        null = torch.full((b,), NULL_CLASS, dtype=torch.long, device=device)
        y = None if labels is None else labels[start : start + b].to(device)
        for t in scheduler.timesteps:
            model_in = scale(x, t)
            if y is None:
                eps = model(model_in, t, null)
            elif guidance_scale == 1.0:
                eps = model(model_in, t, y)
            else:
                eps_c, eps_u = model(torch.cat([model_in, model_in]), t, torch.cat([y, null])).chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        out.append(to_unit_range(x.float()))
    return torch.cat(out)


def _step_params(scheduler) -> set:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def run_one(model, args, run: dict) -> tuple[dict, torch.Tensor]:
    """One sampling run, judged. ``run``: sampler, steps, guidance (None: unconditional), and spacing / clipped_eps
    (DDPM, DDIM) or shift / order (the flow samplers)."""
    from fastdiff.quality import judge

    sampler, steps, guidance = run["sampler"], run["steps"], run["guidance"]
    n = args.num_samples
    labels = None if guidance is None else torch.arange(n) % NUM_CLASSES
    common = dict(
        seed=args.seed,
        labels=labels,
        guidance_scale=1.0 if guidance is None else guidance,
        device=args.device,
        batch_size=args.batch_size,
    )
    t0 = time.perf_counter()
    if sampler == "euler-torch":
        images = sample_flow_euler(model, n, steps, shift=run["shift"], **common)
        backend = "torch"
    elif sampler in FLOW_SAMPLERS:
        scheduler = make_flow_scheduler(sampler, args.backend, run["shift"], run.get("order", 2))
        images = sample(model, scheduler, n, steps, **common)
        backend = args.backend
    else:
        scheduler = make_scheduler(sampler, args.backend, run["spacing"])
        images = sample(model, scheduler, n, steps, clipped_eps=run.get("clipped_eps", False), **common)
        backend = args.backend
    seconds = time.perf_counter() - t0
    result = judge(images)
    if labels is not None:
        from fastdiff.quality import predict

        result["label_accuracy"] = float((torch.as_tensor(predict(images)) == labels).float().mean())
    result.update(model=args.model, **run, seed=args.seed, backend=backend, seconds=round(seconds, 2))
    if sampler == "ddpm":
        result["spacing"] = None
    return result, images


def load_model(name: str, weights: Path | None = None, device: str = "cpu"):
    """The shipped ``digits`` or ``digits-flow`` model, or the same network with ``weights``: a safetensors file, or
    a ``train_digits.py --checkpoint`` file (``.pt``), whose EMA weights are taken."""
    if weights is None:
        return (load_flow_model if name == "digits-flow" else load_default_model)(device)
    from fastdiff.models.digits import DEFAULT_CONFIG, FLOW_MODEL_CONFIG, DigitsUNet

    if weights.suffix == ".pt":
        state = torch.load(weights, map_location=device, weights_only=False)["ema"]
    else:
        from safetensors.torch import load_file

        state = load_file(str(weights))
    model = DigitsUNet(**(FLOW_MODEL_CONFIG if name == "digits-flow" else DEFAULT_CONFIG))
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def card_runs(model: str) -> list[dict]:
    """The runs behind the model card's tables (``--preset card`` / ``flow-card``)."""
    if model == "digits-flow":
        euler = dict(sampler="flow-euler", steps=20, shift=FLOW_SHIFT, guidance=None)
        unipc = dict(sampler="unipc", steps=20, shift=FLOW_SHIFT, guidance=None, order=2)
        return [
            euler,
            dict(euler, sampler="euler-torch"),
            *(dict(euler, steps=k) for k in (5, 10, 50, 100)),
            *(dict(unipc, steps=k) for k in (5, 10, 20)),
            dict(unipc, order=3),
            *(dict(euler, guidance=w) for w in (1.0, 1.5, 2.0, 3.0)),
            dict(unipc, guidance=2.0),
        ]
    ddim = dict(sampler="ddim", steps=50, spacing="trailing", guidance=None)
    return [
        dict(sampler="ddpm", steps=1000, spacing="leading", guidance=None),
        ddim,
        dict(ddim, spacing="leading"),
        dict(ddim, clipped_eps=True),
        dict(ddim, guidance=1.5),
        dict(ddim, guidance=2.0),
        dict(ddim, guidance=3.0),
        dict(ddim, guidance=2.0, clipped_eps=True),
        dict(ddim, guidance=3.0, clipped_eps=True),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["digits", "digits-flow"], default="digits")
    p.add_argument("--sampler", choices=[*EPS_SAMPLERS, *FLOW_SAMPLERS], default=None, help="ddim / flow-euler")
    p.add_argument("--steps", type=int, default=None, help="default: 50 for DDIM, 1000 for DDPM, 20 for flow")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default="trailing")
    p.add_argument("--shift", type=float, default=FLOW_SHIFT, help="flow samplers' sigma shift")
    p.add_argument("--order", type=int, default=2, help="UniPC solver_order")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale; labels 0..9 cycled")
    p.add_argument("--clipped-eps", action="store_true", help="DDIM use_clipped_model_output=True")
    p.add_argument("-n", "--num-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", type=Path, default=None, help="other weights than the shipped ones")
    p.add_argument("--fastdiff", dest="backend", action="store_const", const="fastdiff", default="diffusers")
    p.add_argument("--preset", choices=["card", "flow-card"], default=None, help="every MODEL_CARD figure")
    p.add_argument("--save-grid", type=Path, default=None, help="write the samples as a PNG grid")
    p.add_argument("--json", type=Path, default=None, help="append results to this JSON-lines file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flow = args.model == "digits-flow"
    if args.preset is not None and (args.preset == "flow-card") != flow:
        p.error(f"--preset {args.preset} is for --model {'digits-flow' if args.preset == 'flow-card' else 'digits'}")
    sampler = args.sampler or ("flow-euler" if flow else "ddim")
    if (sampler in FLOW_SAMPLERS) != flow:
        p.error(
            f"--sampler {sampler} does not sample --model {args.model}: expected one of "
            f"{FLOW_SAMPLERS if flow else EPS_SAMPLERS}"
        )

    model = load_model(args.model, args.weights, args.device)

    if args.preset is not None:
        runs = card_runs(args.model)
    else:
        steps = args.steps or (20 if flow else 1000 if sampler == "ddpm" else 50)
        run = dict(sampler=sampler, steps=steps, guidance=args.guidance)
        if flow:
            run.update(shift=args.shift, **({"order": args.order} if sampler == "unipc" else {}))
        else:
            run.update(spacing=args.spacing, clipped_eps=args.clipped_eps)
        runs = [run]
    for run in runs:
        result, images = run_one(model, args, run)
        print(json.dumps(result), flush=True)
        if args.json is not None:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        if args.save_grid is not None and len(runs) == 1:
            save_grid(images, args.save_grid)


def save_grid(images: torch.Tensor, path: Path, ncol: int = 20, scale: int = 2) -> None:
    from PIL import Image

    n = images.shape[0]
    nrow = (n + ncol - 1) // ncol
    grid = torch.zeros(nrow * (IMAGE_SIZE + 1), ncol * (IMAGE_SIZE + 1))
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[r * 17 : r * 17 + 16, c * 17 : c * 17 + 16] = images[i, 0]
    arr = (grid * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    main()
