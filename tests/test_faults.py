"""Faults in the middle of a field run: a killed driver, a killed Enhance actor, a killed worker process.

What makes a field run survive them (nothing here is configured by the pipeline; these tests check it):

- Ray Data 2.60 creates every actor-pool stage with ``max_restarts=-1`` and ``max_task_retries=-1``
  (``ActorPoolMapOperator._apply_default_remote_args``): a dead stage actor is restarted, its
  ``__init__`` runs again (the Enhance stage reloads its checkpoint) and the tasks it held are
  retried. Reads run in the PrepareStage actors and commits in the CommitStage actor, so they are
  retried the same way.
- A tile is committed once: its files go under deterministic names by atomic moves and the
  ``_COMMITTED`` marker last, so a retried commit, or a rerun after the driver died, rewrites the
  same files; the reader takes committed tiles only, each once.

Each run is compared with the pure core's catalog of the same tiles
(:func:`galgan_ray.field.process_tile`, no Ray): the same objects with the same fluxes, no
objectId twice. The state API (``ray.util.state``) finds a stage's actor and, afterwards, its restart
and the retried task; it needs the dashboard, so this module's Ray starts one. The tests run in file
order, the driver's death last.
"""
from __future__ import annotations

import dataclasses

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from galgan_ray.field import FieldConfig, enhancer_noise_scale, process_tile  # noqa: E402
from galgan_ray.outputs import read_run_table  # noqa: E402
from galgan_ray.ray_shell.job import FieldComputeConfig, FieldJobConfig, resolve_model_grid, run_field  # noqa: E402
from galgan_ray.sky import FieldSimConfig, make_simulated_field  # noqa: E402
from galgan_ray.tiles import list_tile_sources, read_tile_source  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
# Six tiles: enough that a kill early in the run leaves work for the restarted actor or the rerun.
SIM = FieldSimConfig(seed=5, n_tiles_x=3, n_tiles_y=2, tile_inner_arcsec=14.4, border_arcsec=3.96,
                     galaxy_density_arcmin2=150.0)
N_TILES = SIM.n_tiles_x * SIM.n_tiles_y
ENHANCE = "MapWorker(MapBatches(EnhanceStage))"  # Ray Data's actor class name of a stage (layout stage_pools)
PROCESS = "MapWorker(ReadTile->MapBatches(ProcessStage))"  # read + every stage in one actor (layout one_pool)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("field") / "tiles"
    make_simulated_field(SIM, str(out))
    return out


@pytest.fixture(scope="module")
def reference(ckpt, sim) -> dict[int, float]:
    """``objectId -> i_gmmFlux`` of every tile processed by the pure core, as the stages do it."""
    from galgan_ray.enhance import Enhancer

    config, compute = FieldConfig(), FieldComputeConfig()
    path, model, _ = resolve_model_grid(ckpt)
    enhancer = Enhancer(path, device="cpu", batch_size=compute.enhance_batch_size)
    rho = enhancer_noise_scale(enhancer, config)
    out: dict[int, float] = {}
    for source in list_tile_sources(str(sim)):
        cat = process_tile(read_tile_source(source), model=model, enhance_fn=enhancer.enhance_plane, rho=rho,
                           config=config, compute=compute.photometry).catalog.columns
        out.update(zip(cat["objectId"].tolist(), cat["i_gmmFlux"].tolist()))
    assert len(out) > N_TILES
    return out


