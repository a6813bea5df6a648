"""The press registry: one pluggy plugin manager, the library's only global."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import pluggy

from . import hookspecs
from .base import Press

__all__ = [
    "plugin_manager", "list_presses", "get_press", "press_class", "press_settings", "accepted_settings", "resolve_press", "UnknownPress",
    "UnknownSettings",
]


class UnknownPress(KeyError, ValueError):
    """A press name nobody registered. A ``KeyError`` (a failed look-up, as ``get_press`` always raised) and a
    ``ValueError`` (bad input, as front-ends report it); the message lists the registered names."""

    def __str__(self) -> str:  # KeyError's str() quotes its argument
        return str(self.args[0])


class UnknownSettings(ValueError):
    """Settings a press does not take; ``unknown`` and ``valid`` let a front-end word it in its own terms."""

    def __init__(self, name: str, unknown: list[str], valid: list[str]):
        self.name, self.unknown, self.valid = name, unknown, valid
        super().__init__(f"{', '.join(unknown)} do not apply to press {name}; its settings: {', '.join(valid)}")


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
        raise UnknownPress(f"unknown press {name!r}; registered presses: {', '.join(sorted(presses))}")
    return presses[name]


def get_press(name: str, **settings) -> Press:
    """Instantiate a registered press by name, e.g. ``get_press("qfilters", ratio=0.5)``."""
    return resolve_press(name, settings)


def resolve_press(p: Press | str | None, settings: Mapping[str, Any] | None = None, *, parse: bool = False) -> Press | None:
    """The one way every front-end (``press()``, the pipeline, lm-eval, ``ask``, evaluations) turns what a user
    gave into a press: an instance as is, a registered name built with ``settings``, or ``None``.

    Settings a press class does not take fail here (:class:`UnknownSettings`, naming the valid ones) rather
    than deep in a constructor; a wrapper press whose constructor takes ``**settings`` (AdaKV) forwards them
    and checks them itself. ``parse=True``: values come from text (a command line, ``--model_args``) and are
    converted to each field's annotated type (``"0;1"`` -> ``(0, 1)``, ``"true"`` -> ``True``).

    A name may carry settings of its own, ``name:key=value:key=value`` (e.g. ``adakv:base=kvzip:scope=model``),
    parsed as text: one string names a configured press on any command line or in a results table.
    """
    settings = dict(settings or {})
    if isinstance(p, str) and ":" in p:
        p, own = _split_spec(p)
        settings, parse = {**own, **settings}, True
    if isinstance(p, str):
        cls = press_class(p)
        valid = press_settings(cls)
        unknown = sorted(set(settings) - valid)
        if unknown and not _forwards_settings(cls):
            raise UnknownSettings(p, unknown, sorted(valid))
        if parse:
            hints = {**_init_hints(cls), **typing.get_type_hints(cls)}  # a wrapper's own arguments too
            settings = {key: _parse(key, value, hints.get(key, Any)) for key, value in settings.items()}
        return cls(**settings)
    if settings:
        raise TypeError(
            f"press settings ({', '.join(sorted(settings))}) go with a press name, e.g. press(model, 'knorm', "
            "ratio=0.5); set them on the instance instead."
        )
    if p is not None and not isinstance(p, Press):
        raise TypeError(f"a press must be a kvpress_like Press, a registered name or None, got {type(p).__name__}")
    return p


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, *options = spec.split(":")
    own = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"press {spec!r}: write its settings as name:key=value:key=value, got {option!r}")
        own[key.strip()] = value.strip()
    return name.strip(), own


def _init_hints(cls: type[Press]) -> dict:
    """The constructor's annotations, or none where they cannot be resolved: a dataclass's generated
    ``__init__`` resolves names in the subclass's module, so a field a base class annotates with a name only
    its own module imports (``os.PathLike``) fails there; ``get_type_hints(cls)`` covers fields per module."""
    try:
        return typing.get_type_hints(cls.__init__)
    except NameError:
        return {}


def _forwards_settings(cls: type[Press]) -> bool:
    """Whether the constructor takes ``**settings`` (a wrapper handing them to the press it builds)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def _parse(name: str, value: Any, hint: Any) -> Any:
    """A setting given as text (or as what a command-line parser made of it) converted to its field's type."""
    if hint is Any:  # not declared here (a setting a wrapper forwards parses where it lands)
        return value
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in args:
            return None
        if value is not None and str in args:  # the word itself, e.g. normalization="none"
            return value
        raise ValueError(f"{name} cannot be None.")
    if bool in args:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    if any(typing.get_origin(a) is tuple for a in args):
        items = [value] if isinstance(value, int) else value
        if isinstance(items, str):
            items = [s for s in re.split(r"[,;:|+\s]+", items.strip("[]() ")) if s]
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be integers such as [0,1] or 0;1, got {value!r}.") from None
    if int in args:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if float in args:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}.") from None
    return str(value) if isinstance(value, (int, float)) else value


def accepted_settings(p: Press | str | None) -> set[str]:
    """The keyword settings that belong to ``p`` (a registered name, a ``name:key=value`` spec, or an instance,
    whose own fields are named so that :func:`resolve_press` can refuse them clearly): a wrapper forwarding
    ``**settings`` (AdaKV) accepts those of every registered press."""
    if p is None:
        return set()
    cls = press_class(_split_spec(p)[0]) if isinstance(p, str) else type(p)
    if not _forwards_settings(cls):
        return press_settings(cls)
    return press_settings(cls).union(*(press_settings(press_class(name)) for name in list_presses()))


def press_settings(cls: type[Press]) -> set[str]:
    """The settings a press class takes: its constructor's named parameters (a dataclass press's fields; for
    wrapper presses such as AdaKV, whose ``**settings`` go to the press they wrap, the named ones only)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
