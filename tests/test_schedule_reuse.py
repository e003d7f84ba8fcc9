"""What a scheduler keeps from one loop to the next, and the CPU lane (``SchedulerBase._step``).

A loop that calls ``set_timesteps`` before each batch gets the same schedule again: the scheduler keeps its
per-schedule caches (tables, validation, plans, buffers) when timesteps, sigmas, config, backend and environment
are equal, and a CPU step it has run before goes straight to its torch program (the lane). Both are caches, so
the checks here are that they change nothing: a second walk gives the first walk's bits, on every registered
preset and dtype, and a change of config, options, backend, environment, layout or schedule between walks gives
what a fresh scheduler gives.
"""

import inspect

import pytest
import torch

from fastdiff import ops
from fastdiff.schedulers import PRESETS, SCHEDULERS

SHAPE = (2, 3, 5, 4)
STEPS = 7


def _walk(s, dtype=torch.float32, steps=STEPS, seed=0, layout=None, **step_kwargs):
    """set_timesteps then a whole loop, generator noise reseeded per step; returns every step's outputs."""
    gen = torch.Generator().manual_seed(seed)
    s.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=gen).to(dtype)
    takes_generator = "generator" in inspect.signature(s.step).parameters
    outs = []
    for i, t in enumerate(s.timesteps):
        m = torch.randn(SHAPE, generator=gen).to(dtype)
        if layout is not None:
            x, m = layout(x), layout(m)
        if hasattr(s, "scale_model_input"):
            x = s.scale_model_input(x, t)
        kw = dict(step_kwargs)
        if takes_generator:
            kw["generator"] = torch.Generator().manual_seed(100 + i)
        out = s.step(m, t, x, return_dict=False, **kw)
        outs.append(tuple(o for o in out if o is not None))
        x = out[0]
    return outs


def _assert_same_bits(a, b, what):
    assert len(a) == len(b), what
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert len(sa) == len(sb), f"{what}: step {i} returns {len(sa)} outputs, then {len(sb)}"
        for k, (u, v) in enumerate(zip(sa, sb)):
            assert u.dtype == v.dtype and u.shape == v.shape, f"{what}: step {i} output {k}"
            assert torch.equal(u, v), f"{what}: step {i} output {k} differs, max |diff| {(u - v).abs().max():.3e}"


