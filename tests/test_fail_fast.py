"""Requests a run can never satisfy end at once: the field job exits non-zero within a minute with one
line naming the key and no traceback, instead of waiting for ever (resources a fixed-size Ray
instance cannot place) or failing mid-run (an output that cannot be written)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from galgan_ray.errors import ConfigError
from galgan_ray.ray_shell.job import check_output
from galgan_ray.storage import StorageConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_FIELD = ["--set", "simulate.n_tiles_x=1", "--set", "simulate.n_tiles_y=1",
              "--set", "simulate.tile_inner_arcsec=14.4"]


def run_job(cwd: Path, *overrides: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``jobs/process_field.py`` on a tiny simulated field with its own local Ray (2 CPUs)."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, str(ROOT / "jobs" / "process_field.py"), *TINY_FIELD]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=180, check=False)
    return proc, time.monotonic() - t0


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.ray
@pytest.mark.parametrize("override, key", [
    ("compute.num_cpus=0", "compute.num_cpus"),  # a local instance without CPUs
    ("compute.stage_num_cpus=5", "compute.stage_num_cpus"),  # more CPUs per actor than the 2-CPU instance has
    ("compute.enhance_num_gpus=1", "compute.enhance_num_gpus"),  # a GPU on an instance without any
])
def test_impossible_resources_end_within_a_minute_naming_the_key(tmp_path, override, key):
    if key == "compute.enhance_num_gpus":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: the request can be placed")
    proc, seconds = run_job(tmp_path, f"output={tmp_path / 'out'}", override)
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds)
    assert one_error_line(proc).startswith(f"error: {key}: ")
    assert not (tmp_path / "out" / "catalog").exists()


def test_an_output_below_a_regular_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    proc, seconds = run_job(tmp_path, f"output={tmp_path / 'notes.txt' / 'run'}")
    assert proc.returncode == 2 and seconds < 60
    line = one_error_line(proc)
    assert line.startswith("error: output: ") and "notes.txt, a regular file" in line
    assert "Started a local Ray instance" not in proc.stderr  # refused before Ray or the simulation


def test_an_unreachable_object_store_is_one_line_at_once(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc, seconds = run_job(tmp_path, "output=s3://galgan-bucket/run", f"storage.endpoint_url=http://127.0.0.1:{port}",
                            env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    assert proc.returncode == 2 and seconds < 60
    line = one_error_line(proc)
    assert line.startswith("error: output: s3://galgan-bucket/run cannot be written (EndpointConnectionError")


def test_local_outputs_are_made_absolute_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert check_output("runs/a") == str(tmp_path / "runs" / "a") and (tmp_path / "runs" / "a").is_dir()
    assert not list((tmp_path / "runs" / "a").iterdir())  # the write probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^output: .*file is a regular file, not a folder"):
        check_output(str(tmp_path / "file"))
    assert check_output("memory://galgan-check/run", StorageConfig()) == "memory://galgan-check/run"


def test_a_relative_output_under_ray_job_submit_is_refused(tmp_path, monkeypatch):
    """A submitted job runs in Ray's copy of the working directory; its relative output would vanish."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    with pytest.raises(ConfigError, match=r"^output: 'output' is a relative path.*raysubmit_1.*output=\$PWD/output"):
        check_output("output")
    assert not (tmp_path / "output").exists()
    assert check_output(str(tmp_path / "abs")) == str(tmp_path / "abs")


def _closed_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [["deblend", "image.fits"], ["enhance", "image.fits"], ["evaluate"]])
@pytest.mark.parametrize("where", ["below_a_file", "a_folder", "unreachable_s3"])
def test_single_image_commands_check_their_output_before_any_work(command, where, tmp_path, monkeypatch, capsys):
    """`galgan deblend`, `enhance` and `evaluate` refuse an output they could never write with one line
    naming the option, before reading the image or building a benchmark (no traceback)."""
    from galgan_ray.cli import main

    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    if where == "unreachable_s3":
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        if command[0] != "deblend":
            pytest.skip("enhance and evaluate write local files only")
        out, expect = "s3://galgan-bucket/cat.parquet", "cannot be written (EndpointConnectionError"
    elif where == "a_folder":
        if command[0] == "evaluate":
            pytest.skip("evaluate writes a folder")
        out, expect = str(tmp_path / "a_folder"), "is a folder, not a file"
    else:
        out, expect = str(tmp_path / "notes.txt" / "out"), "regular file, not a folder"
    t0 = time.monotonic()
    assert main([*command, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert time.monotonic() - t0 < 30
    assert len(err) == 1 and err[0].startswith(f"galgan {command[0]}: error: --out: ") and expect in err[0], err
