"""The press registry: one pluggy plugin manager, the library's only global."""

from __future__ import annotations

import inspect
from functools import lru_cache

import pluggy

from . import hookspecs
from .base import Press

__all__ = ["plugin_manager", "list_presses", "get_press", "press_class", "press_settings"]


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """Created on first use (not at import) from the entry-point group, built-ins included (see hookspecs)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    if not pm.list_name_plugin():
        raise RuntimeError(
            "no kvpress_like plugins are registered, not even the built-in presses: the package metadata is missing "
            "(run from an installed copy: pip install -e .)"
        )
    return pm


def _presses() -> dict[str, type[Press]]:
    found: dict[str, type[Press]] = {}
    for provided in plugin_manager().hook.kvpress_like_presses():
        for name, cls in provided.items():
            if not (isinstance(cls, type) and issubclass(cls, Press)):
                raise TypeError(f"plugin press {name!r} is {cls!r}, not a kvpress_like.Press subclass")
            if name in found and found[name] is not cls:
                raise ValueError(f"two plugins provide a press named {name!r}: {found[name]} and {cls}")
            found[name] = cls
    return found


def list_presses() -> list[str]:
    """Names of every registered press, sorted."""
    return sorted(_presses())


def press_class(name: str) -> type[Press]:
    """The press class registered as ``name``; ``KeyError`` listing valid names otherwise."""
    presses = _presses()
    if name not in presses:
        raise KeyError(f"unknown press {name!r}; registered presses: {', '.join(sorted(presses))}")
    return presses[name]


def get_press(name: str, **settings) -> Press:
    """Instantiate a registered press by name, e.g. ``get_press("qfilters", ratio=0.5)``."""
    return press_class(name)(**settings)


def press_settings(cls: type[Press]) -> set[str]:
    """The settings a press class takes: its constructor's named parameters (a dataclass press's fields; for
    wrapper presses such as AdaKV, whose ``**settings`` go to the press they wrap, the named ones only)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
