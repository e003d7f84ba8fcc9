"""Conformance with diffusers' scheduler contract, on the scheduler configs of real pipelines.

For every config in ``fixtures/scheduler_configs/`` (published values, sources in the README there) and every
class in ``fastdiff.schedulers.SCHEDULERS`` (so a new sampler is covered without editing this file), fastdiff
must do what diffusers does: ``from_config`` gives the same config and unused kwargs, ``set_timesteps`` the same
timesteps, sigmas and ``init_noise_sigma``, save/load round trips and chains of switches keep the same keys,
and ``step`` returns an output that behaves like diffusers' ``BaseOutput``. No network: every file is local.

Configs a fastdiff class does not build yet are listed once, in ``GAPS`` (strict xfail: the test fails as soon
as the gap closes, so the entry is removed with the fix) or ``DEPARTURES`` (refused on purpose, and checked).
"""

from __future__ import annotations

import collections
import copy
import inspect
import json
import logging
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import available_backends
from helpers import assert_rel

import fastdiff
from fastdiff.schedulers import SCHEDULERS, _output

diffusers = pytest.importorskip("diffusers")

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "scheduler_configs"
FIXTURES = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURE_DIR.glob("*.json"))}
NAMES = sorted(SCHEDULERS)
STEP_COUNTS = (1, 4, 25, 50, 999)
#: which library and version wrote a config: not part of the scheduler's settings
VERSION_KEYS = ("_diffusers_version", "_fastdiff_version")
#: FLUX's pipeline mu at 1024x1024 (4096 image tokens: max_shift)
FLUX_MU = 1.15

#: (fixture, class) -> what fastdiff lacks for it: step-path features still to come (issue 11); strict xfail
GAPS: dict = {}

#: (fixture, class) -> the argument fastdiff refuses at construction, where diffusers constructs the scheduler
#: but cannot step it (documented departures: a clear error early instead of one at the first step)
DEPARTURES = {
    ("wan21_unipc", name): "prediction_type"
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
}


def _marks(fixture: str, *names: str) -> list:
    reasons = sorted({GAPS[(fixture, n)] for n in names if (fixture, n) in GAPS})
    return [pytest.mark.xfail(strict=True, raises=ValueError, reason="; ".join(reasons))] if reasons else []


def _cases(arity: int = 1) -> list:
    out = []
    for fixture in FIXTURES:
        combos = [(n,) for n in NAMES] if arity == 1 else [(a, b) for a in NAMES for b in NAMES]
        for names in combos:
            if any((fixture, n) in DEPARTURES for n in names):
                continue
            out.append(pytest.param(fixture, *names, id="-".join((fixture, *names)), marks=_marks(fixture, *names)))
    return out


def pipeline_config(fixture: str):
    """The config as a pipeline holds it: the fixture loaded into its diffusers class (which records, in
    ``_use_default_values``, the arguments the file does not set)."""
    raw = FIXTURES[fixture]
    return getattr(diffusers, raw["_class_name"]).from_config(raw).config


def source_configs(fixture: str) -> dict:
    return {"json": FIXTURES[fixture], "pipeline": pipeline_config(fixture)}


def norm(config) -> dict:
    """A config without the writer's version keys, ``_use_default_values`` as a sorted list (diffusers keeps it
    in set order, which varies between runs)."""
    out = {k: v for k, v in dict(config).items() if k not in VERSION_KEYS}
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def assert_same_config(ours, theirs, what: str) -> None:
    a, b = norm(ours), norm(theirs)
    diff = {
        k: (a.get(k, "<missing>"), b.get(k, "<missing>")) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
    }
    assert not diff, f"{what}: config differs from diffusers' as {{key: (fastdiff, diffusers)}}: {diff}"


