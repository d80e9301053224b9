"""The cluster launcher YAMLs are valid for Ray's own schema and say what each key is for."""
from pathlib import Path

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
