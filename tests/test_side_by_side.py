"""Arms side by side (``fedtier run --jobs N``): the same run directory as one arm at a time."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtier.checkpoint import load_checkpoint
from fedtier.cli import main
from fedtier.errors import FedtierError
from fedtier.experiment import run_experiment, shared_prefixes
from fedtier.side_by_side import ArmProcesses, resolve_jobs
from tests.conftest import tiny_config


def _lines(path):
    """metrics.jsonl, line by line, without wall-clock times."""
    out = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("wall_s", None)
        out.append(r)
    return out


def _without_times(summary):
    arms = {a: {k: v for k, v in e.items() if k != "wall_s"} for a, e in summary["arms"].items()}
    return {**summary, "arms": arms}


def test_side_by_side_writes_the_run_of_one_arm_at_a_time(tmp_path):
    """Four arms, one a donor whose first rounds two others share: with 2 and 3 arms at once
    the summary, every metrics.jsonl line (in the same order), the final models and the
    checkpoint's finished arms are those of the one-at-a-time run."""
    arms = {
        "none": {"attack.kind": "none"},
        "bd": {"attack.kind": "replacement"},
        "sf": {"attack.kind": "sign-flip"},
        "lf": {"attack.kind": "label-flip"},
    }
    cfg = tiny_config(
        **{
            "train.rounds": 4,
            "attack.kind": "replacement",
            "attack.malicious_ids": [0, 1, 6, 7],
            "attack.start_round": 2,
            "attack.epochs": 1,
            "eval.asr": True,
            "arms": arms,
        }
    )
    assert shared_prefixes(cfg.arm_configs()) == {"sf": ("bd", 2), "lf": ("bd", 2)}
    one = run_experiment(cfg, tmp_path / "one", progress=False, jobs=1)
    for jobs in (2, 3):
        out = tmp_path / f"jobs{jobs}"
        together = run_experiment(cfg, out, progress=False, jobs=jobs)
        assert together["complete"] is True
        assert _without_times(together) == _without_times(one), jobs
        assert list(together["arms"]) == list(arms)
        assert _lines(out) == _lines(tmp_path / "one"), jobs
        for arm in arms:
            name = f"models/{arm}.safetensors"
            a, b = load_file(out / name), load_file(tmp_path / "one" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
        ck, ck1 = load_checkpoint(out), load_checkpoint(tmp_path / "one")
        assert ck is not None and ck1 is not None
        assert list(ck["arms_done"]) == list(arms) and ck["metrics_lines"] == ck1["metrics_lines"]
    # the donor really trained the shared rounds once: the siblings' records of rounds 1-2
    # are the donor's, and after the attack starts they differ
    lines = _lines(tmp_path / "jobs2")
    evals = {a: [r for r in lines if r.get("arm") == a and "round" in r] for a in arms}
    assert evals["sf"][1]["bits"] == evals["bd"][1]["bits"]
    assert evals["sf"][-1]["bits"] != evals["bd"][-1]["bits"]


@pytest.mark.parametrize(
    "value, arms, expected",
    [(1, 5, 1), (2, 5, 2), ("3", 5, 3), (8, 3, 3), ("auto", 1, 1)],
)
def test_jobs_are_capped_by_the_arms(value, arms, expected):
    assert resolve_jobs(value, arms) == expected


def test_auto_takes_the_environment_or_one_per_core(monkeypatch):
    monkeypatch.setenv("FEDTIER_JOBS", "2")
    assert resolve_jobs("auto", 6) == 2
    monkeypatch.delenv("FEDTIER_JOBS")
    cores = len(os.sched_getaffinity(0))
    assert resolve_jobs("auto", 64) == cores and resolve_jobs(None, 1) == 1
    monkeypatch.setenv("FEDTIER_JOBS", "many")
    with pytest.raises(FedtierError, match=r"FEDTIER_JOBS: 'many' is not allowed"):
        resolve_jobs("auto", 3)


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_jobs_value_is_one_line_and_writes_nothing(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert main(["run", "quick-digits", "--out", str(out), "--jobs", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedtier: error: --jobs: '{bad}' is not allowed; give a whole number ≥ 1 or 'auto'"
    ]
    assert not out.exists()


def _ok(arm, value, *, writer, bar, save, prefixes):
    writer.log({"arm": arm, "value": value})
    bar.update(2)
    prefixes[arm] = {"x": torch.tensor([value])}
    return {"value": value, "threads": torch.get_num_threads()}


def _user_mistake(arm, *, writer, bar, save, prefixes):
    raise FedtierError("train.lr: -1 is not allowed")


def _dies(arm, *, writer, bar, save, prefixes):
    os._exit(3)


def _leaves_a_stubborn_worker(arm, pidfile, *, writer, bar, save, prefixes):
    """An arm that starts a child which ignores SIGTERM (a worker its arm cannot close),
    writes the child's pid, and keeps running."""
    import subprocess
    import sys
    import time

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code])
    Path(pidfile).write_text(str(child.pid))
    while True:
        time.sleep(0.1)


def test_stop_leaves_no_process_of_an_arm_behind(tmp_path):
    """The arm leads its own process group; stop() ends the arm and, after the grace period,
    kills what is left of its group: here a child that ignores SIGTERM."""
    import time

    pidfile = tmp_path / "child.pid"
    procs = ArmProcesses()
    procs.start("a", _leaves_a_stubborn_worker, (str(pidfile),), tmp_path, 1)
    arm = procs.running["a"]
    child = None
    try:
        for _ in range(600):
            if pidfile.is_file() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        assert os.getpgid(arm.pid) == arm.pid != os.getpgid(0)  # a group of its own
        assert os.getpgid(child) == arm.pid
        procs.stop(grace_s=1.0)
        assert not procs.running and arm.exitcode is not None
        proc = Path(f"/proc/{child}")
        for _ in range(100):  # the killed child is reaped by init
            if not proc.exists() or _state(proc) == "Z":
                break
            time.sleep(0.1)
        assert not proc.exists() or _state(proc) == "Z"
    finally:  # whatever failed above, leave nothing running
        if arm.is_alive():
            arm.kill()
            arm.join()
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, 9)