def build(lib, name: str, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecations (e.g. "deis" -> "dpmsolver++")
        return getattr(lib, name).from_config(config)


def option(name: str) -> tuple:
    """(argument, value, another value): a config argument of ``name`` that the config-API tests set away from its
    default: ``steps_offset`` of the beta-schedule samplers, the ``shift`` of flow matching (which has no betas)."""
    return ("steps_offset", 1, 2) if "steps_offset" in getattr(fastdiff, name)._init_keys() else ("shift", 3.0, 2.0)


def set_timesteps_kwargs(scheduler, n: int) -> dict:
    kwargs = {"device": "cpu"}
    if scheduler.config.get("use_dynamic_shifting") and "mu" in inspect.signature(scheduler.set_timesteps).parameters:
        kwargs["mu"] = FLUX_MU
    return kwargs


# ---------------------------------------------------------------------------------------------- from_config


@pytest.mark.parametrize("fixture,name", _cases())
def test_from_config_matches_diffusers(fixture, name):
    for form, config in source_configs(fixture).items():
        ours, ours_unused = getattr(fastdiff, name).from_config(config, return_unused_kwargs=True, eta_extra=0.5)
        theirs, theirs_unused = getattr(diffusers, name).from_config(config, return_unused_kwargs=True, eta_extra=0.5)
        assert type(ours) is getattr(fastdiff, name)
        assert_same_config(ours.config, theirs.config, f"{name}.from_config({fixture} as {form})")
        assert norm(ours_unused) == norm(theirs_unused), f"{form}: unused kwargs differ"


@pytest.mark.parametrize("fixture,name", _cases())
def test_timesteps_and_sigmas_match_diffusers(fixture, name):
    config = pipeline_config(fixture)
    ours, theirs = getattr(fastdiff, name).from_config(config), build(diffusers, name, config)
    for n in STEP_COUNTS:
        try:
            theirs.set_timesteps(n, **set_timesteps_kwargs(theirs, n))
        except Exception as exc:  # diffusers refuses this count: so must fastdiff
            with pytest.raises(ValueError):
                ours.set_timesteps(n, **set_timesteps_kwargs(ours, n))
            print(f"{name} {fixture} n={n}: both refuse ({type(exc).__name__}: {exc})")
            continue
        ours.set_timesteps(n, **set_timesteps_kwargs(ours, n))
        what = f"{name} from {fixture}, set_timesteps({n})"
        assert ours.timesteps.dtype == theirs.timesteps.dtype, f"{what}: timesteps dtype"
        assert torch.equal(ours.timesteps.cpu(), theirs.timesteps.cpu()), (
            f"{what}: timesteps {ours.timesteps[:8].tolist()}... != diffusers' {theirs.timesteps[:8].tolist()}..."
        )
        if hasattr(theirs, "sigmas"):
            a, b = torch.as_tensor(ours.sigmas).cpu(), torch.as_tensor(theirs.sigmas).cpu()
            assert a.shape == b.shape and a.dtype == b.dtype, (
                f"{what}: sigmas {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            )
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"{what}: sigmas: {m}")
        if not hasattr(theirs, "init_noise_sigma"):  # FlowMatchEuler: fastdiff's has 1.0 for its generic loops
            continue
        a, b = ours.init_noise_sigma, theirs.init_noise_sigma
        assert isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor), f"{what}: init_noise_sigma {a!r} vs {b!r}"
        assert float(a) == pytest.approx(float(b), rel=1e-7), f"{what}: init_noise_sigma"


@pytest.mark.parametrize("fixture,name", sorted(DEPARTURES))
def test_departures_refuse_what_diffusers_cannot_step(fixture, name):
    """fastdiff refuses these configs at construction, naming the argument; diffusers builds the scheduler but
    its first step raises, so nothing that worked in diffusers is lost."""
    config = pipeline_config(fixture)
    with pytest.raises(ValueError, match=f"`{DEPARTURES[(fixture, name)]}`"):
        getattr(fastdiff, name).from_config(config)
    theirs = build(diffusers, name, config)
    theirs.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(Exception):  # noqa: B017  (diffusers raises ValueError or NotImplementedError here)
        theirs.step(torch.randn_like(x), theirs.timesteps[0], theirs.scale_model_input(x, theirs.timesteps[0]))


# ---------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("fixture,name", _cases())
def test_save_load_round_trips(tmp_path, fixture, name):
    config = pipeline_config(fixture)
    F, D = getattr(fastdiff, name), getattr(diffusers, name)
    ours, theirs = F.from_config(config), build(diffusers, name, config)
    ours.save_pretrained(tmp_path / "f")
    theirs.save_pretrained(tmp_path / "d")
    ours_file = json.loads((tmp_path / "f" / "scheduler_config.json").read_text())
    theirs_file = json.loads((tmp_path / "d" / "scheduler_config.json").read_text())
    assert ours_file["_fastdiff_version"] == fastdiff.__version__
    assert_same_config(ours_file, theirs_file, "scheduler_config.json")

    reference = D.from_pretrained(tmp_path / "d").config  # diffusers save -> diffusers load
    assert_same_config(F.from_pretrained(tmp_path / "f").config, reference, "fastdiff save -> fastdiff load")
    assert_same_config(D.from_pretrained(tmp_path / "f").config, reference, "fastdiff save -> diffusers load")
    assert_same_config(F.from_pretrained(tmp_path / "d").config, reference, "diffusers save -> fastdiff load")
    # diffusers' own rule (its test_from_pretrained): a saved and reloaded config is the original without
    # the `_use_default_values` bookkeeping
    before = {k: v for k, v in ours.config.items() if k != "_use_default_values"}
    assert norm(F.from_pretrained(tmp_path / "f").config) == norm(before)


