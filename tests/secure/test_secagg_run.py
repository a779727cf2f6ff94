"""The secagg-mnist preset through the CLI, shrunk (digits, 12 clients, 2 rounds): the secure
arms end with the plain arm's model (up to the fixed-point rounding), report their bytes per
phase, and an arm whose edges abort still runs to the end."""

import json

import torch
from safetensors.torch import load_file

from fedtier.cli import main

SHRINK = [
    "data={dataset: digits, partition: dirichlet, alpha: 1.0}",
    "train.rounds=2",
    "train.epochs=1",
    "topology.clients=12",
    "topology.clients_per_edge=6",
    "eval.every=1",
    "arms.secagg-drop20={aggregate.secure: {name: secagg, dropout: 0.6}}",
]


def test_secagg_preset_matches_the_plain_run_and_reports_its_costs(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "secagg-mnist", "--out", str(out), "--no-progress"]
    assert main(args + [a for s in SHRINK for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "secure aggregation (fedtier.secure)" in printed and "| secagg-k4 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    plain = load_file(out / "models" / "plain.safetensors")
    for arm in ("secagg", "secagg-48bit", "secagg-k4"):
        model = load_file(out / "models" / f"{arm}.safetensors")
        for name, value in plain.items():
            if value.is_floating_point():
                assert torch.allclose(model[name], value, atol=1e-5), (arm, name)
        assert arms[arm]["cda"]["32"] == arms["plain"]["cda"]["32"]
        sec = arms[arm]["secure"]
        assert sec["aborted"] == 0 and sec["masked_input_up_bytes"] > 0
        assert sec["fixed_point_err"] < 1e-5
        costs = arms[arm]["costs"]
        assert costs["bytes_secagg_up"] > costs["bytes_secagg_masked_input_up"] > 0
    # 48-bit words: the error is float32's (the update's dtype), far below 32-bit words'
    err48, err32 = (arms[a]["secure"]["fixed_point_err"] for a in ("secagg-48bit", "secagg"))
    assert err48 < 1e-7 and err48 < err32 / 10
    assert (
        arms["secagg-48bit"]["secure"]["masked_input_up_bytes"]
        == 1.5 * (arms["secagg"]["secure"]["masked_input_up_bytes"])
    )
    assert arms["secagg"]["secure"]["threshold"] == 5  # ⌈0.67 · 6⌉ = ⌈4.02⌉
    assert arms["secagg-k4"]["secure"]["threshold"] == 3  # ⌈0.6 · 5⌉: 4 neighbours and itself
    # k = 4 neighbours instead of 5: fewer key-share bytes per client
    k4, full = arms["secagg-k4"]["secure"], arms["secagg"]["secure"]
    assert k4["share_keys_up_bytes"] < full["share_keys_up_bytes"]
    drop = arms["secagg-drop20"]
    assert drop["secure"]["aborted"] > 0 and drop["rounds"] == 2
    assert "secure" not in arms["plain"]
