import numpy as np
import pytest
import torch

from fedtier.config import CostConfig, TopologyConfig
from fedtier.costs import CostModel
from fedtier.data import load_dataset
from fedtier.errors import ConfigError
from fedtier.experiment import prepare_arm
from fedtier.rounds import run_rounds
from fedtier.topology import build_topology
from tests.conftest import tiny_config


def _model(**costs):
    topo = build_topology(TopologyConfig(edges=1, clients=6), np.full(6, 40), seed=0)
    return CostModel(CostConfig(**costs), topo, epochs=2, param_count=1000)


def test_round_time_is_the_slowest_device_and_blocks_serialise_uploads():
    m = _model()
    clients = [0, 1, 2, 3]
    out = m.edge_round(0, clients, {}, uploaded=1000)
    assert out.kept.all()
    np.testing.assert_allclose(out.finish_s, out.allocation.time)
    m.cloud_round(1)
    assert m.totals["time_s"] == pytest.approx(out.allocation.time.max())
    assert m.totals["bytes_client_edge"] == 4 * 4000  # fp32 when no codec recorded a payload
    assert m.totals["energy_j"] == pytest.approx(out.allocation.energy.sum())
    one = _model(resource_blocks=1).edge_round(0, clients, {}, 1000)
    # one block: uploads one after another in order of finishing computation
    order = np.argsort(one.allocation.t_cmp)
    assert np.all(np.diff(one.finish_s[order]) > 0)
    assert one.finish_s.max() >= one.allocation.t_com.sum()
    assert _model(resource_blocks=2, overflow="drop").schedule(clients) == [0, 1]


def test_codec_payloads_are_what_is_counted_and_priced():
    m = _model()
    payload = {0: 500, 1: 4000}
    small = m.edge_round(0, [0, 1], payload, uploaded=1000)
    assert m.totals["bytes_client_edge"] == 4500
    assert m.client_bytes == {0: 500.0, 1: 4000.0}
    big = _model().edge_round(0, [0, 1], {0: 4000, 1: 4000}, uploaded=1000)
    assert small.allocation.t_com[0] == pytest.approx(big.allocation.t_com[0] / 8)


def test_deadline_drops_stragglers_and_round_lasts_the_deadline():
    m = _model(deadline_s=1e-3, stragglers="drop")
    out = m.edge_round(0, [0, 1, 2], {}, 1000)
    assert not out.kept.any() and m.totals["dropped"] == 3
    m.cloud_round(1)
    assert m.totals["time_s"] == pytest.approx(1e-3)


def test_costs_in_a_run_optimal_saves_energy_at_the_same_deadline():
    data = load_dataset("digits")
    snaps = {}
    for alloc in ("max", "optimal"):
        cfg = tiny_config(
            **{
                "train.rounds": 2,
                "costs.allocation": alloc,
                "costs.deadline_s": 30.0,
                "upload": [{"name": "quantize", "levels": 16}],
            }
        )
        evals = []
        setup = prepare_arm(cfg, data)
        run_rounds(setup, evals.append)
        snaps[alloc] = evals[-1]["costs"]
        p = setup.layout.size
    mx, opt = snaps["max"], snaps["optimal"]
    assert mx["device_rounds"] == opt["device_rounds"] == 2 * 2 * 3
    assert mx["bytes_client_edge"] == opt["bytes_client_edge"] < 4 * p * 12 / 7
    assert mx["bytes_edge_cloud"] == 4 * p * 2 * 2
    assert opt["energy_j"] < mx["energy_j"]
    assert opt["time_s"] == pytest.approx(2 * 30.0) and mx["time_s"] < opt["time_s"]
    assert mx["infeasible"] == opt["infeasible"] == 0
    # the optimal run also prices itself at (f_max, P_max): exactly the max run's costs
    assert opt["energy_at_max_j"] == pytest.approx(mx["energy_j"])
    assert opt["time_at_max_s"] == pytest.approx(mx["time_s"])


@pytest.mark.parametrize(
    "key,value,field",
    [
        ("costs.allocation", "optimal", "costs.deadline_s"),
        ("costs.bandwidth_hz", 0, "costs.bandwidth_hz"),
        ("costs.overflow", "skip", "costs.overflow"),
        ("costs.resource_blocks", -1, "costs.resource_blocks"),
    ],
)
def test_cost_config_errors_name_the_field(key, value, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(**{key: value})


def test_report_has_the_costs_table_and_plot(tmp_path):
    from fedtier.experiment import run_experiment

    cfg = tiny_config(
        **{
            "train.rounds": 2,
            "arms": {"fp32": {}, "q4": {"upload": [{"name": "quantize", "levels": 16}]}},
        }
    )
    summary = run_experiment(cfg, tmp_path, progress=False)
    fp, q4 = (summary["arms"][a]["costs"] for a in ("fp32", "q4"))
    assert q4["bytes_client_edge"] < fp["bytes_client_edge"] / 7
    assert q4["energy_com_j"] < fp["energy_com_j"]
    assert q4["energy_cmp_j"] == pytest.approx(fp["energy_cmp_j"])  # same devices, same work
    report = (tmp_path / "report.md").read_text()
    assert "## Communication and energy" in report and "| q4 |" in report
    assert (tmp_path / "costs.png").is_file()


def test_in_a_run_blocks_limit_who_is_scheduled_and_a_missed_deadline_keeps_the_model():
    data = load_dataset("digits")
    cfg = tiny_config(**{"train.rounds": 2, "costs.resource_blocks": 2, "costs.overflow": "drop"})
    evals = []
    run_rounds(prepare_arm(cfg, data), evals.append)
    c = evals[-1]["costs"]
    assert c["device_rounds"] == 2 * 2 * 2 and c["unscheduled"] == 2 * 2 * 1
    cfg = tiny_config(**{"train.rounds": 2, "costs.deadline_s": 1e-6, "costs.stragglers": "drop"})
    setup = prepare_arm(cfg, data)
    w0 = setup.layout.flatten(setup.model)
    evals = []
    w = run_rounds(setup, evals.append)
    assert evals[-1]["costs"]["dropped"] == 2 * 2 * 3
    assert evals[-1]["costs"]["time_s"] == pytest.approx(2e-6)
    assert torch.equal(w, w0)  # nothing arrived in time
