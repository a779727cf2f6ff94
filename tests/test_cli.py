import json
import subprocess
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------- the run directory
# Every mistake below is tried as a user would type it; each must end with exit status 2 and
# one line on stderr naming the path or field, no traceback, and leave an existing run
# directory byte for byte as it was.

QUICK = ["run", "quick-digits", "--set", "train.rounds=1", "--no-progress"]
TWO_ARMS = (
    "name: two\ndata: {dataset: digits}\n"
    "topology: {edges: 2, clients: 8, edges_per_round: 2, clients_per_edge: 2}\n"
    "model: {name: mlp}\ntrain: {rounds: 4, epochs: 1}\nquant: {eval_bits: [32, 4]}\n"
    "eval: {every: 1}\narms:\n  a: {}\n  b: {train.lr: 0.01}\n"
)


def snapshot(root):
    """{relative path: sha256} of every file under root (names and bytes)."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_clear_line(err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtier: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


@pytest.fixture
def old_run(finished_run, tmp_path):
    """A private copy of a finished run and its hashes."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    return out, snapshot(out)


def test_a_finished_run_is_complete_and_its_plan_counts_rounds_from_one(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["complete"] is True and "stopped" not in summary
    evals = [
        json.loads(line)
        for line in (finished_run / "metrics.jsonl").read_text().splitlines()
        if '"bits"' in line
    ]
    assert [r["round"] for r in evals] == [1, 1]  # two arms, one round each
    assert all(r["plan"]["round"] == r["round"] for r in evals)


def test_an_existing_run_directory_is_refused(old_run, capsys):
    out, before = old_run
    assert main([*QUICK, "--out", str(out)]) == 2
    one_clear_line(capsys.readouterr().err, str(out), "already holds a run", "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.name=nosuch", "unknown model 'nosuch'"),
        ("model.options.nosuch=1", "nosuch"),
        ("data.dataset=cifar10", "data.root"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_errors_while_preparing_leave_the_old_run_and_no_new_directory(
    old_run, tmp_path, capsys, override, fragment, overwrite
):
    out, before = old_run
    flag = ["--overwrite"] if overwrite else []
    assert main([*QUICK, "--set", override, "--out", str(out), *flag]) == 2
    one_clear_line(capsys.readouterr().err, fragment if overwrite else str(out))
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    assert main([*QUICK, "--set", override, "--out", str(fresh)]) == 2
    one_clear_line(capsys.readouterr().err, fragment)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing left beside it


def test_overwrite_replaces_the_run_and_leaves_nothing_of_the_old_one(old_run, tmp_path, capsys):
    out, before = old_run
    (out / "notes.txt").write_text("from the old run")
    argv = [*QUICK, "--set", "seed=1", "--set", "eval.every=1", "--out", str(out)]
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["complete"] is True
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "setup"' in r for r in records) == 2  # only the new run's records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no renamed-aside copy


def test_a_directory_that_holds_no_run_is_never_replaced(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    before = snapshot(mine)
    for flag in ([], ["--overwrite"]):
        assert main([*QUICK, "--out", str(mine), *flag]) == 2
        one_clear_line(capsys.readouterr().err, str(mine), "holds no fedtier run")
    assert snapshot(mine) == before


def test_an_empty_directory_is_a_fine_place_for_a_new_run(tmp_path):
    assert main([*QUICK, "--set", "train.executor=sequential", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").is_file()


def _unwritable(tmp_path):
    import os

    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked / "run", str(locked)
    if os.path.isdir("/proc/self"):  # root may write anywhere except where no one can
        return Path("/proc/self/fedtier-run"), "/proc/self"
    pytest.skip("root can write everywhere here")


@pytest.mark.parametrize("case", ["regular file", "under a file", "unwritable"])
def test_out_paths_that_cannot_hold_a_run_are_one_line_errors(case, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    if case == "regular file":
        out, fragment = a_file, "is a file"
    elif case == "under a file":
        out, fragment = a_file / "sub" / "run", "is a file"
    else:
        out, place = _unwritable(tmp_path)
        fragment = f"cannot write in '{place}'"
    assert main([*QUICK, "--out", str(out)]) == 2
    one_clear_line(capsys.readouterr().err, str(out), fragment)
    assert a_file.read_text() == "not a directory"


def test_a_yaml_error_in_an_override_names_the_override(tmp_path, capsys):
    assert main([*QUICK, "--set", "train.rounds=[1", "--out", str(tmp_path / "o")]) == 2
    one_clear_line(capsys.readouterr().err, "--set 'train.rounds=[1'", "not valid YAML")
    assert not (tmp_path / "o").exists()


def test_more_clients_per_edge_than_an_edge_has_is_refused(tmp_path, capsys):
    import numpy as np

    from fedtier.config import load_config
    from fedtier.topology import build_topology

    # the reference: the smallest edge of the topology the run would build
    cfg = load_config("quick-digits", ["topology.clients=5", "topology.clients_per_edge=2"])
    smallest = min(len(c) for c in build_topology(cfg.topology, np.ones(5), 0).edge_clients)
    assert smallest == 2  # 5 clients over 2 edges: 3 and 2, so a count of 2 is allowed
    argv = [*QUICK, "--set", "topology.clients=5", "--out", str(tmp_path / "o")]
    for count in (smallest + 1, 10):
        assert main([*argv, "--set", f"topology.clients_per_edge={count}"]) == 2
        one_clear_line(
            capsys.readouterr().err,
            "topology.clients_per_edge",
            f"got {float(count)}",
            f"the {smallest} clients of the smallest edge",
        )
    assert not (tmp_path / "o").exists()


def test_bare_fedtier_prints_usage_and_run_alone_is_the_default_preset(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: fedtier") and "run" in out and "presets" in out
    # `fedtier run` with no config still means the default preset (qafed-mnist, 40 rounds):
    assert main(["run", "--set", "train.rounds=0"]) == 2
    one_clear_line(capsys.readouterr().err, "config field 'train.rounds': got 0")
    from fedtier.config import load_config

    assert load_config("qafed-mnist").train.rounds == 40


def test_a_closed_pipe_ends_quietly():
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.Popen(
        [sys.executable, "-m", "fedtier", "presets"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    p.stdout.close()  # the reader is gone before fedtier writes (`fedtier presets | head -0`)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == ""


def _eval_records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "bits" in r]


def test_an_interrupt_in_the_second_arm_gives_an_incomplete_run_whose_tables_match_the_plot(
    tmp_path, capsys, monkeypatch
):
    import fedtier.experiment as experiment

    real = experiment.run_schedule

    def interrupted_in_b(setup, on_eval, on_round, **resume):  # Ctrl-C after b's 2nd round
        def on_round_b(t):
            on_round(t)
            if setup.cfg.train.lr == 0.01 and t == 1:
                raise KeyboardInterrupt

        return real(setup, on_eval, on_round_b, **resume)

    monkeypatch.setattr(experiment, "run_schedule", interrupted_in_b)
    cfg = tmp_path / "two.yaml"
    cfg.write_text(TWO_ARMS)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(out) in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert summary["stopped"] == {
        "reason": "interrupted",
        "not_run": [],
        "arm": "b",
        "rounds_done": 2,
        "rounds": 4,
        "last_evaluation": 2,
    }
    # the plot draws every evaluation in metrics.jsonl: same arms, same last rounds as the tables
    evals = _eval_records(out)
    last = {r["arm"]: r for r in evals}
    assert list(summary["arms"]) == list(last) == ["a", "b"]
    for arm, record in last.items():
        assert summary["arms"][arm]["rounds"] == record["round"]
        assert summary["arms"][arm]["cda"] == {b: m["accuracy"] for b, m in record["bits"].items()}
    assert [r["round"] for r in evals] == [1, 2, 3, 4, 1, 2]
    report = (out / "report.md").read_text()
    assert "Incomplete run" in report and "arm 'b' stopped after round 2 of 4" in report
    assert "| 4 | 2 |" not in report and "| b | 2 |" in report  # the rounds table
    # Ctrl-C leaves a checkpoint: --resume finishes the run as if it had never stopped
    monkeypatch.setattr(experiment, "run_schedule", real)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    whole = tmp_path / "whole"
    assert main(["run", str(cfg), "--out", str(whole), "--no-progress"]) == 0

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "wall_s"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["complete"] is True and "stopped" not in resumed
    assert strip(resumed) == strip(json.loads((whole / "summary.json").read_text()))
    assert [r["round"] for r in _eval_records(out)][-2:] == [3, 4]  # b continued from round 2


def test_report_prints_everything_the_run_printed(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    for fragment in ("Clean accuracy (%)", "| 32 |", "communication and energy", "| qafed |"):
        assert fragment in printed
    assert "Incomplete" not in printed
    (out / "summary.json").unlink()  # as after kill -9: rebuilt from metrics.jsonl
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Incomplete run (no summary.json" in printed and "'fedavg' round 1" in printed
    assert "communication and energy" in printed
    assert "Incomplete run" in (out / "report.md").read_text()


SIGINT_RUN = (
    "name: sig\ndata: {dataset: digits}\n"
    "topology: {edges: 2, clients: 8, edges_per_round: 2, clients_per_edge: 2}\n"
    "model: {name: cnn-bn, options: {width: 0.5, hidden: 32}}\n"
    "train: {rounds: 1000, epochs: 1, executor: processes}\n"
    "quant: {eval_bits: [32]}\neval: {every: 1}\n"
)


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.is_file():
        pytest.skip("needs Linux's /proc/<pid>/task/<pid>/children")
    return [int(c) for c in path.read_text().split()]


def _ignores(pid, signum):
    """True when process ``pid`` ignores ``signum`` (its SigIgn mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no SigIgn line for {pid}")


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_ctrl_c_with_worker_processes_prints_one_clean_line(tmp_path, start_method):
    import os
    import signal
    import time

    cfg = tmp_path / "sig.yaml"
    cfg.write_text(
        SIGINT_RUN.replace(
            "executor: processes", f"executor: processes, start_method: {start_method}"
        )
    )
    out = tmp_path / "run"
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "PYTHONFAULTHANDLER": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "fedtier", "run", str(cfg), "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, like a shell job
    )
    try:
        deadline = time.monotonic() + 600  # a spawned pool on a crowded CI machine is slow
        evaluated = False
        while time.monotonic() < deadline and p.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"bits"') >= 1:
                evaluated = True
                break
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()
        assert evaluated, "no evaluation recorded before the deadline"
        workers = _children(p.pid)
        assert workers, "the processes executor started no worker"
        for pid in workers:  # deterministic half of the check: the workers ignore SIGINT
            assert _ignores(pid, signal.SIGINT), pid
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: the parent and its workers
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # hung: show where (faulthandler dumps on SIGABRT)
            os.kill(p.pid, signal.SIGABRT)
            raise AssertionError("no exit after Ctrl-C:\n" + p.communicate(timeout=60)[1]) from None
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    # nothing from the workers either (a dying worker starts with "Process ForkPoolWorker-1:")
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("fedtier: ") for line in lines), err
    assert lines[-1].startswith("fedtier: interrupted; the run directory")
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["stopped"]
    assert summary["complete"] is False and stop["arm"] == "main"
    assert stop["last_evaluation"] == _eval_records(out)[-1]["round"] >= 1
