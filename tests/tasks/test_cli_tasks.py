"""Every task runs through ``fedtier run`` from a YAML file, reports its declared metrics at
every evaluation bit width, and reruns to identical numbers."""

import json
from pathlib import Path

import pytest

import fedtier.presets
from fedtier.cli import main

PRESETS = Path(fedtier.presets.__file__).parent
CASES = {
    "autoencoder-digits": ("mse", {"mse"}),
    "diffusion-test-digits": ("mse", {"mse"}),
    "quick-digits": ("accuracy", {"accuracy", *(f"class_{c}" for c in range(10))}),
}


def _run(path: Path, out: Path, capsys) -> dict:
    argv = ["run", str(path), "--out", str(out), "--no-progress", "--set", "train.rounds=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    return summary, printed


def _numbers(summary: dict) -> dict:
    return {
        arm: {k: v for k, v in a.items() if k != "wall_s"} for arm, a in summary["arms"].items()
    }


@pytest.mark.parametrize("name", CASES)
def test_a_task_runs_from_yaml_with_its_declared_metrics_and_reruns_identically(
    name, tmp_path, capsys
):
    headline, metrics = CASES[name]
    path = PRESETS / f"{name}.yaml"
    summary, printed = _run(path, tmp_path / "a", capsys)
    eval_bits = {"32", "8", "4"} | ({"6"} if name == "quick-digits" else set())
    assert len(summary["arms"]) == 2
    for arm in summary["arms"].values():
        task = arm["task"]
        assert task["headline"] == headline and headline in task["tables"]
        assert set(task["metrics"]) == metrics
        assert set(arm["metrics"]) == eval_bits
        for values in arm["metrics"].values():
            assert set(values) == metrics
            assert all(v == v and v >= 0 for v in values.values())  # measured, not NaN
    qat_arm = next(n for n, a in summary["arms"].items() if a["qat"])
    label = summary["arms"][qat_arm]["task"]["metrics"][headline]["label"]
    assert f"## {label}" in printed and "| 4 |" in printed
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"## {label}" in report and (tmp_path / "a" / f"{headline}.png").is_file()

    again, _ = _run(path, tmp_path / "b", capsys)
    assert _numbers(again) == _numbers(summary)


@pytest.mark.parametrize(
    ("name", "model", "fragment"),
    [
        ("diffusion-test-digits", "mlp", "takes 2 positional arguments"),
        ("autoencoder-digits", "cnn", "different to the input size"),
    ],
)
def test_a_model_that_does_not_fit_the_task_is_a_one_line_error(
    name, model, fragment, tmp_path, capsys
):
    argv = ["run", str(PRESETS / f"{name}.yaml"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--set", f"model.name={model}", "--set", "model.options={}"]) == 2
    err = capsys.readouterr().err
    assert f"train.task '{name.rsplit('-', 1)[0]}' cannot train model '{model}'" in err
    assert fragment in err and "Traceback" not in err
