"""The `diffv2-lit` console script's dispatcher (each subcommand has its own tests)."""

import subprocess
import sys

import pytest

from diffv2_lit.cli import LIGHTNING_SUBCOMMANDS, TOOL_SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in (*LIGHTNING_SUBCOMMANDS, *TOOL_SUBCOMMANDS):
        assert f"  {name} " in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(TOOL_SUBCOMMANDS))
def test_every_tool_subcommand_lives_in_cli_and_answers_help(name, capsys):
    """Each tool's `main` is a module of `cli/` (the CLI layer); the dispatcher reaches it by name."""
    module, _ = TOOL_SUBCOMMANDS[name]
    assert module == f"diffv2_lit.cli.{name.replace('-', '_')}"
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code in (0, None)
    assert f"usage: diffv2-lit {name} " in capsys.readouterr().out


def test_python_dash_m_is_the_console_script():
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train-tokenizer" in result.stdout