@pytest.fixture(scope="module")
def ray_with_state_api() -> str:
    """A local Ray with its dashboard (the state API's server); yields its address, which every state
    API call names (without it they look for *the* Ray instance of the machine, and find several
    when other test runs share the machine)."""
    ray.init(address="local", num_cpus=2, object_store_memory=250 * 1024 * 1024, include_dashboard=True,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def job(ckpt: str, sim: Path, out: Path, *, layout: str = "auto") -> FieldJobConfig:
    return FieldJobConfig(inputs=(str(sim),), output=str(out), checkpoint=ckpt,
                          compute=dataclasses.replace(FieldComputeConfig(), layout=layout))


def committed(out: Path) -> list[Path]:
    return sorted((out / "catalog").glob("tile=*/_COMMITTED"))


def assert_complete_catalog(out: Path, reference: dict[int, float]) -> None:
    """Every tile committed once; the catalog is the reference's, with no objectId twice."""
    assert len(committed(out)) == N_TILES
    assert len(list((out / "catalog").glob("tile=*/part-0.parquet"))) == N_TILES
    cat = read_run_table(str(out))
    ids = cat.column("objectId").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate objectId"
    assert set(ids) == set(reference)
    flux = dict(zip(ids, cat.column("i_gmmFlux").to_pylist()))
    keys = sorted(reference)
    np.testing.assert_allclose([flux[k] for k in keys], [reference[k] for k in keys], rtol=1e-5)


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a job started with ``start_new_session``: its local Ray too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session, then wait until none is left."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not session_pids(sid), timeout_s=60, what=f"the processes of session {sid} to end")


def job_command(ckpt: str, sim: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "process_field.py"), "--input", str(sim), "--output", str(out),
            "--set", f"checkpoint={ckpt}"]


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return env


# ------------------------------------------------------------------------------------------------
# A stage actor or a worker process dies
# ------------------------------------------------------------------------------------------------
class StageKiller(threading.Thread):
    """Beside a field run: find the actor of one stage (state API), watch its process title, and call
    ``kill(actor)`` while it runs a task. Ray's worker titles its process ``ray::<class>.submit`` for
    the duration of a task (``ray::<class>`` when idle), so the kill lands in the middle of a tile,
    which Ray must then retry on the restarted actor."""

    def __init__(self, actor_class: str, kill: Callable[[Any], None], *, address: str, out: Path,
                 timeout_s: float = 500.0):
        super().__init__(daemon=True)
        self.actor_class, self.kill, self.address, self.out = actor_class, kill, address, out
        self.deadline = time.monotonic() + timeout_s
        self.stop = threading.Event()
        self.killed: dict | None = None
        self.errors: list[str] = []

    def run(self):
        from ray.util.state import list_actors

        actor = None
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if actor is None:
                try:
                    alive = list_actors(address=self.address, detail=True,
                                        filters=[("class_name", "=", self.actor_class), ("state", "=", "ALIVE")])
                except Exception as exc:  # noqa: BLE001 - the state API answers once the dashboard is up
                    self.errors.append(repr(exc))
                    alive = []
                if not alive:
                    time.sleep(0.2)
                    continue
                actor = alive[0]
            try:
                with open(f"/proc/{actor.pid}/cmdline", "rb") as fh:
                    title = fh.read().rstrip(b"\0").decode(errors="replace")
            except OSError:  # gone: look the actor up again
                actor = None
                continue
            if title == f"ray::{self.actor_class}.submit":
                self.kill(actor)
                self.killed = {"actor_id": actor.actor_id, "pid": actor.pid, "committed": len(committed(self.out))}
                return
            time.sleep(0.005)


def _tasks(name: str, *, address: str) -> list:
    from ray.util.state import list_tasks

    return list_tasks(address=address, filters=[("name", "=", name)], detail=True, limit=10_000,
                      raise_on_missing_output=False)


def run_with_a_kill(killer: StageKiller, config: FieldJobConfig) -> dict:
    killer.start()
    try:
        summary = run_field(config, verbose=False)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, f"no running {killer.actor_class} task was seen: {killer.errors[-3:]}"
    return summary


