"""The cluster launcher YAMLs are valid for Ray's own schema and say what each key is for; the README's
`ray job submit` commands run as printed on a local head node."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))


def test_there_are_aws_and_gcp_configs():
    assert {p.stem for p in CONFIGS} >= {"aws", "gcp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validates_against_ray_schema(path):
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(config)  # raises jsonschema.ValidationError on a bad key
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu, "needs a GPU worker type (enhance, training) and a CPU worker type"
    for t in gpu + cpu:
        assert t["min_workers"] == 0 and t["max_workers"] > 0
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    lines = path.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        # A mapping key that starts a line (not a list item, not inside a flow mapping).
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if indent > 6:  # deep provider-specific blocks (disks, EBS) are commented at their parent
            continue
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if not prev.startswith("#") and not prev.endswith(":"):
            uncommented.append(f"{path.name}:{i + 1}: {stripped}")
        elif prev.endswith(":") and not prev.startswith("#"):
            uncommented.append(f"{path.name}:{i + 1}: {stripped}")
    assert not uncommented, "keys without a comment above them:\n" + "\n".join(uncommented)


# ------------------------------------------------------------------------------------------------
# The README's `ray job submit` path, run as printed on a local head node of the test's own
# ------------------------------------------------------------------------------------------------
ROOT = CLUSTER.parent
TINY_FIELD = ["--set", "simulate.n_tiles_x=1", "--set", "simulate.n_tiles_y=1",
              "--set", "simulate.tile_inner_arcsec=14.4"]  # one ~22" tile


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.add(int(entry))
    return pids


def _kill_head(proc) -> None:
    """SIGKILL the head node's processes: its session (``start_new_session``), and the descendants
    that left it (job drivers start sessions of their own). Nothing else on the machine is touched
    (``ray stop`` would stop every Ray instance of every user)."""
    try:
        pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pids = set()
    pids |= _session_pids(proc.pid) | {proc.pid}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    """``ray start --head --num-cpus=2`` as the README prints it, plus what keeps it private: free
    ports, a small object store, its own temp dir, its own HOME (so ``ray get-auth-token --generate``
    writes the token there, not in the user's ~/.ray) and ``--block`` (the head's processes stay in
    a session this fixture owns and kills). PATH starts with this Python's bin dir, as after
    ``. .venv/bin/activate``: the jobs' ``python`` is that environment's."""
    base = Path(tempfile.mkdtemp(prefix="gr-", dir="/tmp"))  # short: Ray's socket paths live below it
    (base / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(base / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               VIRTUAL_ENV=str(Path(sys.executable).parent.parent), RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om = _free_ports(9)
    cmd = ["ray", "start", "--head", "--num-cpus=2", "--block", f"--temp-dir={base / 'ray'}",
           f"--object-store-memory={150 * 1024 * 1024}", f"--port={gcs}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}"]
    address = f"http://127.0.0.1:{dash}"
    try:
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
        with open(base / "head.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True,
                                 timeout=60, check=False).returncode != 0:
                if proc.poll() is not None:
                    pytest.fail(f"ray start --head exited {proc.returncode}:\n"
                                f"{(base / 'head.log').read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("the head node's job server did not come up in 120 s")
                time.sleep(1)
            yield {"address": address, "env": env, "base": base}
        finally:
            _kill_head(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _ray(head, *args: str, timeout_s: float = 300):
    return subprocess.run(["ray", *args], env=head["env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def _job_lines(text: str) -> str:
    """The job's own output: the lines of ``ray job submit/logs`` without Ray's timestamped INFO lines."""
    return "\n".join(line for line in text.splitlines() if " INFO " not in line)[-4000:]


@pytest.mark.ray
@pytest.mark.slow  # ~70 s on 2 idle cores: head start ~8 s, the tiny field job ~45 s, the GPU refusal ~15 s
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_as_the_readme_prints_it(head):
    """The README's commands on a local head node: the job runs with the head's Python (the
    working-dir upload leaves .venv out), writes where --set output says and prints that location;
    ``ray job logs`` reads the same. A GPU request the fixed-size head can never place ends the job
    within a minute with a one-line error naming the key, not a pipeline that waits for ever."""
    out = head["base"] / "output"
    sub = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", "galgan-field",
               "--working-dir", ".", "--", "python", "jobs/process_field.py", "--set", f"output={out}", *TINY_FIELD)
    assert sub.returncode == 0, _job_lines(sub.stdout + sub.stderr)
    assert "galgan-ray field run" in sub.stdout and f"catalog  {out}/catalog/" in sub.stdout, _job_lines(sub.stdout)
    assert list((out / "catalog").glob("*/_COMMITTED")), "no committed tile in the output the user named"
    logs = _ray(head, "job", "logs", "--address", head["address"], "galgan-field", timeout_s=120)
    assert logs.returncode == 0 and f"summary  {out}/summary.json" in logs.stdout, _job_lines(logs.stdout + logs.stderr)

    t0 = time.monotonic()
    gpu = _ray(head, "job", "submit", "--address", head["address"], "--submission-id", "galgan-gpu",
               "--working-dir", ".", "--", "python", "jobs/process_field.py", "--set", f"output={out}-gpu",
               "--set", "compute.enhance_num_gpus=1", *TINY_FIELD)
    assert gpu.returncode != 0 and time.monotonic() - t0 < 60, _job_lines(gpu.stdout + gpu.stderr)
    logs = _ray(head, "job", "logs", "--address", head["address"], "galgan-gpu", timeout_s=120).stdout
    assert "error: compute.enhance_num_gpus: " in logs and "Traceback" not in logs, _job_lines(logs)
