import json
import subprocess
import sys

import pytest

from fedtier.cli import main


def test_presets_lists_names_with_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "qafed-mnist" in out and "FedAvg" in out


def test_run_a_yaml_file_with_overrides_then_report(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: cli\ndata: {dataset: digits}\n"
        "topology: {edges: 2, clients: 8, edges_per_round: 2, clients_per_edge: 2}\n"
        "model: {name: mlp}\ntrain: {rounds: 5, epochs: 1}\nquant: {eval_bits: [32, 4]}\n"
    )
    out = tmp_path / "run"
    assert (
        main(["run", str(cfg), "--set", "train.rounds=2", "--out", str(out), "--no-progress"]) == 0
    )
    printed = capsys.readouterr().out
    assert "| 32 |" in printed and "| 4 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["main"]["rounds"] == 2
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["run", "qafed-mnist", "--set", "train.rounds=-1"], "config field 'train.rounds': got -1"),
        (["run", "qafed-mnist", "--set", "model.name=resnet19"], "unknown model 'resnet19'"),
        (["run", "qafed-mnist", "--set", "data.dataset=imagenet"], "unknown data set 'imagenet'"),
        (["run", "qafed-mnist", "--set", "data.dataset=cifar10"], "data.root"),
        (["report", "/nonexistent/run"], "does not exist"),
    ],
)
def test_user_mistakes_print_one_clear_line_and_exit_2(argv, fragment, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_python_dash_m_works():
    r = subprocess.run(
        [sys.executable, "-m", "fedtier", "presets"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "qafed-mnist" in r.stdout
