"""pluggy hook specifications: how built-in and third-party packages contribute presses.

A plugin is any module or object with functions marked ``@kvpress_like.hookimpl``. Third-party packages
expose one through the entry-point group ``kvpress_like`` in their ``pyproject.toml``::

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
