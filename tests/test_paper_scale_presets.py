"""The paper-scale presets (CIFAR-10 + ResNet18) run end to end for one round on files in
CIFAR-10's own format, and say clearly what to do when the files are absent."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedtier.cli import main
from fedtier.config import load_config


def write_cifar10(folder: Path, per_batch: int = 40, test: int = 20) -> None:
    """CIFAR-10's python format: five training batches and a test batch, each a pickled dict
    with uint8 rows [n, 3072] (channel-major) under b"data" and b"labels"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    write_cifar10(root)
    return root


def test_presets_hold_the_papers_table_2_and_4_settings():
    q = load_config("qafed-cifar10-resnet18")
    t = q.train
    assert (t.lr, t.epochs, t.batch_size, t.rounds) == (0.008, 5, 128, 3000)
    assert q.topology.clients == 100 and q.model.name == "resnet18"
    assert q.arm_configs()["qafed"].aggregate.server_lr == 6
    f = load_config("fqbd-cifar10-resnet18")
    a = f.attack
    assert (a.lr, a.epochs, a.start_round, a.malicious) == (0.003, 5, 2000, 0.05)
    assert f.aggregate.server_lr == 6 and a.gamma is None  # γ = N/η_s = 100/6


@pytest.mark.parametrize("preset", ["qafed-cifar10-resnet18", "fqbd-cifar10-resnet18"])
def test_one_round_on_cifar_format_files(preset, cifar_root, tmp_path):
    out = tmp_path / "run"
    sets = [f"data.root={cifar_root}", "train.rounds=1", "train.epochs=1", "eval.every=1"]
    sets += ["train.executor=sequential"]  # no worker processes for one small round
    if preset.startswith("fqbd"):
        # the attackers act in this round; half the clients are malicious, so some are sampled
        sets += ["attack.start_round=0", "attack.epochs=1", "attack.malicious=0.5"]
    argv = ["run", preset, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    arms = load_config(preset).arm_configs()
    assert set(summary["arms"]) == set(arms)
    for arm in summary["arms"].values():
        assert arm["rounds"] == 1
        assert set(arm["cda"]) == {"32", "8", "4"}
        assert all(0.0 <= v <= 1.0 for v in arm["cda"].values())


@pytest.mark.parametrize("preset", ["qafed-cifar10-resnet18", "fqbd-cifar10-resnet18"])
def test_missing_files_give_the_clear_message(preset, tmp_path, capsys):
    code = main(["run", preset, "--out", str(tmp_path / "r"), "--set", f"data.root={tmp_path}/x"])
    err = capsys.readouterr().err
    assert code == 2 and "data.root" in err and "cifar-10-python.tar.gz" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
