"""Lazy package exports: a name is imported from its submodule on first access.

Keeps ``import diffusers_repa`` (and ``diffusers_repa.training.ema``) from pulling in datasets, peft, pyarrow and
friends, so that a machine with only torch, transformers, accelerate and diffusers can run the model and benchmarks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[list[str], Callable, Callable]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` given ``{submodule: [names]}``."""
    name_to_module = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in name_to_module:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{name_to_module[name]}", package)
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(name_to_module))

    return sorted(name_to_module), __getattr__, __dir__
