"""diffusers' scheduler-config contract, written for fastdiff: ``ConfigMixin`` gives every scheduler
``config``, ``from_config`` (``_use_default_values`` and pass-through of unknown keys), ``register_to_config``,
``save_config`` / ``save_pretrained`` / ``from_pretrained`` / ``load_config``, ``to_json_string``, config
attribute access and ``compatibles``, with the semantics of diffusers 0.42's ``ConfigMixin`` and
``SchedulerMixin``. diffusers is not needed; ``huggingface_hub`` is imported only to reach the Hub.

How a config is recorded. Each subclass's ``__init__`` is wrapped (``__init_subclass__``) so that the call's
explicit arguments are known before the body runs; the body's first statement,
``self._register_config(locals(), backend)``, then records every init argument's value, the names of those the
caller did not pass (``_use_default_values``, as diffusers' ``register_to_config`` decorator records them) and
``_class_name``. ``from_config`` drops the keys a source config lists in ``_use_default_values`` (so a switch
from PNDM's config does not carry PNDM's ``timestep_spacing`` default into Euler), passes the rest to
``__init__``, and registers every key it did not use ("hidden" keys: other schedulers' options, ``_class_name``
updated) into the new config, so a chain A -> B -> A keeps them.

Deliberate departures from diffusers, each small:

- ``_class_name`` is in the config from construction (diffusers adds it, with ``_diffusers_version``, to the
  live config the first time the scheduler is printed or saved).
- Arguments passed positionally count as passed (diffusers' decorator lists them in ``_use_default_values``,
  so ``DDPMScheduler(500)`` followed by a switch silently falls back to 1000 timesteps there).
- ``_use_default_values`` lists names in signature order (diffusers: set order, which varies by run).
- Config values are stored JSON-ready (arrays, tensors and tuples as lists), so a saved and reloaded config
  equals the original; the config is read-only for every mutation (diffusers' ``FrozenDict`` lets
  ``config[key] = value`` through) and compares like a ``dict`` (not order-sensitively like ``OrderedDict``).
- Saved files carry ``_fastdiff_version`` (the writer) instead of ``_diffusers_version``: fastdiff is not
  diffusers, and diffusers reads scheduler files without either key. ``_fastdiff_version`` is file metadata:
  ``from_config`` does not carry it into a config (diffusers, which knows nothing of it, carries it along
  as an unknown key). A ``_diffusers_version`` read from a diffusers file is carried like any unknown key.
- ``from_config`` accepts a scheduler object (fastdiff's or diffusers') and uses its config; diffusers would
  try to load it as a path.
- A config key unknown to the target class is reported as ignored only when the source class
  (``_class_name``) is a fastdiff class: the options of diffusers classes fastdiff does not implement are not
  known here, and diffusers stays quiet about any option of a class it has.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .._version import __version__
from ._registry import SCHEDULERS

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"

#: diffusers' ``KarrasDiffusionSchedulers``: the scheduler names a Stable Diffusion style pipeline may switch
#: between. Every diffusers scheduler that lists compatible classes lists exactly these, except LTX's
#: rectified-flow ancestral sampler, which lists flow-matching Euler.
KARRAS_DIFFUSION_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
)

#: Class name -> the class names its diffusers namesake lists in ``_compatibles`` (diffusers 0.42). A class not
#: named here (FlowMatchEulerDiscreteScheduler, LCMScheduler, ...) is compatible with itself only. The one list of
#: compatibility groups: scheduler files do not repeat it.
COMPATIBLES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        KARRAS_DIFFUSION_SCHEDULERS
        + (
            "CogVideoXDDIMScheduler",
            "CogVideoXDPMScheduler",
            "DDIMParallelScheduler",
            "DDPMParallelScheduler",
            "DPMSolverMultistepInverseScheduler",
            "SASolverScheduler",
        ),
        KARRAS_DIFFUSION_SCHEDULERS,
    ),
    "LTXEulerAncestralRFScheduler": ("FlowMatchEulerDiscreteScheduler",),
}

#: fastdiff's own constructor arguments: never recorded in a config.
FASTDIFF_INIT_ARGS = ("backend",)
#: File metadata that ``from_config`` drops instead of carrying along.
_NOT_CARRIED = ("_use_default_values", "_fastdiff_version")
#: Bookkeeping keys that ``save_config`` does not write (as diffusers).
_NOT_SAVED = ("_use_default_values", "_ignore_files", "_pre_quantization_dtype")
#: Where the wrapped ``__init__`` leaves the call's explicit argument names for ``_register_config``.
_CALL = "_fastdiff_init_call"


class FrozenConfig(dict):
    """A scheduler's config: a read-only ``dict`` with attribute access (``config.num_train_timesteps``), like
    diffusers' ``FrozenDict``. Deep-copyable and picklable; every mutation raises ``TypeError``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no attribute {name!r}") from None

    def _immutable(self, *args, **kwargs):
        raise TypeError(
            "scheduler config is frozen; build a new scheduler with from_config(config, **changes) or call "
            "register_to_config(**changes)"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _immutable
    update = pop = popitem = setdefault = clear = _immutable

    def __reduce__(self):
        # copy and pickle would rebuild a dict subclass item by item through __setitem__; build it whole
        return (type(self), (dict(self),))


def _json_value(value):
    """``value`` as it is stored in a config and written to JSON: arrays, tensors and tuples as lists, paths as
    POSIX strings, objects with ``to_dict`` as dicts."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if callable(getattr(value, "to_dict", None)):
        return value.to_dict()
    return value


@functools.cache
def _init_params(init) -> tuple[str, ...]:
    """Names of ``init``'s config arguments, in signature order: no ``self``, ``*args``, ``**kwargs`` or
    fastdiff's own arguments."""
    params = list(inspect.signature(init).parameters.values())[1:]
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(p.name for p in params if p.kind not in skip and p.name not in FASTDIFF_INIT_ARGS)


def _record_init_call(init):
    """Wrap a scheduler's ``__init__``: drop private (``_``-prefixed) keyword arguments into the config, as
    diffusers does, and note which arguments the outermost call passed, for ``_register_config``."""
    positional = [
        p.name
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        private = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("_")]}
        outer = _CALL not in self.__dict__
        if outer:  # a subclass __init__ calling super().__init__ must not overwrite its caller's record
            self.__dict__[_CALL] = (set(positional[: len(args)]) | kwargs.keys(), private)
        try:
            init(self, *args, **kwargs)
        finally:
            if outer:
                self.__dict__.pop(_CALL, None)

    __init__._records_config_call = True
    return __init__


