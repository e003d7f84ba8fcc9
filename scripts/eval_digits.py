#!/usr/bin/env python
"""Sample the embedded digits model with a pluggable scheduler and judge the samples.

A plain hand-written sampling loop (``sample``) drives any scheduler with the diffusers interface
(``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``). By default the
schedulers are diffusers' own ``DDPMScheduler`` / ``DDIMScheduler`` configured from
``fastdiff.models.digits.SCHEDULER_CONFIG``; ``--fastdiff`` swaps in fastdiff's drop-in schedulers.
Samples are scored with ``fastdiff.quality.judge`` (needs scikit-learn).

Examples::

    python scripts/eval_digits.py --sampler ddim --steps 50 -n 200
    python scripts/eval_digits.py --sampler ddpm --steps 1000 -n 200
    python scripts/eval_digits.py --sampler ddim --steps 50 --guidance 2.5      # labels 0..9 cycled
    python scripts/eval_digits.py --preset card                                  # the MODEL_CARD figures
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
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    load_default_model,
    to_unit_range,
)


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
    if clipped_eps:
        if "use_clipped_model_output" not in params:
            raise ValueError(f"{type(scheduler).__name__}.step takes no use_clipped_model_output")
        step_kwargs["use_clipped_model_output"] = True
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=gen, device=device)
        x = x * scheduler.init_noise_sigma
        null = torch.full((b,), NULL_CLASS, dtype=torch.long, device=device)
        y = None if labels is None else labels[start : start + b].to(device)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if y is None:
                eps = model(model_in, t, null)
            elif guidance_scale == 1.0:
                eps = model(model_in, t, y)
            else:
                eps_c, eps_u = model(torch.cat([model_in, model_in]), t, torch.cat([y, null])).chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, generator=gen, **step_kwargs).prev_sample
        out.append(to_unit_range(x.float()))
    return torch.cat(out)


def _step_params(scheduler) -> set:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def run_one(model, args, run: dict) -> tuple[dict, torch.Tensor]:
    """One sampling run (``run``: sampler, steps, spacing, guidance, clipped_eps), judged."""
    from fastdiff.quality import judge

    sampler, steps, spacing, guidance = run["sampler"], run["steps"], run["spacing"], run["guidance"]
    clipped_eps = run.get("clipped_eps", False)
    n = args.num_samples
    scheduler = make_scheduler(sampler, args.backend, spacing)
    labels = None if guidance is None else torch.arange(n) % NUM_CLASSES
    t0 = time.perf_counter()
    images = sample(
        model,
        scheduler,
        n,
        steps,
        seed=args.seed,
        labels=labels,
        guidance_scale=1.0 if guidance is None else guidance,
        clipped_eps=clipped_eps,
        device=args.device,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - t0
    result = judge(images)
    if labels is not None:
        from fastdiff.quality import predict

        result["label_accuracy"] = float((torch.as_tensor(predict(images)) == labels).float().mean())
    result.update(
        sampler=sampler,
        steps=steps,
        timestep_spacing=spacing if sampler == "ddim" else None,
        guidance=guidance,
        clipped_eps=clipped_eps,
        seed=args.seed,
        backend=args.backend,
        seconds=round(seconds, 2),
    )
    return result, images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--steps", type=int, default=None, help="default: 50 for DDIM, 1000 for DDPM")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default="trailing")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale; labels 0..9 cycled")
    p.add_argument("--clipped-eps", action="store_true", help="DDIM use_clipped_model_output=True")
    p.add_argument("-n", "--num-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", type=Path, default=None, help="other weights than the shipped ones")
    p.add_argument("--fastdiff", dest="backend", action="store_const", const="fastdiff", default="diffusers")
    p.add_argument("--preset", choices=["card"], default=None, help="card: every MODEL_CARD figure")
    p.add_argument("--save-grid", type=Path, default=None, help="write the samples as a PNG grid")
    p.add_argument("--json", type=Path, default=None, help="append results to this JSON-lines file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_default_model(args.device)
    if args.weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.weights)))

    if args.preset == "card":
        ddim = dict(sampler="ddim", steps=50, spacing="trailing", guidance=None)
        runs = [
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
    else:
        steps = args.steps or (1000 if args.sampler == "ddpm" else 50)
        runs = [
            dict(
                sampler=args.sampler,
                steps=steps,
                spacing=args.spacing,
                guidance=args.guidance,
                clipped_eps=args.clipped_eps,
            )
        ]
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
