"""The allowlist of objects medseg builds from `_target_` configs, and the only way it builds
them (:func:`trusted_instantiate`).

Checkpoints carry the loss, optimizer and scheduler configs they were trained with as plain
strings, which ``torch.load(weights_only=True)`` lets through; Hydra's ``instantiate`` would
import and call whatever they name (its blocklist stops only a few names). So every
`_target_` is checked before anything is imported: its module must be one its kind allows,
its name one public identifier (no attribute chains such as ``SGD.__init__``), and the
object it names must be of the kind (a loss is an ``nn.Module``, ...). Strings holding an
OmegaConf interpolation (``${...}``) are refused too: ``instantiate`` would resolve them, and
resolvers read environment variables and files. medseg stores resolved configs only.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from medseg.errors import ConfigError

TARGET_KEY = "_target_"
INTERPOLATION = "an interpolation (${...}): medseg builds objects from resolved configs only"


@dataclass(frozen=True)
class TargetKind:
    """What a `_target_` of one kind may name: a public attribute of one of `modules` that is a
    subclass of one of `bases`, or a function defined in one of `factory_modules`."""

    name: str
    modules: tuple[str, ...]
    bases: tuple[type, ...]
    factory_modules: tuple[str, ...] = ()

    def describe(self) -> str:
        """Why a target was refused, with what is allowed (a phrase that follows "is")."""
        bases = " or ".join(self._public_name(base) for base in self.bases)
        allowed = f"{bases} subclasses in {', '.join(self.modules)}"
        if self.factory_modules:
            allowed += f"; functions of {', '.join(self.factory_modules)}"
        article = "an" if self.name[0] in "aeiou" else "a"
        return f"not {article} {self.name} medseg can build (allowed: {allowed})"

    def _public_name(self, base: type) -> str:
        """``torch.nn.Module`` rather than ``torch.nn.modules.module.Module``."""
        for module in self.modules:
            if getattr(importlib.import_module(module), base.__name__, None) is base:
                return f"{module}.{base.__name__}"
        return f"{base.__module__}.{base.__qualname__}"

    def allows(self, target: str) -> bool:
        """Whether `target` names an object of this kind (imports only allowed modules)."""
        module, _, name = target.rpartition(".")
        if module not in self.modules or not name.isidentifier() or name.startswith("_"):
            return False
        found = getattr(importlib.import_module(module), name, None)
        if inspect.isclass(found):
            return issubclass(found, self.bases)
        return inspect.isfunction(found) and (
            module in self.factory_modules and found.__module__ == module
        )


KINDS = {
    kind.name: kind
    for kind in (
        TargetKind("loss", ("medseg.losses", "torch.nn"), (nn.Module,)),
        TargetKind("optimizer", ("torch.optim",), (Optimizer,)),
        TargetKind(
            "scheduler",
            ("torch.optim.lr_scheduler", "medseg.schedulers"),
            (LRScheduler, ReduceLROnPlateau),
            factory_modules=("medseg.schedulers",),
        ),
    )
}


@dataclass(frozen=True)
class Refusal:
    """A value medseg will not build from: its dotted key, the value, and why (a phrase that
    follows "is": ``not a loss medseg can build (...)``)."""

    key: str
    value: Any
    problem: str

    def __str__(self) -> str:
        return f"{self.key}: {self.value!r} is {self.problem}"


def find_untrusted(config: Any, kinds: Mapping[str, str], key: str = "") -> Refusal | None:
    """The first value of `config` that medseg must not build from, or None.

    `kinds` maps the dotted keys of the `_target_` configs in `config` (``[]`` for any list
    index: ``stages[].optim.optimizer``) to their kind; a `_target_` anywhere else is
    refused, and so is every string holding an interpolation. Only modules a kind allows
    are imported. `key` is where `config` itself is.
    """
    if OmegaConf.is_config(config):  # reading its values would resolve interpolations
        config = OmegaConf.to_container(config, resolve=False)
    return _walk(config, kinds, key, _kind_at(kinds, key, None))


def check_trusted(config: Any, kind: str, key: str) -> None:
    """A ConfigError naming the config key unless every `_target_` in `config` (at config
    key `key`) names an object of `kind`."""
    refusal = find_untrusted(config, {_any_index(key): kind}, key)
    if refusal is not None:
        raise ConfigError(str(refusal))


def trusted_instantiate(config: Mapping, kind: str, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(config, **kwargs)`` after :func:`check_trusted`."""
    check_trusted(config, kind, key)
    return instantiate(config, **kwargs)


def _walk(value: Any, kinds: Mapping[str, str], key: str, kind: str | None) -> Refusal | None:
    if isinstance(value, str):
        if "${" in value:
            return Refusal(key, value, INTERPOLATION)
        return None
    if isinstance(value, Mapping):
        if TARGET_KEY in value:
            refusal = _check_target(value[TARGET_KEY], _join(key, TARGET_KEY), kind)
            if refusal is not None:
                return refusal
        children = ((_join(key, str(k)), v) for k, v in value.items())
    elif isinstance(value, Sequence) and not isinstance(value, bytes):
        children = ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for child_key, child in children:
        refusal = _walk(child, kinds, child_key, _kind_at(kinds, child_key, kind))
        if refusal is not None:
            return refusal
    return None


def _check_target(target: Any, key: str, kind: str | None) -> Refusal | None:
    if kind is None:
        return Refusal(key, target, "in a place where medseg builds no object")
    if isinstance(target, str) and "${" in target:
        return Refusal(key, target, INTERPOLATION)
    if isinstance(target, str) and KINDS[kind].allows(target):
        return None
    return Refusal(key, target, KINDS[kind].describe())


def _kind_at(kinds: Mapping[str, str], key: str, inherited: str | None) -> str | None:
    return kinds.get(_any_index(key), inherited)


def _any_index(key: str) -> str:
    return re.sub(r"\[\d+\]", "[]", key)


def _join(key: str, child: str) -> str:
    return f"{key}.{child}" if key else child
