"""The one place kvpress_like leans on private parts of transformers' ``generate()`` (ARCHITECTURE.md lists
the other private internals it uses).

``press(model, p, static=True)`` must hand ``generate()`` a :class:`~kvpress_like.static.StaticPressedCache`
sized from the prompt (a caller-built cache would need the prompt length before ``generate()`` sees it),
keep the prefill out of ``torch.compile``, and compile decode steps on CPU when asked. transformers has no
public hook for any of the three, so :func:`static_generation` wraps two private methods of the model
*instance* (``_prepare_cache_for_generation`` and ``_prefill``, undone on exit) and sets
``CompileConfig._compile_all_devices``. :func:`check_generation_internals` verifies, before anything is
wrapped, that those internals still have the shape this module was written against, and otherwise fails
naming the installed transformers version.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import ExitStack

from torch import nn

from .transformers import cache_keyword

__all__ = ["check_generation_internals", "static_generation", "compile_settings"]

#: Private methods wrapped, with the parameters (after ``self``) they are called with.
WRAPPED = {
    "_prepare_cache_for_generation": ("generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"),
    "_prefill": ("input_ids", "generation_config", "model_kwargs"),
}


def check_generation_internals(model: nn.Module) -> None:
    """Raise ``RuntimeError`` when the private generation internals differ from what we wrap."""
    import transformers
    from transformers import CompileConfig

    problems = []
    for name, expected in WRAPPED.items():
        method = getattr(type(model), name, None)
        if method is None:
            problems.append(f"{type(model).__name__}.{name} is gone")
            continue
        params = tuple(inspect.signature(method).parameters)[1:]
        if params[: len(expected)] != expected:
            problems.append(f"{name}{params} (expected {expected} first)")
    if not hasattr(CompileConfig, "_compile_all_devices"):
        problems.append("CompileConfig._compile_all_devices is gone")
    if problems:
        raise RuntimeError(
            f"press(..., static=True) wraps private transformers internals that changed in transformers "
            f"{transformers.__version__}: {'; '.join(problems)}. Use static=False (the dynamic cache uses only public "
            "APIs), or a transformers version kvpress_like supports."
        )


def static_generation(model: nn.Module, make_cache: Callable[[int, int], object], stack: ExitStack) -> None:
    """Make ``generate()`` build its cache with ``make_cache(prompt_tokens, max_cache_length)`` when the caller
    passes none, and run the prefill with compilation disabled (generate() decides about compiling the
    decode steps before the prefill, so they still compile). Undone by ``stack``."""
    check_generation_internals(model)
    prepare, prefill = model._prepare_cache_for_generation, model._prefill
    keyword = cache_keyword()

    def prepare_cache(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        if (model_kwargs.get(keyword) is not None or generation_config.use_cache is False
                or generation_config.cache_implementation is not None):
            return prepare(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):  # the model then sees a 4-D mask only
            raise ValueError(
                "press(..., static=True) got a padded batch: the static compressed cache has one length for every "
                "row. Use static=False (padded batches are compressed row by row) or run the prompts one at a time."
            )
        prompt = model_kwargs.get("position_ids")
        if prompt is None:
            prompt = mask
        prompt_tokens = prompt.shape[-1] if prompt is not None else max_cache_length
        model_kwargs[keyword] = make_cache(prompt_tokens, max_cache_length)

    def eager_prefill(*args, **kwargs):
        generation_config = kwargs["generation_config"] if "generation_config" in kwargs else args[1]
        disabled = generation_config.disable_compile
        generation_config.disable_compile = True  # read by the chunked prefill only, after decode's choice
        try:
            return prefill(*args, **kwargs)
        finally:
            generation_config.disable_compile = disabled

    for name, wrapper in (("_prepare_cache_for_generation", prepare_cache), ("_prefill", eager_prefill)):
        if name in model.__dict__:
            stack.callback(setattr, model, name, model.__dict__[name])
        else:
            stack.callback(delattr, model, name)
        setattr(model, name, wrapper)


def compile_settings(generation_config, compile, stack: ExitStack) -> None:
    """Apply press()'s ``compile`` option (None, bool or ``CompileConfig``) to a generation config, restored
    by ``stack``. ``True``/a config compiles on every device, CPU included."""
    from transformers import CompileConfig

    if compile is None:
        return
    if compile is False:
        stack.callback(setattr, generation_config, "disable_compile", generation_config.disable_compile)
        generation_config.disable_compile = True
        return
    if compile is True:
        compile = CompileConfig()
    if not isinstance(compile, CompileConfig):
        raise TypeError(f"compile must be None, a bool or a transformers.CompileConfig, got {type(compile).__name__}")
    compile = copy.copy(compile)
    compile._compile_all_devices = True  # transformers otherwise compiles only on accelerators
    stack.callback(setattr, generation_config, "compile_config", generation_config.compile_config)
    stack.callback(setattr, generation_config, "disable_compile", generation_config.disable_compile)
    generation_config.compile_config = compile
    generation_config.disable_compile = False