# ---------------------------------------------------------------------------------------------- switches


@pytest.mark.parametrize("fixture,a,b", _cases(arity=2))
def test_switch_a_b_a_matches_diffusers(fixture, a, b):
    ours = theirs = pipeline_config(fixture)
    for hop, name in enumerate((a, b, a)):
        ours, theirs = getattr(fastdiff, name).from_config(ours).config, build(diffusers, name, theirs).config
        assert_same_config(ours, theirs, f"{fixture}: hop {hop} ({' -> '.join((a, b, a)[: hop + 1])})")
    first = getattr(fastdiff, a).from_config(pipeline_config(fixture)).config
    first_theirs = build(diffusers, a, pipeline_config(fixture)).config
    # what diffusers itself changes on the way is not lost (UniPC rewrites DPM-Solver's solver_type to "bh2")
    lost = {k: v for k, v in first.items() if ours.get(k) != v and theirs.get(k) == first_theirs.get(k)}
    theirs_first = build(diffusers, a, pipeline_config(fixture)).config
    # a key diffusers' own chain changes too is not lost: DPM-Solver maps UniPC's solver_type "bh2" to "midpoint"
    # on the way through (Wan's config via FlowMatchEuler -> DPM-Solver -> FlowMatchEuler)
    lost = {k: v for k, v in first.items() if ours.get(k) != v and theirs.get(k) == theirs_first.get(k)}
    assert not lost, f"{a} -> {b} -> {a} lost or changed {lost}"


@pytest.mark.parametrize(
    "fixture",
    [pytest.param(f, marks=_marks(f, *NAMES)) for f in FIXTURES if not any((f, n) in DEPARTURES for n in NAMES)],
)
def test_switch_through_every_scheduler_matches_diffusers(fixture):
    chain = NAMES + NAMES[:1]
    ours = theirs = pipeline_config(fixture)
    for hop, name in enumerate(chain):
        ours, theirs = getattr(fastdiff, name).from_config(ours).config, build(diffusers, name, theirs).config
        assert_same_config(ours, theirs, f"{fixture}: hop {hop} ({name})")


# ---------------------------------------------------------------------------------------------- config API


@pytest.mark.parametrize("name", NAMES)
def test_use_default_values_recorded_like_diffusers(name):
    F, D = getattr(fastdiff, name), getattr(diffusers, name)
    key, value, _ = option(name)
    kwargs = {"num_train_timesteps": 500, key: value}
    ours = norm(F(**kwargs).config)
    assert ours.pop("_class_name") == name  # diffusers adds it on the first save or print
    assert ours == norm(D(**kwargs).config)
    everything = {k: v for k, v in D().config.items() if not k.startswith("_")}
    assert "_use_default_values" not in F(**everything).config and "_use_default_values" not in D(**everything).config
    # fastdiff's own argument never enters the config
    assert "backend" not in F(backend="reference").config
    assert "backend" not in F.from_config(D().config, backend="reference").config


def test_pipeline_switch_keeps_the_target_defaults():
    """The issue's headline case: SD 1.5's config (PNDM, no timestep_spacing key) into Euler gives Euler's
    `linspace` timesteps, as diffusers does (999, 957.4, ...), not PNDM's `leading`."""
    pndm = pipeline_config("sd15_pndm")
    euler = fastdiff.EulerDiscreteScheduler.from_config(pndm)
    assert euler.config.timestep_spacing == "linspace"
    euler.set_timesteps(25)
    assert euler.timesteps[0].item() == 999.0 and abs(euler.timesteps[1].item() - 957.375) < 1e-3
    # an override sticks through further switches, as in diffusers
    trailing = fastdiff.EulerDiscreteScheduler.from_config(pndm, timestep_spacing="trailing")
    assert fastdiff.DDIMScheduler.from_config(trailing.config).config.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", NAMES)
