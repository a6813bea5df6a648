"""Build step that pyproject.toml cannot express: ship ``kvpress_like_lm_eval.pth`` at the install root.

The ``.pth`` file and its tiny hook module (a copy of ``integrations/lm_eval_hook.py``) let the stock
``lm_eval`` CLI find ``--model qfilters-hf`` without importing torch or lm-eval at start-up; see that
module's docstring. All metadata lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = Path(__file__).parent / "integrations" / "lm_eval_hook.py"
ROOT_FILES = {
    "_kvpress_like_lm_eval_hook.py": HOOK.read_text(encoding="utf-8"),
    "kvpress_like_lm_eval.pth": "import _kvpress_like_lm_eval_hook; _kvpress_like_lm_eval_hook.install()\n",
}


class BuildPyWithPth(build_py):
    """``build_py`` that also writes :data:`ROOT_FILES` at the root of what gets installed."""

    def run(self) -> None:
        super().run()
        # A regular wheel installs build_lib's root into site-packages. An editable wheel ignores build_lib
        # and ships the files setuptools' editable_wheel writes into the wheel root, its `install_lib`.
        root = Path(self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib)
        root.mkdir(parents=True, exist_ok=True)
        for name, text in ROOT_FILES.items():
            (root / name).write_text(text, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib, name)) for name in ROOT_FILES]


setup(cmdclass={"build_py": BuildPyWithPth})