def test_arm_processes_bring_back_records_progress_prefixes_and_entries(tmp_path):
    procs = ArmProcesses()
    procs.start("a", _ok, (7,), tmp_path, 1)
    got = list(procs.messages(poll_s=0.2))
    kinds = [k for k, _, _ in got]
    assert kinds == ["log", "round", "prefix", "done"]
    assert got[0][2] == {"arm": "a", "value": 7} and got[1][2] == 2
    assert torch.equal(got[2][2]["x"], torch.tensor([7]))
    assert got[3][2] == {"value": 7, "threads": 1}
    assert not procs.running


def test_an_arm_process_reports_a_user_mistake_and_a_death(tmp_path):
    procs = ArmProcesses()
    procs.start("bad", _user_mistake, (), tmp_path, 1)
    assert list(procs.messages(poll_s=0.2)) == [
        ("user-error", "bad", "train.lr: -1 is not allowed")
    ]
    procs.start("gone", _dies, (), tmp_path, 1)
    with pytest.raises(FedtierError, match=r"arm 'gone': its process ended \(exit code 3\)"):
        list(procs.messages(poll_s=0.2))
    procs.stop()


def _stat(proc, field):
    """Field ``field`` of /proc/PID/stat after the command name (0: state, 2: process group,
    3: session), or None when the process is gone."""
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[field]
    except (OSError, IndexError):
        return None


def _state(proc):
    return _stat(proc, 0)


def _session(proc):
    value = _stat(proc, 3)
    return None if value is None else int(value)


def test_ctrl_c_side_by_side_stops_every_arm_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the process group) with two arms at once, each with worker
    processes: one clean line, exit 130, no process left, and both arms' evaluations so far
    in the tables, marked incomplete."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cfg = tmp_path / "sig.yaml"
    cfg.write_text(
        "name: sig\ndata: {dataset: digits}\n"
        "topology: {edges: 2, clients: 8, edges_per_round: 2, clients_per_edge: 2}\n"
        "model: {name: cnn-bn, options: {width: 0.5, hidden: 32}}\n"
        "train: {rounds: 1000, epochs: 1, executor: processes}\n"
        "quant: {eval_bits: [32]}\neval: {every: 1}\n"
        "arms: {a: {}, b: {train.lr: 0.05}}\n"
    )
    out = tmp_path / "run"
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "FEDTIER_JOBS": "2"}
    p = subprocess.Popen(
        [sys.executable, "-m", "fedtier", "run", str(cfg), "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and p.poll() is None:
            metrics = out / "metrics.jsonl"  # arm a's records come as they are made
            if metrics.is_file() and metrics.read_text().count('"bits"') >= 2:
                break
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()
        time.sleep(1.0)  # arm b has evaluated by now too (it started with a)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("fedtier: ") for line in lines), err
    assert lines[-1].startswith("fedtier: interrupted; the run directory")
    left = []
    for _ in range(100):  # the session empties: arms (each in a group of its own) and their
        # workers; orphans are reaped
        left = [
            (d.name, (d / "cmdline").read_bytes()[:80])
            for d in Path("/proc").iterdir()
            if d.name.isdigit() and _session(d) == p.pid and _state(d) != "Z"
        ]
        if not left:
            break
        time.sleep(0.1)
    assert not left, left
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["stopped"]
    assert (
        summary["complete"] is False and stop["arm"] == "a" and set(stop["running"]) == {"a", "b"}
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for arm in ("a", "b"):
        evals = [r["round"] for r in records if r.get("arm") == arm and "bits" in r]
        assert evals and evals == list(range(1, len(evals) + 1)), arm
        assert summary["arms"][arm]["complete"] is False
        assert (
            summary["arms"][arm]["rounds"] == stop["running"][arm]["last_evaluation"] == evals[-1]
        )


def test_arms_on_ray_run_one_at_a_time(caplog, monkeypatch):
    import logging

    from fedtier.experiment import arms_at_once

    monkeypatch.setattr(logging.getLogger("fedtier"), "propagate", True)  # the CLI's is off

    plain = tiny_config()
    on_ray = tiny_config(**{"train.executor": "ray"})
    assert arms_at_once(2, [plain, plain, plain]) == 2
    with caplog.at_level("INFO", logger="fedtier"):
        assert arms_at_once(2, [plain, on_ray]) == 1
    assert "train.executor 'ray'" in caplog.text
