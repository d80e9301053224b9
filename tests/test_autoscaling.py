"""The field job on Ray's fake multi-node autoscaler: from zero workers, nodes come on demand.

The cluster mirrors ``cluster/aws.yaml`` and ``cluster/gcp.yaml``: a head that offers no CPU to
tasks, a CPU worker type and a GPU worker type, both with ``min_workers: 0``. The field runs with the
Enhance stage asking for a GPU (as the cluster configs' README command sets
``compute.enhance_num_gpus=1``), so the autoscaler has to start both kinds of worker.

Why not ``ray.cluster_utils.AutoscalingCluster`` itself (Ray 2.60):

1. It cannot be built from the wheel: it reads ``ray/autoscaler/_private/fake_multi_node/example.yaml``,
   which the wheel does not ship (``FileNotFoundError``), and the ``fake_multinode`` provider type
   loads the same file as its defaults in the autoscaler process.
2. ``start()`` and ``shutdown()`` run ``ray stop --force``, which kills every Ray process of the user
   on the machine (other test runs included), and its ``ray start`` writes
   ``/tmp/ray/ray_current_cluster``, which any bare ``ray.init()`` on the machine then joins.

So the fixture does what ``AutoscalingCluster.start`` does with the same node provider
(``FakeMultiNodeProvider``: each "node" is a raylet started on this machine), named as an
``external`` provider so that no defaults file is read; the head is started from this process
(not by ``ray start``) and every process is ended by its id.
"""
from __future__ import annotations

import json
import os
import signal
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from galgan_ray.outputs import read_run_table  # noqa: E402
from galgan_ray.ray_shell.job import FieldComputeConfig, FieldJobConfig, run_field  # noqa: E402
from galgan_ray.sky import FieldSimConfig, make_simulated_field  # noqa: E402

pytestmark = pytest.mark.ray
SIM = FieldSimConfig(seed=3, n_tiles_x=2, n_tiles_y=2, tile_inner_arcsec=14.4, border_arcsec=3.96,
                     galaxy_density_arcmin2=150.0)
MB = 1024 * 1024
# Fake nodes are processes on this 2-core machine: few CPUs each (the stages ask for fractions).
NODE_TYPES = {
    "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    "cpu_worker": {"resources": {"CPU": 2, "object_store_memory": 150 * MB}, "node_config": {},
                   "min_workers": 0, "max_workers": 1},
    "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * MB}, "node_config": {},
                   "min_workers": 0, "max_workers": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _autoscaling_config(gcs_address: str) -> dict:
    """The cluster-launcher config the autoscaler reads (the keys of Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "galgan-ray-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": NODE_TYPES, "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> str:
    """A head node (0 CPUs) with an autoscaler of fake nodes; yields the GCS address."""
    from ray._private import ray_constants
    from ray._private.node import Node
    from ray._private.parameter import RayParams
    from ray._private.services import get_node_ip_address

    assert not ray.is_initialized()
    port = _free_port()
    gcs_address = f"{get_node_ip_address()}:{port}"
    config_path = tmp_path_factory.mktemp("autoscaler") / "autoscaling.json"
    config_path.write_text(json.dumps(_autoscaling_config(gcs_address)))
    params = RayParams(num_cpus=0, num_gpus=0, object_store_memory=100 * MB, gcs_server_port=port,
                       autoscaling_config=str(config_path), include_dashboard=False, min_worker_port=0,
                       max_worker_port=0)
    # The autoscaler (a child process) reads these: the fake provider refuses to run without
    # RAY_FAKE_CLUSTER, and it looks for pending work every second instead of every 5 s.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_FAKE_CLUSTER", "1")
        mp.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        head = Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True)
    monitor_pid = head.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process.pid
    try:
        assert head.gcs_address == gcs_address
        yield gcs_address
    finally:
        ray.shutdown()
        # The fake worker nodes are the autoscaler's children: collect them before it goes.
        nodes = _descendants(monitor_pid)
        head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for pid in nodes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass




def _worker_nodes() -> list[dict]:
    """Alive nodes other than the head, as ``{"CPU": .., "GPU": ..}``."""
    return [{k: n["Resources"].get(k, 0.0) for k in ("CPU", "GPU")} for n in ray.nodes()
            if n["Alive"] and "node:__internal_head__" not in n["Resources"]]


@pytest.mark.timeout(600)
def test_field_on_an_autoscaling_cluster_starting_from_zero_workers(cluster, ckpt, tmp_path):
    tiles = tmp_path / "tiles"
    make_simulated_field(SIM, str(tiles))
    ray.init(address=cluster, log_to_driver=False)
    assert _worker_nodes() == [] and not ray.cluster_resources().get("CPU")  # the head alone: nowhere to run
    ray.shutdown()

    out = tmp_path / "out"
    config = FieldJobConfig(inputs=(str(tiles),), output=str(out), checkpoint=ckpt,
                            compute=FieldComputeConfig(ray_address=cluster, enhance_num_gpus=1.0))
    summary = run_field(config, verbose=False)  # joins the cluster by its address (init_ray)

    # The autoscaler added workers on demand: a GPU worker for the Enhance actor (it asks for a GPU), and
    # a CPU worker only if the CPU stages' fractional requests (0.25 CPU per actor) did not fit beside it
    # on the GPU worker's CPU -- with four actor pools they usually do, so that one is not asserted.
    workers = _worker_nodes()
    assert {"CPU": 1.0, "GPU": 1.0} in workers, workers
    assert all(w in ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}) for w in workers), workers
    n = SIM.n_tiles_x * SIM.n_tiles_y
    assert summary["tiles"] == {"total": n, "done": n, "failed": 0, "skipped": 0}
    assert len(list((out / "catalog").glob("tile=*/_COMMITTED"))) == n
    ids = read_run_table(str(out)).column("objectId").to_pylist()
    assert len(ids) == len(set(ids)) == summary["sources"] > 0