class _NotADirectory(NotADirectoryError, AssertionError):
    """diffusers raises AssertionError for a file given as ``save_directory``; this is both, so code catching
    either works."""


class ConfigMixin:
    """diffusers' ``ConfigMixin`` + ``SchedulerMixin`` config surface for fastdiff schedulers.

    A subclass's ``__init__`` takes diffusers' keyword arguments (plus fastdiff's ``backend``) and calls
    ``self._register_config(locals(), backend)`` first. Class attributes as in diffusers: ``config_name``,
    ``ignore_for_config``, ``has_compatibles``, ``_deprecated_kwargs``, ``_compatibles`` (set from
    :data:`COMPATIBLES` by class name unless the class sets it).
    """

    config_name = CONFIG_NAME
    ignore_for_config: list = []
    has_compatibles = True
    _deprecated_kwargs: list = []
    _compatibles: list = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_config_call", False):
            cls.__init__ = _record_init_call(init)
        if "_compatibles" not in cls.__dict__:
            cls._compatibles = list(COMPATIBLES.get(cls.__name__, ()))

    # ------------------------------------------------------------------ recording

    def _register_config(self, local_vars: dict, backend: Optional[str]) -> None:
        """Record the config from the ``locals()`` of ``__init__`` (its first statement), and set the runtime
        attributes every scheduler starts with."""
        params = self._init_keys_ordered()
        missing = [k for k in params if k not in local_vars]
        if missing:
            raise TypeError(
                f"{type(self).__name__}._register_config: `local_vars` lacks the init arguments {missing}; pass "
                "locals() of the class's own __init__"
            )
        passed, private = self.__dict__.get(_CALL, (None, {}))
        config = dict(private)
        config.update((k, _json_value(local_vars[k])) for k in params)
        if passed is not None:
            defaults = [k for k in params if k not in passed]
            if defaults:
                config["_use_default_values"] = defaults
        config["_class_name"] = type(self).__name__
        self._internal_dict = FrozenConfig(config)
        self.backend = backend
        self.last_backend: Optional[str] = None
        self._tables: dict = {}
        self._device_cache: dict = {}
        self._resolved: dict = {}

    def register_to_config(self, **kwargs) -> None:
        """Add or replace config entries (the scheduler keeps what it derived at construction, as in diffusers)."""
        kwargs.pop("kwargs", None)
        current = self.__dict__.get("_internal_dict", {})
        self._internal_dict = FrozenConfig({**current, **{k: _json_value(v) for k, v in kwargs.items()}})

    @property
    def config(self) -> FrozenConfig:
        """The config: every ``__init__`` argument, ``_class_name``, ``_use_default_values`` (the arguments left
        at their defaults) and keys carried from the config this scheduler was built from."""
        return self._internal_dict

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: config keys read as attributes, deprecated as in diffusers
        config = self.__dict__.get("_internal_dict")
        if config is not None and name in config:
            warnings.warn(
                f"reading the config value `{name}` as an attribute of {type(self).__name__} is deprecated (as in "
                f"diffusers); read `scheduler.config.{name}`",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ------------------------------------------------------------------ init keys and compatibles

    @classmethod
    def _init_keys_ordered(cls) -> list:
        ignore = set(cls.ignore_for_config)
        return [k for k in _init_params(cls.__init__) if k not in ignore]

    @classmethod
    def _init_keys(cls) -> set:
        return set(cls._init_keys_ordered())

    @classmethod
    def _get_compatibles(cls) -> list:
        """This class and the fastdiff classes named in its ``_compatibles``."""
        classes = [cls] + [SCHEDULERS[n] for n in cls._compatibles if n in SCHEDULERS]
        return list(dict.fromkeys(classes))

    @property
    def compatibles(self) -> list:
        """The scheduler classes this one's config can build (``cls.from_config(scheduler.config)``): fastdiff's
        classes for the names diffusers lists as compatible, this class included."""
        return self._get_compatibles()

    # ------------------------------------------------------------------ building from a config

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build a scheduler from ``config`` (a config dict such as ``pipe.scheduler.config``, fastdiff's or
        diffusers'; a scheduler object works too) with ``kwargs`` overriding its values, as diffusers does:
        keys the source left at their defaults (``_use_default_values``) are dropped, so this class's defaults
        apply; keys this class does not take are carried into the new config. ``backend=`` picks fastdiff's
        implementation and never enters the config. With ``return_unused_kwargs``, returns
        ``(scheduler, unused)`` where ``unused`` holds the kwargs and config keys that were not init arguments.
        """
        if "pretrained_model_name_or_path" in kwargs:
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is None:
            raise ValueError("`config` is required: pass a scheduler config dict such as `pipe.scheduler.config`")
        if not isinstance(config, Mapping):
            inner = getattr(config, "config", None)
            if isinstance(inner, Mapping):  # a scheduler object
                config = inner
            elif isinstance(config, (str, os.PathLike)):
                warnings.warn(
                    f"passing a path or Hub id to {cls.__name__}.from_config is deprecated (as in diffusers); use "
                    f"{cls.__name__}.from_pretrained({str(config)!r})",
                    FutureWarning,
                    stacklevel=2,
                )
                config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
            else:
                raise TypeError(
                    f"`config` must be a scheduler config mapping (e.g. `scheduler.config`), a scheduler or a path; "
                    f"got {type(config).__name__}"
                )
        backend = kwargs.pop("backend", None)
        init_dict, unused, hidden = cls.extract_init_dict(dict(config), **kwargs)
        for name in cls._deprecated_kwargs:
            if name in unused:
                init_dict[name] = unused.pop(name)
        if backend is not None:
            init_dict["backend"] = backend
        scheduler = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (scheduler, unused) if return_unused_kwargs else scheduler

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple[dict, dict, dict]:
        """Split ``config_dict`` (+ overriding ``kwargs``) as diffusers does: ``(init_dict, unused_kwargs,
        hidden_config)``: the ``__init__`` arguments, the kwargs and config keys not used, and every config key
        not used as an argument (carried into the new config)."""
        used_defaults = set(config_dict.get("_use_default_values", ()))
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k not in _NOT_CARRIED}
        original = dict(config_dict)

        expected = cls._init_keys_ordered()
        expected_set = set(expected)
        # options of compatible classes are expected in a config; of the source class too
        others = set().union(*(c._init_keys() for c in cls._get_compatibles())) - expected_set
        config_dict = {k: v for k, v in config_dict.items() if k not in others}
        source = config_dict.pop("_class_name", cls.__name__)
        source_known = True
        if isinstance(source, str) and source != cls.__name__:
            source_cls = SCHEDULERS.get(source)
            if source_cls is not None:
                unexpected = source_cls._init_keys() - expected_set
                config_dict = {k: v for k, v in config_dict.items() if k not in unexpected}
            else:
                source_known = False
        elif not isinstance(source, (str, list, tuple)):
            raise ValueError(f"`_class_name` in the config must be a class name string, got {source!r}")
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "quantization_config"}

        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
                config_dict.pop(key, None)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)

        if config_dict and source_known:
            logger.warning(
                "%s.from_config ignores the config keys %s: they are not arguments of %s or of a compatible "
                "scheduler (check the %s)",
                cls.__name__,
                config_dict,
                cls.__name__,
                cls.config_name,
            )
        defaults = expected_set - init_dict.keys()
        if defaults:
            logger.debug("%s.from_config: %s not in the config, their defaults apply", cls.__name__, sorted(defaults))

        unused = {**config_dict, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    # ------------------------------------------------------------------ files

    def to_json_string(self) -> str:
        """The config as written by ``save_config``: sorted keys, ``_class_name`` and ``_fastdiff_version``,
        without the ``_use_default_values`` bookkeeping."""
        data = {k: _json_value(v) for k, v in self.config.items() if k not in _NOT_SAVED}
        data["_class_name"] = type(self).__name__
        data["_fastdiff_version"] = __version__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        """Write :meth:`to_json_string` to ``json_file_path``."""
        with open(json_file_path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` into ``save_directory`` (created if missing); diffusers' and
        fastdiff's ``from_pretrained`` read it. With ``push_to_hub``, upload the folder to the Hub repository
        ``repo_id`` (default: the folder's name; ``token``, ``private``, ``commit_message``, ``create_pr``,
        ``subfolder`` as in diffusers)."""
        if os.path.isfile(save_directory):
            raise _NotADirectory(f"`save_directory`={str(save_directory)!r} is a file; expected a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        self.to_json_file(path)
        logger.info("scheduler config saved in %s", path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip(os.path.sep).split(os.path.sep)[-1])
            self._upload_folder(save_directory, repo_id, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Same as :meth:`save_config` (diffusers' scheduler name for it)."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private=None, token=None, **kwargs):
        """Save the config into a temporary folder and upload it to the Hub repository ``repo_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_config(tmp)
            return self._upload_folder(
                tmp, repo_id, commit_message=commit_message, private=private, token=token, **kwargs
            )

    @staticmethod
    def _upload_folder(folder, repo_id, commit_message=None, private=None, token=None, create_pr=False, **kwargs):
        try:
            from huggingface_hub import create_repo, upload_folder
        except ImportError:
            raise ImportError("`push_to_hub` needs huggingface_hub: pip install huggingface_hub") from None
        repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        return upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=kwargs.pop("subfolder", None),
            token=token,
            commit_message=commit_message or "Upload scheduler",
            create_pr=create_pr,
        )

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        **kwargs,
    ):
        """The config dict stored at ``pretrained_model_name_or_path``: a JSON file, a folder holding
        ``scheduler_config.json`` (in ``subfolder`` when given and present), or a Hugging Face Hub repository id
        (downloaded with huggingface_hub; ``cache_dir``, ``force_download``, ``proxies``, ``token``,
        ``local_files_only``, ``revision``, ``subfolder``, ``user_agent``, ``local_dir`` as in diffusers).
        Returns the dict, or a tuple adding the unused ``kwargs`` and/or the commit hash when asked."""
        hub_options = {
            k: kwargs.pop(k)
            for k in (
                "cache_dir",
                "force_download",
                "proxies",
                "token",
                "local_files_only",
                "revision",
                "user_agent",
                "local_dir",
            )
            if k in kwargs
        }
        for ignored in ("mirror", "local_dir_use_symlinks"):
            kwargs.pop(ignored, None)
        subfolder = kwargs.pop("subfolder", None)
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            candidates = ([os.path.join(path, subfolder, cls.config_name)] if subfolder else []) + [
                os.path.join(path, cls.config_name)
            ]
            config_file = next((c for c in candidates if os.path.isfile(c)), None)
            if config_file is None:
                raise OSError(
                    f"`pretrained_model_name_or_path`={path!r} is a folder without {cls.config_name}"
                    + (f" (looked in subfolder {subfolder!r} too)" if subfolder else "")
                )
        else:
            config_file = cls._download_config(path, subfolder, hub_options)
        try:
            with open(config_file, encoding="utf-8") as fh:
                config = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OSError(f"the config file {config_file!r} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise OSError(f"the config file {config_file!r} holds a {type(config).__name__}; expected a JSON object")
        if not (return_unused_kwargs or return_commit_hash):
            return config
        out = (config,)
        if return_unused_kwargs:
            out += (kwargs,)
        if return_commit_hash:
            match = re.search(r"snapshots/([0-9a-f]{40})/", Path(config_file).as_posix())
            out += (match.group(1) if match else None,)
        return out

    @classmethod
    def _download_config(cls, repo_id: str, subfolder, hub_options: dict) -> str:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise OSError(
                f"`pretrained_model_name_or_path`={repo_id!r} is not a local file or folder, and loading from the "
                "Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)"
            ) from None
        try:
            return hf_hub_download(repo_id, filename=cls.config_name, subfolder=subfolder, **hub_options)
        except Exception as exc:  # huggingface_hub's errors: missing repo/revision/file, no network, bad id
            raise OSError(
                f"`pretrained_model_name_or_path`={repo_id!r} is not a local file or folder, and {cls.config_name} "
                f"could not be fetched from the Hugging Face Hub: {type(exc).__name__}: {exc}"
            ) from exc

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None, return_unused_kwargs=False, **kwargs
    ):
        """Build from a saved config: a folder (or file) written by ``save_pretrained`` of fastdiff or diffusers,
        or a Hub repository id (``subfolder="scheduler"`` for a pipeline repository). Loading options as in
        :meth:`load_config`; other ``kwargs`` (config overrides, ``backend``) go to :meth:`from_config`."""
        if pretrained_model_name_or_path is None:
            raise ValueError("`pretrained_model_name_or_path` is required: a folder, a config file or a Hub id")
        config, kwargs, _ = cls.load_config(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            return_unused_kwargs=True,
            return_commit_hash=True,
            **kwargs,
        )
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
