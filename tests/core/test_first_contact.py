"""What a new user meets first: input errors in one line before any heavy import, and outputs that explain themselves."""

import re
import subprocess
import sys

import pytest

from kvpress_like import cli
from kvpress_like.cli.demo import compression_ratio, uncompressed_note
from kvpress_like.models import check_model_name

CONTEXT = "Ada Lovelace wrote the first published program for Babbage's Analytical Engine in 1843. " * 6


def _ask_without_torch(tmp_path, *argv) -> subprocess.CompletedProcess:
    """``kvpress-like ask ARGV`` in a fresh interpreter that fails if torch gets imported before the error."""
    code = (
        "import sys\nfrom kvpress_like.cli import main\n"
        f"rc = main(['ask', *{list(argv)!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported before the input error'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/no/such/dir", "--context", "doc.txt", "--question", "Who?"],
         "model directory /no/such/dir does not exist; embedded models: smollm2-135m, gemma3-270m."),
        (["--model", "smollm2", "--context", "doc.txt", "--question", "Who?"],
         "did you mean the embedded model 'smollm2-135m'?"),
        (["--model", "not-a-model-xyz", "--context", "doc.txt", "--question", "Who?"],
         "the Hugging Face hub cannot be reached (offline)"),
        (["--context", "doc.txt", "--question", ""], "--question number 1 is empty"),
        (["--context", "doc.txt", "--question", "Who?", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--context", "empty.txt", "--question", "Who?"], "the context file empty.txt is empty"),
        (["--context", "missing.txt", "--question", "Who?"], "cannot read --context"),
    ],
)
def test_ask_input_errors_are_one_line_and_come_before_torch(tmp_path, argv, message):
    (tmp_path / "doc.txt").write_text(CONTEXT)
    (tmp_path / "empty.txt").write_text("\n")
    result = _ask_without_torch(tmp_path, *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvpress-like ask: ")
    assert message in result.stderr


def test_model_names_that_load_pass_the_check(tiny_model_dir):
    check_model_name("smollm2-135m")
    check_model_name(str(tiny_model_dir))
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_name(str(tiny_model_dir.parent))


def test_ask_without_press_says_so_and_shows_prefill_progress(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    assert cli.main(["ask", "--model", str(tiny_model_dir), "--context", str(doc), "--question", "Who?", "--press",
                     "none", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "prefilled once (full cache, no press)" in captured.out and "compressed" not in captured.out
    assert "prefilling the context" in captured.err and "4/4" in captured.err  # one step per decoder layer


def test_ask_help_shows_defaults_and_version_is_printed(capsys):
    assert cli.main(["ask", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: adakv:base=kvzip:normalization=none:scope=model," in out and "(default: 0.75)" in out
    assert "(default: smollm2-135m)" in out
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("kvpress-like 0.1")


def test_demo_compression_accepts_a_factor_or_a_ratio():
    assert compression_ratio(4) == (0.75, 4)
    ratio, fold = compression_ratio(0.875)
    assert ratio == 0.875 and fold == pytest.approx(8)
    with pytest.raises(ValueError, match="x-fold factor >= 1 .* or a ratio in \\[0, 1\\)"):
        compression_ratio(-2)


def test_demo_explains_layers_left_uncompressed():
    from kvpress_like.cache import PressedLayer

    pressed = object.__new__(PressedLayer)
    note = uncompressed_note([object(), pressed, object(), pressed], [512, None, 512, None])
    assert note == ("2 of 4 layers compressed; 2 are sliding-window layers (window 512) that already hold fewer tokens "
                    "than the press would keep, so KV bytes shrink less than x-fold")
    assert uncompressed_note([pressed, pressed], [None, None]) is None


def test_benchmark_note_states_the_measured_cell_or_says_it_was_not_measured():
    from kvpress_like.evaluations.support import benchmark_note

    note = benchmark_note("smollm2-135m", "qfilters", 0.875)
    assert note.startswith("offline RULER-style benchmark (smollm2-135m, 2048 tokens): qfilters x8 scored ")
    assert re.search(r"scored \d+% \[\d+, \d+\] vs \d+% with no press \(n=\d+ prompts", note), note
    assert "was not measured" in benchmark_note("smollm2-135m", "qfilters", 0.6)
    from kvpress_like.cli.ask import DEFAULT_PRESS, DEFAULT_RATIO  # ask's default is a measured cell

    assert " scored " in benchmark_note("smollm2-135m", DEFAULT_PRESS, DEFAULT_RATIO)
    # a 3.7k-token document is told the 4k cell, with the 4k report
    long = benchmark_note("smollm2-135m", "qfilters", 0.875, tokens=3700)
    assert long.startswith("offline RULER-style benchmark (smollm2-135m, 4096 tokens): qfilters x8 scored ")
    assert long.endswith("see evaluations/results/ruler.4k.md") and long != note
    assert benchmark_note("smollm2-135m", "qfilters", 0.875, tokens=1500) == note
    assert benchmark_note("some/other-model", "qfilters", 0.875) is None
