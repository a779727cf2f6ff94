"""The ssdiff-backdoor-mnist preset through the CLI, shrunk to seconds with --set."""

from __future__ import annotations

import json
from typing import get_args

import pytest

from fedtier.cli import main
from fedtier.config import DetectorName, ResponseName
from fedtier.defenses.sampling import DETECTORS, RESPONSES

SHRINK = [
    "pretrain.steps=4",
    "train.rounds=1",
    "topology.clients=4",
    "topology.clients_per_edge=2",
    "model.options={channels: [8, 8], layers_per_block: 1, norm_groups: 4}",
    "train.task.sample_steps=3",
    "train.task.shared_steps=1",
    "detection={samples: 24, triggered: 12, reference: 12, batch_size: 10, batches: 2, fid: false}",
]


def _argv(tmp_path, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    sets = [x for s in (*SHRINK, *extra) for x in ("--set", s)]
    return ["run", "ssdiff-backdoor-mnist", *sets, "--out", str(tmp_path / "run"), "--no-progress"]


def test_config_names_are_the_defenses_names() -> None:
    assert get_args(DetectorName) == DETECTORS
    assert get_args(ResponseName) == RESPONSES


def test_preset_runs_both_arms_and_reports_every_table(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FEDTIER_CACHE", str(tmp_path / "cache"))
    assert main(_argv(tmp_path)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    clean, bad = summary["arms"]["clean"]["detection"], summary["arms"]["backdoor"]["detection"]
    assert clean["malicious"] == 0 and bad["malicious"] == 1  # 30% of 4 devices
    for det in (bad, clean):
        assert set(det["rates"]) == {"visible", "stealthy"}
        assert set(det["rates"]["visible"]) == {*DETECTORS, "chi2"}
        assert set(det["rates"]["visible"]["kmeans"]) == {"0", "0.1", "0.3"}
        assert set(det["no_defense"]) == {"visible", "stealthy"}
        for row in (det["responses"][d] for d in (*DETECTORS, "chi2")):
            assert set(row) >= {"tpr", "fpr", *RESPONSES}
            assert 0.0 <= row["reject"]["asr"] <= 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    for text in (
        "Trigger detection at the edge",
        "All-clean batches",
        "AUROC of d after k",
        "Responses",
    ):
        assert text in report and text in printed
    assert "backdoor (backdoored), visible" in report and "clean (clean model)" in report
    for arm in ("clean", "backdoor"):
        for kind in ("clean", "visible", "stealthy"):
            png = tmp_path / "run" / "plots" / f"triggered-{arm}-{kind}.png"
            assert png.is_file() and f"plots/{png.name}" in report
        png = tmp_path / "run" / "plots" / f"auroc-by-step-{arm}.png"  # AUROC against k
        assert png.is_file() and f"plots/{png.name}" in report
    # the AUROC after every k = 1 … S = 3, one row per k, the edge's t = 1 marked
    for det in (bad, clean):
        assert [len(det["auroc_by_step"][t]) for t in ("visible", "stealthy")] == [3, 3]
        assert det["auroc_by_step"]["visible"][0] == det["auroc"]["visible"]
    rows = [
        line for line in report.splitlines() if line.startswith(("| 1 (t) |", "| 2 |", "| 3 |"))
    ]
    assert len(rows) == 3 and all(line.count("|") == 6 for line in rows)


def test_the_edge_samples_with_the_tasks_clip_x0(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """train.task.clip_x0 reaches the edge's chain: the same models, other distances d."""
    monkeypatch.setenv("FEDTIER_CACHE", str(tmp_path / "cache"))
    runs = {}
    for clip in ("false", "true"):
        out = tmp_path / clip
        sets = ["train.task.clip_x0=" + clip, "detection.responses=[reject]", "arms={backdoor: {}}"]
        argv = _argv(tmp_path, *sets)
        argv[argv.index("--out") + 1] = str(out)
        assert main(argv) == 0, capsys.readouterr().err
        runs[clip] = json.loads((out / "summary.json").read_text())["arms"]["backdoor"]
    plain, clipped = runs["false"], runs["true"]
    assert plain["metrics"] == clipped["metrics"]  # training does not sample
    assert plain["detection"]["distance"] != clipped["detection"]["distance"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("detection.detectors=[k-means]", "did you mean 'kmeans'"),
        ("trigger.size=17", "trigger.size"),
        ("attack.kind=none", "attack.kind: baddiffusion"),
        ("detection.shares=[1.5]", "detection.shares"),
        ("train.task.clip_x0=true", "itc clamps"),  # itc would change nothing
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, monkeypatch, capsys, extra, fragment) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FEDTIER_CACHE", str(tmp_path / "cache"))
    assert main(_argv(tmp_path, extra)) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
