"""The drop-in schedulers. Every public module of this package is imported here, and each registers its
classes (``_registry.register``), so :data:`SCHEDULERS` lists them all and a new sampler is one new file."""

import importlib
import pkgutil

from ._base import SchedulerOutput
from ._registry import PRESETS, SCHEDULERS, Preset

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

globals().update(SCHEDULERS)

__all__ = ["PRESETS", "SCHEDULERS", "Preset", "SchedulerOutput", *sorted(SCHEDULERS)]
