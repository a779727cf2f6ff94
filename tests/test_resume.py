"""kill -9 at any point, then ``fedtier run --resume DIR``: the same summary, models and
evaluation records as the uninterrupted run (real subprocesses, real signals)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtier.cli import main
from fedtier.results import read_run

SYNC = """
name: resume-sync
seed: 3
data: {dataset: digits, partition: dirichlet, alpha: 1.0}
topology: {edges: 2, clients: 12, edges_per_round: 2, clients_per_edge: 3}
model: {name: cnn-bn, options: {width: 0.5, hidden: 16}}
train: {rounds: 7, epochs: 1, batch_size: 16, lr: 0.05, momentum: 0.9}
quant: {bits: [8], eval_bits: [32, 8]}
eval: {every: 1}
costs: {deadline_s: 1000.0, allocation: optimal}
arms:
  qat-fedbn: {quant.qat: true, model.batchnorm: local, aggregate.edge_rounds: 2}
  topk-ef: {upload: [{name: topk, ratio: 0.1}]}
"""

ASYNC = """
name: resume-async
seed: 1
data: {dataset: digits}
topology: {edges: 2, clients: 10, edges_per_round: 2, clients_per_edge: 2}
model: {name: mlp}
train: {rounds: 8, epochs: 1, batch_size: 16, lr: 0.05}
quant: {eval_bits: [32]}
eval: {every: 1}
schedule: {name: fedbuff, concurrency: 4, buffer: 2}
arms:
  fedbuff: {}
  gossip: {schedule.name: gossip, schedule.peers: 1, schedule.cloud_every: 2}
"""


def _run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedtier", "run", *args, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _kill_when(proc: subprocess.Popen, metrics: Path, ready) -> None:
    """SIGKILL ``proc`` as soon as ``ready(lines)`` holds for metrics.jsonl's lines."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if ready([json.loads(x) for x in lines if x.strip().endswith("}")]):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.01)
    raise AssertionError("kill point not reached")


def _evals(arm: str, n: int):
    return lambda records: sum(r.get("arm") == arm and "bits" in r for r in records) >= n


def _setup_of(arm: str):
    return lambda records: any(r.get("arm") == arm and r.get("event") == "setup" for r in records)


def _strip_wall(x):
    if isinstance(x, dict):
        return {k: _strip_wall(v) for k, v in x.items() if k != "wall_s"}
    if isinstance(x, list):
        return [_strip_wall(v) for v in x]
    return x


def _models(out: Path) -> dict[str, dict]:
    return {p.name: load_file(str(p)) for p in sorted((out / "models").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs."""
    root = tmp_path_factory.mktemp("reference")
    outs = {}
    for name, text in (("sync", SYNC), ("async", ASYNC)):
        cfg = root / f"{name}.yaml"
        cfg.write_text(text)
        outs[name] = root / name
        proc = _run([str(cfg), "--out", str(outs[name])])
        assert proc.wait() == 0, proc.stderr.read().decode() if proc.stderr else ""
    return outs


@pytest.mark.parametrize(
    "kind, kill_point",
    [
        ("sync", _evals("qat-fedbn", 3)),  # mid first arm
        ("sync", _setup_of("topk-ef")),  # between arms / early in the second
        ("sync", _evals("topk-ef", 5)),  # late in the second arm
        ("async", _evals("fedbuff", 3)),  # FedBuff's queue and buffer in flight
        ("async", _evals("gossip", 3)),  # gossip's client models since the last consensus
    ],
)
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, reference, kind, kill_point):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SYNC if kind == "sync" else ASYNC)
    out = tmp_path / "run"
    _kill_when(_run([str(cfg), "--out", str(out)]), out / "metrics.jsonl", kill_point)
    assert not (out / "summary.json").exists()
    proc = _run(["--resume", str(out)])
    assert proc.wait() == 0, proc.stderr.read().decode() if proc.stderr else ""
    ref = reference[kind]
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert _strip_wall(got) == _strip_wall(want)
    models, ref_models = _models(out), _models(ref)
    assert models.keys() == ref_models.keys() and models
    for name, tensors in models.items():
        assert tensors.keys() == ref_models[name].keys()
        for k, v in tensors.items():
            assert v.equal(ref_models[name][k]), (name, k)
    # the evaluation records a reader sees are those of the uninterrupted run
    records, _ = read_run(out)
    want_records, _ = read_run(ref)
    strip = [_strip_wall(r) for r in records if r.get("event") != "resume"]
    assert strip == [_strip_wall(r) for r in want_records]


def _tree_hash(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_resume_refuses_another_config_and_leaves_the_directory_alone(tmp_path, capsys, reference):
    out = reference["async"]
    before = _tree_hash(out)
    code = main(["run", "--resume", str(out), "--set", "train.lr=0.1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "Traceback" not in err
    assert _tree_hash(out) == before


def test_resume_of_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "not a fedtier run directory" in capsys.readouterr().err


def test_final_model_loads_with_the_documented_one_liner(reference):
    from fedtier.checkpoint import load_model

    model = load_model(reference["sync"], "qat-fedbn")
    state = load_file(str(reference["sync"] / "models" / "qat-fedbn.safetensors"))
    assert all(model.state_dict()[k].equal(v) for k, v in state.items())
    assert any("_q8" in k for k in state)  # QAT's per-precision BatchNorm statistics travel


def dropout_mlp(input_shape, num_classes):
    """A model whose training draws from torch's global stream (dropout, sequential executor)."""
    import math

    from torch import nn

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, num_classes),
    )


DROPOUT = """
name: resume-dropout
seed: 5
data: {dataset: digits}
topology: {edges: 2, clients: 8, edges_per_round: 2, clients_per_edge: 2}
model: {name: "tests.test_resume:dropout_mlp"}
train: {rounds: 6, epochs: 1, batch_size: 32, lr: 0.05, executor: sequential}
quant: {eval_bits: [32]}
eval: {every: 1}
"""


def test_interrupt_and_resume_continue_torchs_global_stream(tmp_path, monkeypatch):
    import fedtier.experiment as experiment

    cfg = tmp_path / "c.yaml"
    cfg.write_text(DROPOUT)
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(whole), "--no-progress"]) == 0
    real = experiment.run_schedule

    def ctrl_c_after_round_3(setup, on_eval, on_round, **resume):
        def on_round_3(t):
            on_round(t)
            if t == 2:
                raise KeyboardInterrupt

        return real(setup, on_eval, on_round_3, **resume)

    monkeypatch.setattr(experiment, "run_schedule", ctrl_c_after_round_3)
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.setattr(experiment, "run_schedule", real)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    got = json.loads((out / "summary.json").read_text())
    assert _strip_wall(got) == _strip_wall(json.loads((whole / "summary.json").read_text()))
    for name, tensors in _models(out).items():
        for k, v in tensors.items():
            assert v.equal(_models(whole)[name][k]), (name, k)
