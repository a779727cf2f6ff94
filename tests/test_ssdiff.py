"""The ssdiff-mnist preset through the CLI, shrunk by --set: pretraining cached and reused,
fine-tuning, generative report, collaborative sampling costs, init_from, and reruns."""

import json

import pytest

from fedtier.cli import main

SMALL = [
    "model.options.channels=[8, 16]",
    "model.options.layers_per_block=1",
    "pretrain.steps=3",
    "pretrain.warmup=1",
    "topology.clients=6",
    "topology.clients_per_edge=2",
    "train.rounds=1",
    "train.executor=sequential",
    "train.task.samples=24",
    "train.task.sample_steps=4",
    "train.task.shared_steps=2",
    "train.task.grid=8",
]


def _sets(extra=()):
    return [a for s in [*SMALL, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run(cache, monkeypatch, capsys):
    monkeypatch.setenv("FEDTIER_CACHE", str(cache))

    def go(out, *extra):
        code = main(["run", "ssdiff-mnist", "--out", str(out), "--no-progress", *_sets(extra)])
        captured = capsys.readouterr()
        return code, captured

    return go


def test_the_preset_pretrains_once_fine_tunes_and_reports_samples_and_costs(run, tmp_path, cache):
    code, first = run(tmp_path / "a")
    assert code == 0, first.err
    assert "trained now" in first.err
    assert list((cache / "pretrained").glob("*.safetensors"))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"fp32", "dynamic"}
    for name, arm in arms.items():
        g = arm["generation"]
        assert g["samples"] == 24 and g["classes"] == [5, 6, 7, 8, 9]
        for m in (g["before"], g["after"]):
            assert m["fid"] >= 0 and 0 <= m["mean_confidence"] <= 1
            assert len(m["class_shares"]) == 10
            assert sum(m["class_shares"]) == pytest.approx(1.0)
        assert g["before"]["pretrain_classes"] == [0, 1, 2, 3, 4]
        table = g["sampling"]["table"]
        assert [r["t"] for r in table] == [0, 1, 2, 3, 4]
        assert g["sampling"]["used"] == table[2]
        assert arm["costs"]["sampling_bytes_up"] == table[2]["bytes_up"] > 0
        assert (tmp_path / "a" / "plots" / f"samples-{name}.png").is_file()
    assert (tmp_path / "a" / "plots" / "samples-before-fine-tuning.png").is_file()
    # the U-Net's FLOPs price training; optimal allocation beats (f_max, P_max)
    for arm in arms.values():
        assert arm["costs"]["energy_j"] < arm["costs"]["energy_at_max_j"]
    fp32, dyn = arms["fp32"]["costs"], arms["dynamic"]["costs"]
    assert dyn["bytes_client_edge"] < fp32["bytes_client_edge"] / 4
    assert "in-house CNN" in first.out and "Collaborative sampling" in first.out
    assert "Pretrained model: " in first.out and "pretraining took" in first.out
    assert summary["pretrained"] and not next(iter(summary["pretrained"].values()))["cached"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "![fp32](plots/samples-fp32.png)" in report

    code, again = run(tmp_path / "b")
    assert code == 0 and "found in the cache" in again.err and "trained now" not in again.err
    rerun = json.loads((tmp_path / "b" / "summary.json").read_text())
    for name in arms:
        for key in ("costs", "metrics"):
            assert rerun["arms"][name][key] == arms[name][key]
        for key in ("before", "after", "sampling"):  # the judge is now cached: same numbers
            assert rerun["arms"][name]["generation"][key] == arms[name]["generation"][key]

    # the preset clamps x̂_0 while sampling; without it, the same models give other samples
    # (sampling settings are not part of the pretrained model's cache key)
    code, plain_out = run(tmp_path / "c", "train.task.clip_x0=false")
    assert code == 0 and "found in the cache" in plain_out.err
    clamped = "DDIM 4 steps (x̂_0 clamped to [−1, 1] at every step), the edge running"
    assert clamped in first.out and "DDIM 4 steps, the edge running" in plain_out.out
    plain = json.loads((tmp_path / "c" / "summary.json").read_text())["arms"]
    for name in arms:
        assert plain[name]["metrics"] == arms[name]["metrics"]
        for key in ("before", "after"):
            assert plain[name]["generation"][key]["fid"] != arms[name]["generation"][key]["fid"]


def test_pretrain_command_and_init_from(run, tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("FEDTIER_CACHE", str(cache))
    assert main(["pretrain", "ssdiff-mnist", "--no-progress", *_sets()]) == 0
    path = capsys.readouterr().out.split()[0]
    assert path.endswith(".safetensors") and path.startswith(str(cache))
    # any compatible checkpoint: the pretrained file itself
    code, out = run(tmp_path / "c", f"model.init_from={path}", "train.task.samples=0")
    assert code == 0, out.err
    # another architecture: one line naming the field and the file
    code, out = run(tmp_path / "d", f"model.init_from={path}", "model.options.channels=[8, 8]")
    assert code == 2
    assert "model.init_from" in out.err and "another architecture" in out.err
    assert out.err.count("\n") == 1 and not (tmp_path / "d").exists()


def test_a_config_without_pretraining_has_nothing_to_pretrain(capsys):
    assert main(["pretrain", "quick-digits"]) == 2
    assert "no 'pretrain' section" in capsys.readouterr().err