class _CountFused:
    """Counts the fused-step calls that go through ``ops`` (the lane does not)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ops.fused_step

        def counting(p, backend):
            self.calls += 1
            return real(p, backend)

        monkeypatch.setattr(ops, "fused_step", counting)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_second_walk_gives_the_first_walks_bits(preset, dtype, monkeypatch):
    p = PRESETS[preset]
    s = p.cls.from_config(dict(p.config), backend="torch")
    first = _walk(s, dtype, **p.step_kwargs)
    count = _CountFused(monkeypatch)
    second = _walk(s, dtype, **p.step_kwargs)
    calls = count.calls
    _assert_same_bits(first, second, f"{preset} {dtype}")
    fresh = _walk(p.cls.from_config(dict(p.config), backend="torch"), dtype, **p.step_kwargs)
    _assert_same_bits(first, fresh, f"{preset} {dtype} against a fresh scheduler")
    assert s.last_backend == "torch"
    if type(s)._plain_plans and preset not in ("euler-a",):
        # a sampler whose every step is plain reruns all of them through the lane
        assert calls == 0, f"{preset}: {calls} steps of the second walk went through ops.fused_step"


@pytest.mark.parametrize("preset", ["euler-a", "flow-euler-sde", "ddim"])
def test_lane_draws_the_same_generator_noise(preset):
    """Steps with noise from a generator: the lane draws it as the first walk did (the generator advances the
    same way), and a different seed gives different samples."""
    p = PRESETS[preset]
    s = p.cls.from_config(dict(p.config), backend="torch")
    kw = dict(p.step_kwargs)
    if preset == "ddim":
        kw["eta"] = 1.0
    first = _walk(s, **kw)
    second = _walk(s, **kw)
    _assert_same_bits(first, second, preset)
    other = _walk(s, seed=1, **kw)
    assert not torch.equal(first[-1][0], other[-1][0])


def test_options_change_between_walks():
    """DDIM eta and Euler's churn select other rows and noise: the second walk equals a fresh scheduler's."""
    ddim = SCHEDULERS["DDIMScheduler"](backend="torch")
    _walk(ddim, eta=0.0)
    _assert_same_bits(
        _walk(ddim, eta=0.7), _walk(SCHEDULERS["DDIMScheduler"](backend="torch"), eta=0.7), "ddim eta 0 -> 0.7"
    )
    euler = SCHEDULERS["EulerDiscreteScheduler"](backend="torch")
    _walk(euler)
    churned = dict(s_churn=2.0, s_tmin=0.5, s_tmax=50.0)
    _assert_same_bits(
        _walk(euler, **churned), _walk(SCHEDULERS["EulerDiscreteScheduler"](backend="torch"), **churned), "churn"
    )


def test_config_change_between_walks_drops_the_caches():
    s = SCHEDULERS["DDIMScheduler"](backend="torch", clip_sample=True, clip_sample_range=0.5)
    _walk(s)
    s.register_to_config(clip_sample=False)
    fresh = SCHEDULERS["DDIMScheduler"](backend="torch", clip_sample=False, clip_sample_range=0.5)
    _assert_same_bits(_walk(s), _walk(fresh), "clip_sample turned off by register_to_config")


def test_shift_change_between_walks():
    s = SCHEDULERS["FlowMatchEulerDiscreteScheduler"](backend="torch", shift=3.0)
    _walk(s)
    s.set_shift(1.5)
    fresh = SCHEDULERS["FlowMatchEulerDiscreteScheduler"](backend="torch", shift=3.0)
    fresh.set_shift(1.5)
    _assert_same_bits(_walk(s), _walk(fresh), "set_shift")


def test_schedule_change_between_walks():
    """Another step count, then the first again: each walk equals a fresh scheduler's."""
    s = SCHEDULERS["EulerDiscreteScheduler"](backend="torch")
    for steps in (STEPS, STEPS + 2, STEPS):
        want = _walk(SCHEDULERS["EulerDiscreteScheduler"](backend="torch"), steps=steps)
        _assert_same_bits(_walk(s, steps=steps), want, f"{steps} steps")


def test_backend_and_environment_change_between_walks(monkeypatch):
    s = SCHEDULERS["FlowMatchEulerDiscreteScheduler"]()  # backend from FASTDIFF_BACKEND
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    _walk(s)
    _walk(s)
    assert s.last_backend == "torch"
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    _walk(s)
    assert s.last_backend == "reference"
    s.backend = "torch"
    _walk(s)
    assert s.last_backend == "torch"


def test_lane_outputs_and_layouts():
    """The lane's outputs are new contiguous tensors in the slow path's dtypes; a strided input after lanes
    exist takes the general path and still gives a fresh scheduler's result."""
    s = SCHEDULERS["EulerDiscreteScheduler"](backend="torch")
    a = _walk(s, torch.float16)
    b = _walk(s, torch.float16)
    for prev, x0 in b:
        assert prev.is_contiguous() and x0.is_contiguous()
        assert prev.dtype == torch.float16 and x0.dtype == torch.float32
    assert all(u[0].data_ptr() != v[0].data_ptr() for u, v in zip(a, b))

    def strided(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    _assert_same_bits(
        _walk(s, layout=strided), _walk(SCHEDULERS["EulerDiscreteScheduler"](backend="torch"), layout=strided), "T"
    )


def test_validation_still_runs_after_lanes_exist():
    s = SCHEDULERS["DDIMScheduler"](backend="torch")
    _walk(s)
    s.set_timesteps(STEPS)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 5, 5), s.timesteps[0], x)
    with pytest.raises(ValueError, match="generator"):
        s.step(torch.randn(SHAPE), s.timesteps[0], x, generator=torch.Generator(), variance_noise=torch.randn(SHAPE))
    with pytest.raises(TypeError, match="noise_seed"):
        s.step(torch.randn(SHAPE), s.timesteps[0], x, noise_seed=1.5)
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.randn(SHAPE), 3.5, x)
    s.step(torch.randn(SHAPE), s.timesteps[0], x)  # the loop then goes on as usual


