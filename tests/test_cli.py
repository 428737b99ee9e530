"""The command line: help documents every command; the demo runs end to end and converges."""

import pytest

from bayestwin.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "simulate a 3-therapy cohort" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "usage: bayestwin" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_prints_forecast_table_and_passes(capsys):
    assert main(["demo", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for therapy in ("standard", "drug_a", "drug_b"):
        assert therapy in out
    assert "P(best)" in out and "q05" in out and "q95" in out
    assert "Convergence verdict: PASS" in out
