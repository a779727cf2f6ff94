"""The privacy-mnist preset through the CLI, shrunk (digits, 12 clients, 2 rounds, a short
inversion): every arm reports the attacks; the edge under secure aggregation sees a sum;
local DP at ε ≤ 8 spoils the inversion that succeeds on the fp32 upload (and, with known
labels, on the edge's sum of 3 one-image uploads of the MLP)."""

import json

from fedtier.cli import main

SHRINK = [
    "data={dataset: digits, partition: dirichlet, alpha: 1.0}",
    "train.rounds=2",
    "train.epochs=1",
    "topology.clients=12",
    "topology.clients_per_edge=3",
    "eval.every=2",
    "eval.privacy={images: 1, steps: 150, mia_samples: 100}",
]


def test_privacy_preset_reports_attacks_against_utility_and_epsilon(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "privacy-mnist", "--out", str(out), "--no-progress"]
    assert main(args + [a for s in SHRINK for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert (
        "privacy attacks (fedtier.privacy)" in printed
        and "| secagg | sum of 3 uploads |" in printed
    )
    arms = json.loads((out / "summary.json").read_text())["arms"]
    assert set(arms) == {"fp32", "quant16", "quant256", "local-dp", "central-dp", "secagg"}
    inv = {n: a["privacy_attacks"]["inversion"] for n, a in arms.items()}
    assert inv["fp32"]["psnr"] >= 20 and inv["fp32"]["label_correct"] == 1.0
    # the edge adds central DP's noise itself: it inverts exactly what it inverts in fp32
    assert inv["central-dp"]["observes"] == "each upload"
    assert inv["central-dp"]["psnr"] == inv["fp32"]["psnr"]
    # the codec's rounding reaches the attacker: 16 levels cost dB, 256 levels hardly any
    assert inv["quant16"]["psnr"] < inv["fp32"]["psnr"] - 3 < inv["quant256"]["psnr"]
    assert inv["local-dp"]["psnr"] < 12
    assert arms["local-dp"]["privacy"]["epsilon_vs_edge"] <= 8
    assert inv["secagg"]["uploads_summed"] == 3 and inv["secagg"]["matched"] == 3
    assert sorted(p.name for p in (out / "privacy").iterdir()) == sorted(f"{a}.png" for a in arms)
    for a in arms.values():
        mia = a["privacy_attacks"]["mia"]
        assert 0 <= mia["auc"] <= 1 and mia["members"] == mia["non_members"] == 100


def test_a_bad_attack_option_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "privacy-mnist", "--out", str(out), "--set", "eval.privacy.steps=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "eval.privacy.steps" in err and "Traceback" not in err
    assert not out.exists()


def test_the_table_gives_epsilon_against_the_edge_and_the_model():
    from fedtier.results import privacy_attack_table

    attacks = {
        "inversion": {
            "observes": "each upload",
            "label_correct": 1.0,
            "psnr": 30.04,
            "psnr_max": 41.0,
            "ssim": 0.9,
        },
        "mia": {"auc": 0.61},
    }
    arms = {
        "ldp": {
            "privacy_attacks": attacks,
            "cda": {"32": 0.5},
            "privacy": {"epsilon": 1.5, "epsilon_vs_edge": 7.5},
        },
        "cdp": {"privacy_attacks": attacks, "cda": {"32": 0.8}, "privacy": {"epsilon": 7.5}},
        "plain": {"privacy_attacks": attacks, "cda": {"32": 0.9}},
    }
    rows = privacy_attack_table(arms).splitlines()[3:]
    assert (
        rows[0] == "| ldp | each upload | 100% | 30.0 | 41.0 | 0.900 | 0.610 | 50.0 | 7.5 | 1.5 |"
    )
    assert rows[1].endswith("| 80.0 | ∞ | 7.5 |")  # the edge adds central DP's noise itself
    assert rows[2].endswith("| 90.0 | ∞ | ∞ |")
