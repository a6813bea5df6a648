"""pluggy hook specifications: how built-in and third-party packages contribute presses and services.

A plugin is any module or object with functions marked ``@kvpress_like.hookimpl``. Built-in presses
(``kvpress_like.methods``) and the transformers calibrator (``kvpress_like.integrations.calibration``) are
registered exactly like third-party packages, through the entry-point group ``kvpress_like`` in
``pyproject.toml``, so the core never imports the layers above it::

    [project.entry-points.kvpress_like]
    my_press = "my_package.plugin"
"""

from __future__ import annotations

import pluggy

PROJECT = "kvpress_like"
#: Entry-point group scanned for third-party plugins.
ENTRY_POINT_GROUP = "kvpress_like"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvpress_like_presses() -> dict[str, type]:
    """Return the presses this plugin provides, as ``{name: Press subclass}``.

    Names are what users type in ``get_press(name)``, the CLI and ``lm_eval --model_args press=name``;
    two plugins providing the same name is an error.
    """


@hookspec(firstresult=True)
def kvpress_like_calibrate(model, tokenizer):
    """Calibrate ``model`` on the offline corpus: a :class:`kvpress_like.calibration.CalibrationResult`, or
    ``None`` when this plugin cannot. The filter store calls it the first time an embedded model needs
    Q-Filters or query statistics."""