def assert_restarted_and_retried(killed: dict, actor_class: str, *, address: str) -> None:
    """The same actor came back in a new process, which did the killed task again (attempt >= 1)."""
    from ray.util.state import get_actor

    actor = get_actor(killed["actor_id"], address=address)
    assert actor.num_restarts >= 1 and actor.pid != killed["pid"], actor
    wait_for(lambda: [t for t in _tasks(f"{actor_class}.submit", address=address)
                      if t.attempt_number >= 1 and t.state == "FINISHED" and t.worker_pid == actor.pid],
             timeout_s=60, what=f"the retried task of {actor_class} in the task events")


def assert_recovered(killer, summary, out, reference, stage: str, *, address: str) -> None:
    """The kill landed mid-run, every tile was committed, the catalog equals the reference and the
    killed stage's actor was restarted with its task retried."""
    assert killer.killed["committed"] < N_TILES
    assert summary["tiles"] == {"total": N_TILES, "done": N_TILES, "failed": 0, "skipped": 0}
    assert_complete_catalog(out, reference)
    assert_restarted_and_retried(killer.killed, stage, address=address)


@pytest.mark.timeout(600)
def test_killed_enhance_actor_is_restarted_and_the_catalog_is_complete(ray_with_state_api, ckpt, sim, reference,
                                                                      tmp_path):
    out = tmp_path / "out"

    def kill(actor):
        # The driver holds the handles of Ray Data's actors (the executor runs in this process), but
        # Ray has no public lookup of an unnamed actor by id.
        handle = ray._private.worker.global_worker.core_worker.get_actor_handle(ray.ActorID.from_hex(actor.actor_id))
        ray.kill(handle, no_restart=False)

    killer = StageKiller(ENHANCE, kill, address=ray_with_state_api, out=out)
    assert_recovered(killer, run_with_a_kill(killer, job(ckpt, sim, out, layout="stage_pools")), out, reference,
                     ENHANCE, address=ray_with_state_api)


@pytest.mark.timeout(600)
def test_killed_worker_process_is_replaced_and_the_catalog_is_complete(ray_with_state_api, ckpt, sim, reference,
                                                                      tmp_path):
    """SIGKILL (as the OOM killer would) a worker process in the middle of a tile (the one pool that
    runs every stage where the model is on CPU: this machine's layout)."""
    out = tmp_path / "out"
    killer = StageKiller(PROCESS, lambda actor: os.kill(actor.pid, signal.SIGKILL), address=ray_with_state_api,
                         out=out)
    assert_recovered(killer, run_with_a_kill(killer, job(ckpt, sim, out)), out, reference, PROCESS,
                     address=ray_with_state_api)


# ------------------------------------------------------------------------------------------------
# The driver dies
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_killed_driver_then_rerun_processes_only_the_uncommitted_tiles(ray_with_state_api, ckpt, sim, reference,
                                                                     tmp_path):
    """SIGKILL ``jobs/process_field.py`` as soon as its first tile is committed (its own local Ray goes
    with it, as when the driver's machine is lost), then run the same job again (in this process,
    on this module's Ray: what the job script calls)."""
    out = tmp_path / "out"
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(job_command(ckpt, sim, out), stdout=log, stderr=subprocess.STDOUT, env=job_env(),
                                cwd=ROOT, start_new_session=True)
    try:
        wait_for(lambda: committed(out) or proc.poll() is not None, timeout_s=600, what="the first commit",
                 interval_s=0.05)
        assert proc.poll() is None, "the job ended before it was killed:\n" + log_path.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        kill_session(proc.pid)
    before = {p: p.stat().st_mtime_ns for p in (out / "catalog").glob("tile=*/part-0.parquet")
              if (p.parent / "_COMMITTED").exists()}
    assert 1 <= len(before) < N_TILES, f"{len(before)} of {N_TILES} tiles committed when the driver died"

    summary = run_field(job(ckpt, sim, out), verbose=False)
    assert summary["tiles"] == {"total": N_TILES, "done": N_TILES - len(before), "failed": 0,
                                "skipped": len(before)}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # committed tiles were not processed again
    assert_complete_catalog(out, reference)
