"""The GAN presets through ``fedtier run`` (shrunk to seconds by --set), and the GAN arms'
refusals of what cannot apply to them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtier.cli import main
from fedtier.config import from_dict, load_config
from fedtier.errors import ConfigError

# tiny models and counts; the async arm keeps its method and update but not its long cap
SHRINK = [
    "gan.i_gl=2",
    "gan.i_lo=2",
    "gan.batch_size=16",
    "gan.z_dim=8",
    "gan.generator.options.width=4",
    "gan.discriminator.options.width=4",
    "train.task.fid_samples=40",
    "train.task.final_samples=120",
    "train.task.judge_epochs=1",
    "eval.every=1",
    "arms.three-tier-async={train.task.method: three-tier, gan.update: async, "
    "schedule.time_budget_s: 30}",
]


@pytest.fixture(autouse=True)
def _private_judge_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIER_CACHE", str(tmp_path / "cache"))


def _run(preset: str, out: Path, extra: tuple[str, ...] = ()) -> dict:
    argv = ["run", preset, "--out", str(out), "--no-progress"]
    for item in (*SHRINK, *extra):
        argv += ["--set", item]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_feature_preset_runs_every_arm_with_equal_generator_updates(tmp_path, capsys):
    # digits (8×8) keeps the judge's training to a second; the preset's split is unchanged
    summary = _run("fedgan-feature-mnist", tmp_path / "run", ("data.dataset=digits",))
    printed = capsys.readouterr().out
    arms = summary["arms"]
    assert list(arms) == [
        "three-tier",
        "three-tier-async",
        "three-tier-pos",
        "three-tier-mixture",
        "fedavg-gan",
        "central",
    ]
    for name, arm in arms.items():
        g = arm["gan"]
        assert g["samples"] == 120
        assert sum(g["class_shares"]) == pytest.approx(1.0)
        assert g["fid"] > 0 and 0 < g["confidence"] <= 1 and g["kl"] >= 0
        # feature split: 3 regions of disjoint class groups 0-3, 4-6, 7-9
        assert g["region_classes"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
        assert (tmp_path / "run" / g["grid"]).is_file()
        if name != "three-tier-async":  # the async arm stops at its simulated time budget
            assert arm["generator_updates"] == 4  # i_gl × i_lo along the path to G
    assert arms["fedavg-gan"]["generator_updates_all"] == 4 * 9  # 9 devices' copies
    assert arms["three-tier"]["generator_updates_all"] == 4 * 3  # 3 community generators
    assert arms["central"]["generator_updates_all"] == 4
    assert arms["three-tier-async"]["costs"]["time_s"] <= 30 + 1e-6
    # FID every round: two evaluations per sync arm
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    fids = [r["bits"]["32"]["fid"] for r in records if r["arm"] == "fedavg-gan" and "bits" in r]
    assert len(fids) == 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "in-house" in report and "not on Inception" in report
    assert "## Bytes per tier" in report and "## Three-tier region weights" in report
    # weights along the run: the three-tier arm's 2 cloud updates, ⌈2·f/5⌉ → 1, 1, 2, 2, 2
    w = arms["three-tier"]["weights"]
    row = next(x for x in report.splitlines() if x.startswith("| three-tier | 1: "))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells == [f"{i}: " + " / ".join(f"{v:.2f}" for v in w[i - 1]) for i in (1, 1, 2, 2, 2)]
    assert (tmp_path / "run" / "fid.png").is_file()
    assert "FID ≤ 1.5× central" in printed


def test_label_preset_reports_sources(tmp_path):
    summary = _run("fedgan-label-mnist", tmp_path / "a")
    arms = summary["arms"]
    assert list(arms) == [
        "three-tier",
        "three-tier-async",
        "three-tier-pos",
        "three-tier-mixture",
        "fedavg-gan",
        "central",
    ]
    for arm in arms.values():
        g = arm["gan"]
        assert len(g["source_shares"]) == 3 and sum(g["source_shares"]) == pytest.approx(1.0)
        assert len(g["source_fid"]) == 3
        assert g["region_classes"] == [list(range(10))] * 3  # every source holds every digit
    report = (tmp_path / "a" / "report.md").read_text()
    assert "each ≥ 10%" in report


def test_a_gan_run_reruns_identically(tmp_path):
    arms = "arms={three-tier: {train.task.method: three-tier}, f: {train.task.method: fedavg}}"
    extra = ("data.dataset=digits", arms)
    first = _run("fedgan-feature-mnist", tmp_path / "a", extra)
    again = _run("fedgan-feature-mnist", tmp_path / "b", extra)
    for name, arm in first["arms"].items():
        for key in ("gan", "metrics", "costs", "generator_updates", "weights"):
            assert again["arms"][name].get(key) == arm.get(key), (name, key)


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtier: error:") and "Traceback" not in err
    return err


def test_what_cannot_apply_to_a_gan_is_refused_naming_both(tmp_path, capsys):
    out = tmp_path / "never"
    base = ["run", "fedgan-feature-mnist", "--out", str(out)]
    # a rule over client model updates: the three-tier GAN's edges aggregate none
    err = _refused([*base, "--set", "aggregate.edge_rule=median"], capsys)
    assert "aggregate.edge_rule" in err and "median" in err and "three-tier GAN" in err
    # a codec accounted per round of clients' model updates, on feedback
    err = _refused([*base, "--set", "upload=[{name: ldp}]"], capsys)
    assert "upload[0].name" in err and "ldp" in err and "three-tier GAN" in err
    # an attack that trains on labels, under FedAvg of GANs
    fedavg = [*base, "--set", "arms={f: {train.task.method: fedavg}}"]
    err = _refused([*fedavg, "--set", "attack=fqbd"], capsys)
    assert "attack.kind" in err and "fqbd" in err and "train.task 'gan'" in err
    err = _refused([*fedavg, "--set", "quant.qat=true"], capsys)
    assert "quant.qat" in err and "train.task 'gan'" in err
    assert not out.exists()  # refused before the run directory is made


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("gan.i_lo", 0, "gan.i_lo"),
        ("gan.i_gl", -1, "gan.i_gl"),
        ("gan.temperature", 0, "gan.temperature"),
        ("train.task.method", "fedgan", "train.task.method"),
        ("train.task.fid_samples", 1, "train.task.fid_samples"),
        ("train.task.judge_epochs", 0, "train.task.judge_epochs"),
    ],
)
def test_invalid_gan_settings_name_the_field(key, value, field):
    with pytest.raises(ConfigError) as e:
        load_config("fedgan-feature-mnist", [f"{key}={value}"])
    assert e.value.field.endswith(field)


def test_a_gan_config_written_from_scratch_needs_only_the_task():
    cfg = from_dict({"train": {"task": {"name": "gan", "method": "central"}}})
    assert cfg.gan.i_lo == 10 and cfg.train.task.final_samples == 10000
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        from_dict({"train": {"task": {"name": "gan", "method": "fedavgg"}}})
