"""The one list of fastdiff's scheduler classes, and the named sampler presets built on them.

A scheduler file registers its classes with :func:`register`; everything that needs "every scheduler" (the
package's exports, ``from_config`` by class name, ``compatibles``, the CLI's ``--sampler`` choices, the
integrations, the tests and the benchmarks) reads :data:`SCHEDULERS` or :data:`PRESETS`, so a new sampler
file is picked up everywhere without editing another list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULERS: dict[str, type] = {}


@dataclass(frozen=True)
class Preset:
    """A named sampler: a scheduler class, config overrides and ``step`` keyword arguments (``"dpm++2m-karras"``
    is DPMSolverMultistepScheduler with ``use_karras_sigmas=True``)."""

    name: str
    scheduler: str
    config: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return SCHEDULERS[self.scheduler]


PRESETS: dict[str, Preset] = {}


def register(presets: dict | None = None):
    """Class decorator: add the class to :data:`SCHEDULERS` and its ``presets`` ({name: (config overrides,
    step kwargs)}) to :data:`PRESETS`."""

    def deco(cls):
        name = cls.__name__
        if name in SCHEDULERS and SCHEDULERS[name] is not cls:
            raise RuntimeError(f"scheduler {name!r} registered twice")
        SCHEDULERS[name] = cls
        for preset, (config, step_kwargs) in (presets or {}).items():
            if preset in PRESETS and PRESETS[preset].scheduler != name:
                raise RuntimeError(f"sampler preset {preset!r} registered by {PRESETS[preset].scheduler} and {name}")
            PRESETS[preset] = Preset(preset, name, dict(config), dict(step_kwargs))
        return cls

    return deco
