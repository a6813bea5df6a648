"""Make ``lm_eval --model qfilters-hf`` work with the stock lm-eval CLI, without importing anything early.

lm-eval 0.4.x looks models up only in its own registry (``lm_eval.api.registry.model_registry``), filled
when ``lm_eval.models`` is imported; it has no entry-point discovery for models. Installing kvpress_like
therefore also installs ``kvpress_like_lm_eval.pth`` next to a copy of this module (named
``_kvpress_like_lm_eval_hook``; see ``setup.py``). At interpreter start-up the ``.pth`` line runs
:func:`install`, which only puts a small finder on ``sys.meta_path``: standard library only, no torch, no
lm-eval, nothing else imported. The finder does nothing until some code imports ``lm_eval.models`` (lm-eval
does before its first model lookup); it lets that import run unchanged and then registers ``qfilters-hf``
as a *lazy* placeholder for ``kvpress_like.integrations.lm_eval:QFiltersHFLM``, so kvpress_like itself is
imported only when lm-eval instantiates the model. Without lm-eval installed the finder never fires.

This file is copied at build time, so an editable install picks up changes to it only after
``pip install -e .`` again (changes to the model class itself need no reinstall).
"""

from __future__ import annotations

import sys
import warnings

TRIGGER = "lm_eval.models"
MODEL_NAME = "qfilters-hf"
MODEL_TARGET = "kvpress_like.integrations.lm_eval:QFiltersHFLM"
_MARK = "_kvpress_like_lm_eval_finder"


def register() -> None:
    """Register ``qfilters-hf`` in lm-eval's model registry (lazily when the registry supports it)."""
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval without the lazy Registry (< 0.4.9): the class registers itself on import
        import importlib

        importlib.import_module(MODEL_TARGET.partition(":")[0])
        return
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisteringLoader:
    """Wraps the real loader of ``lm_eval.models``: executes the module, then registers our model."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register()
        except Exception as err:  # never break lm-eval because of us
            warnings.warn(f"kvpress_like could not register the lm-eval model {MODEL_NAME!r}: {err}", stacklevel=2)


class LmEvalFinder:
    """``sys.meta_path`` entry that only reacts to the import of ``lm_eval.models``."""

    _kvpress_like_lm_eval_finder = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            if getattr(finder, _MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent); register now if lm-eval is already loaded."""
    if not any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, LmEvalFinder())
    if TRIGGER in sys.modules:
        register()