def test_config_attribute_access_like_diffusers(name):
    s = getattr(fastdiff, name)(num_train_timesteps=500)
    s.register_to_config(test_attribute=5)
    s.dummy_attribute = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.dummy_attribute == 5 and hasattr(s, "save_pretrained")
    with pytest.warns(FutureWarning, match="test_attribute"):
        assert s.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert s.num_train_timesteps == 500
    with pytest.raises(AttributeError) as err:
        _ = s.does_not_exist
    assert str(err.value) == f"'{name}' object has no attribute 'does_not_exist'"
    assert s.config.test_attribute == 5 and s.config["num_train_timesteps"] == 500


@pytest.mark.parametrize("name", NAMES)
def test_register_to_config_persists(tmp_path, name):
    F = getattr(fastdiff, name)
    key, value, other = option(name)
    s = F(**{key: value})
    s.register_to_config(extra_option=[1, 2], **{key: other})
    assert s.config[key] == other and s.config.extra_option == [1, 2]
    s.save_config(tmp_path)
    back = F.from_pretrained(tmp_path)
    assert back.config.extra_option == [1, 2] and back.config[key] == other
    d = getattr(diffusers, name).from_pretrained(tmp_path)
    assert d.config.extra_option == [1, 2]


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_are_classes_like_diffusers(name):
    ours = getattr(fastdiff, name)().compatibles
    theirs = {c.__name__ for c in getattr(diffusers, name)().compatibles}
    assert all(isinstance(c, type) and c is SCHEDULERS[c.__name__] for c in ours)
    assert {c.__name__ for c in ours} == {n for n in theirs | {name} if n in SCHEDULERS}
    assert getattr(fastdiff, name).has_compatibles and getattr(fastdiff, name)._deprecated_kwargs == []
    for cls in ours:  # every compatible class builds from this config and back
        back = getattr(fastdiff, name).from_config(cls.from_config(getattr(fastdiff, name)().config).config)
        assert type(back) is getattr(fastdiff, name)


@pytest.mark.parametrize("name", NAMES)
def test_load_config_and_from_config_inputs(tmp_path, name):
    F = getattr(fastdiff, name)
    key, value, _ = option(name)
    s = F(**{key: value})
    s.save_pretrained(tmp_path / "scheduler")
    assert F.config_name == "scheduler_config.json"
    config = F.load_config(tmp_path, subfolder="scheduler")
    assert isinstance(config, dict) and config[key] == value
    config2, unused = F.load_config(tmp_path / "scheduler", return_unused_kwargs=True, cache_dir=None, foo=1)
    assert config2 == config and unused == {"foo": 1}
    assert F.from_pretrained(tmp_path, subfolder="scheduler").config[key] == value
    # a scheduler object, fastdiff's or diffusers', works as a config
    assert F.from_config(s).config[key] == value
    assert F.from_config(getattr(diffusers, name)(**{key: value})).config[key] == value
    with pytest.warns(FutureWarning, match="from_pretrained"):
        assert F.from_config(str(tmp_path / "scheduler")).config[key] == value
    with pytest.raises(OSError, match="without scheduler_config.json"):
        F.load_config(tmp_path / "scheduler" / "..", subfolder="missing")
    with pytest.raises(ValueError, match="`config` is required"):
        F.from_config()
    with pytest.raises(AssertionError, match="is a file"):
        s.save_config(tmp_path / "scheduler" / "scheduler_config.json")


@pytest.mark.parametrize("name", NAMES)
def test_config_is_frozen_copyable_and_printable(name):
    key, value, other_value = option(name)
    none_arg = {"trained_betas": None} if key == "steps_offset" else {"shift_terminal": None}
    s = getattr(fastdiff, name)(**none_arg, **{key: value})
    for mutate in (
        lambda c: c.__setitem__(key, other_value),
        lambda c: c.update({key: other_value}),
        lambda c: c.pop(key),
        lambda c: setattr(c, key, other_value),
    ):
        with pytest.raises(TypeError, match="frozen"):
            mutate(s.config)
    for other in (copy.deepcopy(s.config), pickle.loads(pickle.dumps(s.config))):
        assert type(other) is type(s.config) and other == s.config and getattr(other, key) == value
    text = repr(s)
    assert text.startswith(f"{name} {{") and json.loads(text[len(name) + 1 :])[key] == value
    assert json.loads(s.to_json_string())["_class_name"] == name


