"""What ``step`` returns: ``SchedulerOutput``, usable wherever diffusers' ``BaseOutput`` is.

Like diffusers' ``BaseOutput``, an output is a dataclass and an ``OrderedDict`` of its non-None fields:
``out.prev_sample``, ``out["prev_sample"]``, ``out[0]``, ``out[:2]``, ``out.to_tuple()``, ``keys()`` / ``values()``
/ ``items()`` (None fields skipped, so DPM-Solver's output, without an x0, has one entry as in diffusers), and
every output class is a registered pytree node (``torch.utils._pytree`` flattens it to its tensors and back, as
``torch.compile`` and DDP's static graphs need).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree


def _flatten(out):
    return list(out.values()), list(out.keys())


def _flatten_with_keys(out):
    return [(pytree.MappingKey(k), v) for k, v in out.items()], list(out.keys())


@functools.cache
def _field_names(cls) -> tuple:
    """A dataclass's field names, read once per class (``dataclasses.fields`` costs microseconds per call, and an
    output is built at every step)."""
    return tuple(f.name for f in fields(cls))


class BaseOutput(OrderedDict):
    """A dataclass whose non-None fields are also its dict entries: attribute, key, integer and slice access
    (integers and slices index :meth:`to_tuple`). Entries cannot be removed; setting a field updates both
    views. Subclasses are registered as pytree nodes when they are defined."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _flatten,
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=_flatten_with_keys,
        )

    def __post_init__(self) -> None:
        names = _field_names(type(self))
        if not names:
            raise TypeError(f"{type(self).__name__} has no fields; an output class must declare at least one")
        for name in names:
            value = getattr(self, name)
            if value is not None:
                self[name] = value

    def _immutable(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} entries cannot be removed or bulk-updated; set a field instead")

    __delitem__ = setdefault = pop = popitem = update = clear = _immutable

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        # rebuild through the dataclass constructor (OrderedDict's reduce would replay __setitem__ only)
        if not is_dataclass(self):
            return super().__reduce__()
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> tuple:
        """The non-None fields, in declaration order."""
        return tuple(super().values())


@dataclass
class SchedulerOutput(BaseOutput):
    """Output of a scheduler's ``step``.

    prev_sample: x_{t-1}, shape and dtype of the step's result (``sample``'s shape; under classifier-free
    guidance, half the model output's batch). pred_original_sample: the x_0 estimate of the same shape, or None
    for schedulers whose diffusers namesake does not return it (DPM-Solver).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


# diffusers' per-scheduler output names (same fields), so `isinstance(out, DDPMSchedulerOutput)` holds
DDPMSchedulerOutput = SchedulerOutput
DDIMSchedulerOutput = SchedulerOutput
EulerDiscreteSchedulerOutput = SchedulerOutput
EulerAncestralDiscreteSchedulerOutput = SchedulerOutput