@pytest.mark.parametrize("preset", ["flow-euler", "euler", "pndm", "ddim"])
def test_copies_keep_working(preset):
    """A copied or unpickled scheduler carries its caches and lanes along and walks like the original."""
    import copy
    import pickle

    p = PRESETS[preset]
    s = p.cls.from_config(dict(p.config), backend="torch")
    first = _walk(s, **p.step_kwargs)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        _assert_same_bits(_walk(clone, **p.step_kwargs), first, f"{preset} copy")


def test_flow_schedule_memo_follows_its_inputs():
    """FlowMatchEuler keeps the last step count's schedule; another count, mu or shift recomputes it."""
    cls = SCHEDULERS["FlowMatchEulerDiscreteScheduler"]
    s = cls(backend="torch", use_dynamic_shifting=True)
    for steps, mu in ((STEPS, 0.5), (STEPS, 0.5), (STEPS, 1.1), (STEPS + 3, 1.1), (STEPS, 0.5)):
        fresh = cls(backend="torch", use_dynamic_shifting=True)
        s.set_timesteps(steps, mu=mu)
        fresh.set_timesteps(steps, mu=mu)
        assert torch.equal(s.timesteps, fresh.timesteps) and torch.equal(s.sigmas, fresh.sigmas), (steps, mu)
        assert s.timesteps.data_ptr() != fresh.timesteps.data_ptr()


def test_loop_start_on_a_repeated_timestep_matches_diffusers():
    """diffusers starts a loop whose first timestep repeats at its second occurrence; fastdiff finds it from the
    element of ``timesteps`` (a list lookup) or from an equal value passed as a new tensor."""
    diffusers = pytest.importorskip("diffusers")
    sigmas = [1.0, 1.0, 0.6, 0.3]
    for name in ("FlowMatchEulerDiscreteScheduler",):
        ours, theirs = SCHEDULERS[name](backend="torch"), getattr(diffusers, name)()
        for s in (ours, theirs):
            s.set_timesteps(sigmas=sigmas)
        x = torch.randn(SHAPE)
        for passed in (ours.timesteps[0], ours.timesteps[0].clone()):
            ours.set_timesteps(sigmas=sigmas)
            theirs.set_timesteps(sigmas=sigmas)
            a = ours.step(x, passed, x).prev_sample
            b = theirs.step(x, theirs.timesteps[0], x).prev_sample
            assert ours.step_index == theirs.step_index == 2
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cpu_parity_script_writes_its_table(tmp_path, monkeypatch):
    """scripts/cpu_parity.py (the README's CPU table): one tiny run writes rows with the machine's facts."""
    import importlib.util
    import json
    import pathlib

    pytest.importorskip("diffusers")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" on CPU tensors is then the torch evaluation
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "cpu_parity.py"
    spec = importlib.util.spec_from_file_location("cpu_parity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "parity.json"
    threads = torch.get_num_threads()
    try:
        args = ["--out", str(out), "--rounds", "2", "--steps", "3", "--sizes", "cpu-2x4x16x16"]
        assert script.main(args + ["--presets", "flow-euler,ddim"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert [r["preset"] for r in data["rows"]] == ["flow-euler", "ddim"]
    assert all(r["backend"] == "torch" and r["ratio"] > 0 for r in data["rows"])
    assert data["meta"]["torch"] == torch.__version__ and len(data["meta"]["loadavg_1_5_15_after"]) == 3
    with pytest.raises(SystemExit):
        script.main(["--out", str(out), "--sizes", "cpu-3x3"])
