"""The command line: fast, torch-free ``--help`` that matches the real parsers, and documented options."""

import json
import subprocess
import sys
import time
import warnings

import pytest

from kvpress_like import cli

HELP_PATHS = [list(path) for path in cli.commands()]


def test_every_help_is_fast_and_imports_neither_torch_nor_transformers():
    stale = [" ".join(path) for path in cli.commands() if cli._stored_help(path) is None]
    assert not stale, f"stored help missing or stale for {stale}: run python -m kvpress_like.cli --refresh-help"
    code = (
        "import sys, io, contextlib\n"
        "from kvpress_like.cli import commands, main\n"
        f"for path in [[], *{HELP_PATHS!r}, ['eval'], ['bench']]:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            rc = main([*path, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        rc = exit.code\n"
        "    assert rc == 0, (path, rc)\n"
        "    assert out.getvalue().startswith('usage: kvpress-like ' + ' '.join(path)), out.getvalue()[:200]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # One interpreter start plus every help: 0.1-0.3 s on an idle machine; 10 s allows a very loaded one
    # (importing torch alone takes 5-30 s here, so this also fails if a help imports it).
    assert time.perf_counter() - start < 10


def test_stored_help_is_what_the_real_parsers_print():
    stored = json.loads(cli.HELP_FILE.read_text())
    for path, (module, _) in cli.commands().items():
        key = " ".join(path)
        assert key in stored, f"no stored help for {key!r}: run python -m kvpress_like.cli --refresh-help"
        assert stored[key]["help"] == cli.command_parser(path).format_help(), (
            f"stored help of {key!r} is stale: run python -m kvpress_like.cli --refresh-help"
        )
        assert stored[key]["configure_sha1"] == cli._configure_source_hash(module)


@pytest.mark.parametrize("path", HELP_PATHS, ids=" ".join)
def test_every_option_has_a_help_text_without_rest_markup(path):
    parser = cli.command_parser(tuple(path))
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented, f"kvpress-like {' '.join(path)}: options without help: {undocumented}"
    assert "``" not in parser.format_help() and ":func:" not in parser.format_help()


def test_top_level_description_has_no_rest_markup():
    assert cli._top_parser().description == "kvpress-like: one command line for the demo, calibration, evaluations and benchmarks."
    assert cli.plain("see :func:`~kvpress_like.press` and ``x``") == "see kvpress_like.press and x"


def test_unknown_command_and_stale_help_fall_back_to_argparse(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        cli.main(["no-such-command"])
    assert exit.value.code == 2 and "invalid choice: 'no-such-command'" in capsys.readouterr().err
    # A changed configure() (hash mismatch) renders the help live instead of printing stale text.
    monkeypatch.setattr(cli, "_configure_source_hash", lambda module: "changed")
    assert cli._stored_help(("demo",)) is None
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--help"])
    assert exit.value.code == 0 and "--context-tokens" in capsys.readouterr().out


def test_project_deprecation_warnings_are_errors():
    """pyproject's filterwarnings: a FutureWarning/DeprecationWarning attributed to our code fails the suite."""
    for category in (FutureWarning, DeprecationWarning):
        for module in ("kvpress_like.cli.demo", "kvpress_like.methods.snapkv", "test_core"):
            with pytest.raises(category):
                warnings.warn_explicit("deprecated", category, "x.py", 1, module=module)
        with pytest.warns(category):  # other libraries' deprecations only warn
            warnings.warn_explicit("deprecated", category, "x.py", 1, module="transformers.x")
