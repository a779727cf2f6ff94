import copy
import json

import pytest
import torch

from fedtier.data import load_dataset
from fedtier.errors import FedtierError
from fedtier.experiment import prepare_arm, run_experiment
from fedtier.local import LocalConfig, train_client
from fedtier.local.sgd import client_generator
from fedtier.rounds import run_rounds
from fedtier.tasks import client_batch
from fedtier.topology import plan_round
from tests.conftest import tiny_config


def test_run_writes_every_result_file_and_summary_shape(tmp_path):
    cfg = tiny_config(arms={"qafed": {"quant.qat": True, "aggregate.rule": "qafed"}, "fedavg": {}})
    summary = run_experiment(cfg, tmp_path, progress=False)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "accuracy.png"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for arm in ("qafed", "fedavg"):
        entry = on_disk["arms"][arm]
        assert set(entry["cda"]) == {"32", "8", "4"}
        assert all(0.0 <= v <= 1.0 for v in entry["cda"].values())
        assert entry["rounds"] == 3 and entry["wall_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    setup = [r for r in records if r.get("event") == "setup"]
    assert [r["target_bits"] for r in setup] == [[8, 4], [8, 4]]  # elected from device profiles
    assert setup[0]["election"]["elected"] == [8, 4]
    evals = [r for r in records if "bits" in r]
    assert [r["round"] for r in evals] == [1, 2, 3, 1, 2, 3]
    assert "class_0" in evals[-1]["bits"]["32"]  # per-class accuracy
    assert "| 4 |" in (tmp_path / "report.md").read_text()


def test_same_config_and_seed_give_identical_numbers(tmp_path):
    cfg = tiny_config(**{"quant.qat": True})
    a = run_experiment(cfg, tmp_path / "a", progress=False)
    b = run_experiment(cfg, tmp_path / "b", progress=False)
    assert a["arms"]["main"]["cda"] == b["arms"]["main"]["cda"]


def test_training_learns_digits():
    cfg = tiny_config(
        **{
            "train.rounds": 8,
            "topology.clients_per_edge": 6,
            "model.name": "mlp",
            "model.options": {},
        }
    )
    setup = prepare_arm(cfg, load_dataset("digits"))
    evals = []
    run_rounds(setup, evals.append)
    assert evals[-1]["bits"]["32"]["accuracy"] > 0.8
    assert evals[-1]["bits"]["32"]["accuracy"] > evals[0]["bits"]["32"]["accuracy"]


def test_qat_model_keeps_its_accuracy_when_quantized_and_plain_one_does_not():
    data = load_dataset("digits")
    accs = {}
    for qat in (True, False):
        cfg = tiny_config(
            **{
                "quant.qat": qat,
                "train.rounds": 10,
                "topology.clients_per_edge": 6,
                "eval.every": 10,
            }
        )
        evals = []
        run_rounds(prepare_arm(cfg, data), evals.append)
        accs[qat] = {b: m["accuracy"] for b, m in evals[-1]["bits"].items()}
    assert accs[True]["4"] >= accs[True]["32"] - 0.1
    assert accs[True]["4"] >= accs[False]["4"] + 0.3


def test_fedbn_keeps_batchnorm_state_on_devices():
    cfg = tiny_config(**{"model.batchnorm": "local"})
    setup = prepare_arm(cfg, load_dataset("digits"))
    w0 = setup.layout.flatten(setup.model)
    w = run_rounds(setup, lambda r: None)
    kept = ~setup.layout.mask()
    assert torch.equal(w[kept], w0[kept])  # the cloud never moves device-kept entries
    assert len(setup.local_state) > 0
    assert not torch.equal(next(iter(setup.local_state.values()))[kept], w0[kept])


def cloud_rounds_by_hand(setup, w0: torch.Tensor, kappa: int, rounds: int) -> torch.Tensor:
    """QAFed Algorithm 1 with κ edge rounds, from the public pieces: in cloud round t each
    sampled edge starts from the global model; κ times its clients train from the edge model
    (fedtier.local.train_client, generator keyed (seed, step = t·κ + k, client)) and the edge
    adds the sample-weighted mean of their deltas; the cloud adds the edges' deltas weighted by
    their clients' sample counts (fedavg, η = 1)."""
    cfg, model = setup.cfg, copy.deepcopy(setup.model)
    t = cfg.train
    local = LocalConfig(t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay)
    w = w0.clone()
    for r in range(rounds):
        plan = plan_round(setup.topology, cfg.topology, cfg.seed, r)
        edge_deltas, edge_weights = [], []
        for clients in plan.edges.values():
            sizes = [float(setup.topology.num_samples[c]) for c in clients]
            w_edge = w.clone()
            for k in range(kappa):
                step = r * kappa + k
                total = torch.zeros_like(w)
                for c, n_c in zip(clients, sizes):
                    setup.layout.load(model, w_edge)
                    x, y = setup.client_data(c)
                    g = client_generator(cfg.seed, step, c)
                    train_client(model, setup.task, client_batch(setup.task, x, y), local, g)
                    total += n_c * (setup.layout.flatten(model) - w_edge)
                w_edge = w_edge + total / sum(sizes)
            edge_deltas.append(w_edge - w)
            edge_weights.append(sum(sizes))
        w = w + sum(d * n for d, n in zip(edge_deltas, edge_weights)) / sum(edge_weights)
    return w


def test_edge_rounds_train_kappa_times_within_each_cloud_round():
    data = load_dataset("digits")
    finals = {}
    for kappa in (1, 2):
        cfg = tiny_config(
            **{
                "aggregate.edge_rounds": kappa,
                "train.rounds": 2,
                "train.momentum": 0.0,
                "model.name": "mlp",
                "model.options": {},
                "quant.eval_bits": [32],
            }
        )
        setup = prepare_arm(cfg, data)
        w0 = setup.layout.flatten(setup.model).clone()
        expected = cloud_rounds_by_hand(setup, w0, kappa, 2)
        evals = []
        finals[kappa] = run_rounds(setup, evals.append)
        assert [e["round"] for e in evals] == [1, 2]  # κ edge rounds are still one cloud round
        torch.testing.assert_close(finals[kappa], expected, rtol=1e-5, atol=1e-6)
    # the second edge round moves the model on: κ = 2 is not κ = 1
    assert (finals[2] - finals[1]).norm() > 0.1 * (finals[1] - w0).norm()


def test_autoencoder_task_runs_through_the_same_round_loop():
    cfg = tiny_config(
        **{
            "train.task": "autoencoder",
            "model.name": "autoencoder",
            "model.options": {},
            "train.rounds": 4,
        }
    )
    evals = []
    run_rounds(prepare_arm(cfg, load_dataset("digits")), evals.append)
    mse = [e["bits"]["32"]["mse"] for e in evals]
    assert mse[-1] < mse[0]
    assert set(evals[-1]["bits"]) == {"32", "8", "4"}


@pytest.mark.parametrize("scheme", ["iid", "shards", "feature", "label"])
def test_every_partition_scheme_runs(scheme):
    cfg = tiny_config(
        **{"data.partition": scheme, "train.rounds": 1, "model.name": "mlp", "model.options": {}}
    )
    evals = []
    setup = prepare_arm(cfg, load_dataset("digits"))
    run_rounds(setup, evals.append)
    expected = 2 * 360 if scheme == "label" else 360
    assert len(setup.test) == pytest.approx(expected, abs=5)


def test_source_partition_puts_one_source_per_edge():
    cfg = tiny_config(
        **{
            "data.dataset": "multisource-mnist",
            "data.partition": "source",
            "topology.edges": 3,
            "topology.clients": 6,
            "topology.edges_per_round": 3,
            "topology.clients_per_edge": 1,
            "train.rounds": 1,
            "model.name": "mlp",
            "model.options": {},
        }
    )
    train, test = data = load_dataset("multisource-mnist")
    setup = prepare_arm(cfg, data)
    assert setup.client_data.view_of is None  # the sources themselves differ: no transform
    for client, part in enumerate(setup.client_data.parts):
        assert set(train.source[part].tolist()) == {client // 2}
    assert len(setup.test) == len(test)
    with pytest.raises(FedtierError, match="source id"):
        prepare_arm(tiny_config(**{"data.partition": "source"}), load_dataset("digits"))


def test_upload_chain_runs_in_the_round_and_its_metrics_are_logged():
    cfg = tiny_config(
        upload=[{"name": "clip", "max_norm": 1e-3}], **{"train.rounds": 2, "eval.every": 2}
    )
    setup = prepare_arm(cfg, load_dataset("digits"))
    w0 = setup.layout.flatten(setup.model)
    evals = []
    w = run_rounds(setup, evals.append)
    stages = evals[-1]["stages"]
    assert stages["client/clip/clipped"] == 12.0  # 2 rounds × 2 edges × 3 clients, all clipped
    assert stages["edge/rows"] == 12.0 and stages["cloud/rows"] == 4.0
    assert (w - w0).norm() <= 2 * 1e-3 + 1e-6  # two rounds of means of updates of norm ≤ 1e-3


def _records(path, arm):
    """An arm's metrics.jsonl records without their wall-clock times."""
    out = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("arm") == arm:
            r.pop("wall_s", None)
            out.append(r)
    return out


def test_arms_sharing_the_silent_rounds_equal_each_arm_run_alone(tmp_path):
    """Arms that differ only in the attack share the rounds before it starts (one observing
    attack's state, a Byzantine attack's own fresh state, a screen that sees the malicious
    clients): every number and record equals that of each arm run on its own."""
    from fedtier.experiment import shared_prefixes

    arms = {
        "bd": {"attack.kind": "replacement"},
        "sf": {"attack.kind": "sign-flip"},
        "lf": {"attack.kind": "label-flip"},
        "other-start": {"attack.kind": "replacement", "attack.start_round": 3},
        "no-asr": {"attack.kind": "sign-flip", "eval.asr": False},  # evaluates differently
    }
    cfg = tiny_config(
        **{
            "train.rounds": 4,
            "attack.kind": "replacement",
            "attack.malicious_ids": [0, 1, 6, 7],
            "attack.start_round": 2,
            "attack.epochs": 1,
            "eval.asr": True,
            "defenses": [{"name": "qcheck", "samples": 40}],
            "arms": arms,
        }
    )
    assert shared_prefixes(cfg.arm_configs()) == {"sf": ("bd", 2), "lf": ("bd", 2)}
    run = {k: arms[k] for k in ("bd", "sf", "lf")}
    together = run_experiment(
        cfg.model_copy(update={"arms": run}), tmp_path / "all", progress=False
    )
    for arm in ("sf", "lf"):
        overrides = arms[arm]
        alone = run_experiment(
            cfg.model_copy(update={"arms": {arm: overrides}}), tmp_path / arm, progress=False
        )
        a, b = together["arms"][arm], alone["arms"][arm]
        a.pop("wall_s"), b.pop("wall_s")
        assert a == b, arm
        assert _records(tmp_path / "all", arm) == _records(tmp_path / arm, arm), arm
    bd = together["arms"]["bd"]["attack"]
    assert bd["malicious_updates"] > 0 and together["arms"]["lf"]["attack"]["mean_acc_drop"]
