"""Shared test fixtures (keep minimal)."""
import contextlib
import importlib.util
import socket
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str):
    """A ``bench/`` script as a module (``load_bench("real_sky")``), to test its functions."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH_DIR / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (real observed data); skip the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA} (absent on a fresh clone)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test (2 cores; two threads spin when other work shares the machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """An untrained HSC i -> HST F775W SR generator (its additive skip makes it bicubic upsampling):
    the field, fault and bad-input tests check plumbing, not a trained model."""
    import torch

    from galgan_ray.checkpoint import save_checkpoint
    from galgan_ray.instrument import get_band
    from galgan_ray.models import SRGANConfig, build_generator

    torch.manual_seed(0)
    cfg = SRGANConfig()
    return save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "untrained.pt"),
                           generator_state=build_generator(cfg).state_dict(), model_cfg=cfg,
                           bands={"high": [get_band("hst", "F775W")], "low": [get_band("hsc", "i")]})


@contextlib.contextmanager
def moto_s3(**env: str):
    """An S3-compatible moto server on a free loopback port, yielding its URL; test credentials (and
    ``env``) are set in the environment for its lifetime -- start it before Ray, so workers inherit them."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              **{k: v.format(url=url) for k, v in env.items()}}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in values.items():
                mp.setenv(k, v)
            yield url
    finally:
        server.stop()
