"""Quick GPU probe (early version): copy bandwidth, fused step vs diffusers step, op-dispatch overhead."""

import argparse
import json
import time

import torch

import fastdiff
from fastdiff import ops


def wall_per_call(fn, iters=200, warmup=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    times.sort()
    return times[len(times) // 2]


def gpu_time(fn, iters=50):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    res = {}
    dev = "cuda"
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = gpu_time(lambda: b.copy_(a))
    res["copy_GBps"] = 2 * n / t / 1e9
    print(f"copy bandwidth {res['copy_GBps']:.0f} GB/s")

    import diffusers

    for shape, dtype in [
        ((1, 4, 64, 64), torch.float16),
        ((64, 3, 256, 256), torch.float16),
        ((64, 3, 256, 256), torch.float32),
    ]:
        x = torch.randn(shape, device=dev, dtype=dtype)
        m = torch.randn_like(x)
        for name, kw in [("DDIMScheduler", dict(eta=0.0)), ("DDIMScheduler", dict(eta=1.0)), ("DDPMScheduler", {})]:
            d = getattr(diffusers, name)()
            f = getattr(fastdiff, name)()
            d.set_timesteps(50, device=dev)
            f.set_timesteps(50, device=dev)
            td, tf = d.timesteps[10], f.timesteps[10]
            g = torch.Generator(dev).manual_seed(0)
            w_d = wall_per_call(lambda: d.step(m, td, x, generator=g, **kw), iters=50)
            w_f = wall_per_call(lambda: f.step(m, tf, x, generator=g, **kw))
            w_fs = wall_per_call(lambda: f.step(m, tf, x, noise_seed=0, **kw))
            key = f"{name}{kw}{tuple(shape)}{dtype}"
            res[key] = dict(
                diffusers_us=w_d * 1e6, fastdiff_us=w_f * 1e6, fastdiff_philox_us=w_fs * 1e6, backend=f.last_backend
            )
            print(
                f"{key}: diffusers {w_d * 1e6:.1f} us, fastdiff {w_f * 1e6:.1f} us (philox {w_fs * 1e6:.1f}) "
                f"-> {w_d / w_f:.1f}x [{f.last_backend}]"
            )
        # bandwidth of the bare fused kernel
        f = fastdiff.DDIMScheduler()
        f.set_timesteps(50, device=dev)
        table = f._device_table((0.0, False), dev)
        row = table[10]
        for mode, kw in [
            ("noise-free", {}),
            (
                "philox",
                dict(seed=torch.arange(shape[0], device=dev), offset=torch.zeros(1, dtype=torch.int64, device=dev)),
            ),
        ]:
            prev = torch.empty_like(x)
            fn = lambda: ops._fused_step_impl(
                x,
                m,
                row,
                prev,
                None,
                None,
                kw.get("seed"),
                kw.get("offset"),
                None,
                None,
                None,
                None,
                None,
                None,
                1.0,
                0,
                "triton",
            )
            t = gpu_time(fn)
            nbytes = 3 * x.numel() * x.element_size()
            print(
                f"  kernel {mode} {tuple(shape)} {dtype}: {t * 1e6:.1f} us, {nbytes / t / 1e9:.0f} GB/s "
                f"({nbytes / t / 1e9 / res['copy_GBps'] * 100:.0f}% of copy)"
            )
            res[f"kernel_{mode}{tuple(shape)}{dtype}"] = dict(us=t * 1e6, GBps=nbytes / t / 1e9)
            w_impl = wall_per_call(fn)
            w_op = wall_per_call(
                lambda: ops.fused_step_op(
                    x,
                    m,
                    row,
                    prev,
                    None,
                    None,
                    kw.get("seed"),
                    kw.get("offset"),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    1.0,
                    0,
                    "triton",
                )
            )
            print(f"  host per call: direct impl {w_impl * 1e6:.1f} us, via torch.ops {w_op * 1e6:.1f} us")
    with open(f"{args.out}/probe.json", "w") as fh:
        json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
