"""Progress bars: on standard error when it is a terminal (or GALGAN_PROGRESS=1), never on standard
output, off under ``galgan -q`` or GALGAN_PROGRESS=0, and no tqdm import or drawing in the core otherwise."""
import subprocess
import sys

import pytest

from galgan_ray import cli
from galgan_ray.progress import ENV_VAR, progress, progress_enabled, progress_setting, set_progress


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    before = set_progress(None)
    yield
    set_progress(before)


def test_no_bar_where_stderr_is_not_a_terminal(capsys):
    items = [1, 2, 3]
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    assert progress(items, desc="work") is items
    assert capsys.readouterr().err == ""


def test_a_forced_bar_goes_to_stderr_and_leaves_the_items_and_stdout_alone(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "1")
    assert list(progress(range(5), desc="work", unit="tile")) == [0, 1, 2, 3, 4]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "work" in captured.err and "/5 " in captured.err  # the bar (erased when done: leave=False)


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True), ("yes", True), ("", None)])
def test_the_environment_switch(monkeypatch, value, expected):
    monkeypatch.setenv(ENV_VAR, value)
    assert progress_setting() is expected


def test_set_progress_beats_the_environment_and_returns_the_previous_switch(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    assert set_progress(False) is None
    assert not progress_enabled() and progress_setting() is False
    assert set_progress(None) is False
    assert progress_enabled()


def test_galgan_quiet_lasts_one_command(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("galgan_ray.commands.flags.run", lambda args: seen.append(progress_setting()) or 0)
    assert cli.main(["-q", "flags", "1"]) == 0
    assert seen == [False] and progress_setting() is None


def test_importing_the_helper_does_not_import_tqdm():
    code = "import sys, galgan_ray.progress; print('tqdm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