def test_ddpm_from_a_dpm_config_steps_like_diffusers():
    """A saved DPM-Solver++ config sets `variance_type: null`; diffusers' DDPM then steps with fixed_small."""
    config = FIXTURES["dpmpp_default"]
    ours = fastdiff.DDPMScheduler.from_config(config, backend="reference")
    theirs = diffusers.DDPMScheduler.from_config(config)
    assert ours.config.variance_type is None
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for s in (ours, theirs):
        s.set_timesteps(10)
    a = ours.step(m, ours.timesteps[3], x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = theirs.step(m, theirs.timesteps[3], x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert_rel(a, b, 1e-5, "DDPM step with variance_type=None")
    dpm = fastdiff.DPMSolverMultistepScheduler.from_config(FIXTURES["ddpm_cifar10"])
    assert dpm.config.variance_type == "fixed_large"


# ---------------------------------------------------------------------------------------------- outputs


def _step_pair(name: str, backend: str):
    ours, theirs = getattr(fastdiff, name)(backend=backend), getattr(diffusers, name)()
    x, m = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(10)
        t = s.timesteps[2]
        # diffusers' UniPC step takes no generator (it draws no noise)
        takes_generator = "generator" in inspect.signature(s.step).parameters

        def kw():
            return {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}

        x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x  # FlowMatchEuler has none
        outs.append(s.step(m, t, x_in, **kw()))
        s.set_timesteps(10)
        outs.append(s.step(m, t, x_in, **kw(), return_dict=False))
    return outs


@pytest.mark.parametrize("backend", ["reference"] + available_backends("cpu"))
@pytest.mark.parametrize("name", NAMES)
def test_step_output_behaves_like_diffusers(name, backend):
    out, out_tuple, ref, ref_tuple = _step_pair(name, backend)
    assert isinstance(out, collections.OrderedDict) == isinstance(ref, collections.OrderedDict)
    assert list(out.keys()) == list(ref.keys()), "keys (None fields skipped)"
    assert len(out.to_tuple()) == len(ref.to_tuple()) and isinstance(out_tuple, tuple)
    assert len(out_tuple) == len(ref_tuple)
    assert out[0] is out.prev_sample and out["prev_sample"] is out.prev_sample and out[:1] == (out.prev_sample,)
    for key in ref.keys():
        assert_rel(out[key], ref[key], 1e-4, f"{name} step output {key!r}")
        assert_rel(out_tuple[list(ref.keys()).index(key)], ref[key], 1e-4, f"{name} return_dict=False {key!r}")
    with pytest.raises(IndexError):
        out[len(ref.keys())]
    # pytree: flattened to the same tensors as diffusers' output, rebuilt as the same class
    leaves, spec = pytree.tree_flatten(out)
    ref_leaves, _ = pytree.tree_flatten(ref)
    assert len(leaves) == len(ref_leaves)
    rebuilt = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert type(rebuilt) is type(out) and torch.equal(rebuilt.prev_sample, out.prev_sample * 2)
    # copy and pickle keep the class and both views (attribute and key)
    for other in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert type(other) is type(out) and list(other.keys()) == list(out.keys())
        assert torch.equal(other["prev_sample"], out.prev_sample)
    with pytest.raises(TypeError):
        out.pop("prev_sample")
    out.prev_sample = out.prev_sample + 1  # setting a field updates the key view too, as in diffusers
    assert out["prev_sample"] is out.prev_sample


def test_output_aliases_are_the_output_class():
    for alias in (
        "DDPMSchedulerOutput",
        "DDIMSchedulerOutput",
        "EulerDiscreteSchedulerOutput",
        "EulerAncestralDiscreteSchedulerOutput",
    ):
        assert getattr(_output, alias) is fastdiff.SchedulerOutput
    assert fastdiff.schedulers._base.SchedulerOutput is fastdiff.SchedulerOutput
    out = fastdiff.SchedulerOutput(prev_sample=torch.ones(1))
    assert list(out.keys()) == ["prev_sample"] and out.to_tuple() == (out.prev_sample,)


def test_unknown_config_keys_warn_only_when_unknown_everywhere(caplog):
    """A key that no compatible class takes is reported (as diffusers reports it); other schedulers' options are
    carried silently."""
    config = dict(FIXTURES["ddpm_cifar10"], not_an_option=1)
    with caplog.at_level(logging.WARNING, logger="fastdiff.schedulers._config"):
        s = fastdiff.DDIMScheduler.from_config(config)
    assert "not_an_option" in caplog.text and "variance_type" not in caplog.text
    assert s.config.not_an_option == 1 and s.config.variance_type == "fixed_large"
