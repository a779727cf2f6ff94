"""fedtier's federated diffusion fine-tuning round against a hand-written loop of the same
model and data (the ssdiff-mnist preset's U-Net, clients, local epochs, batch size and local
optimiser).

    PYTHONPATH=src python benchmarks/bench_diffusion.py --rounds 4 --repeats 2

Both columns start from the same randomly initialised U-Net (the preset's pretraining is
switched off: it is not what is timed), train the same clients each round (fedtier's round
plans) on the DDPM objective (diffusers' ``DDPMScheduler.add_noise`` in the loop, fedtier's
task in fedtier), and average weighted by samples; fedtier's column also quantizes nothing
(fp32 uploads) but runs its upload path and cost model as in the preset. Each column runs in
its own fresh process with ``--threads`` torch threads (1 by default), alternating, and
alternating which of the two goes first, ``--repeats`` times; seconds per round are rounds
2..R (round 1 counts as start-up). The final column is the denoising MSE on the test set
(the task's fixed evaluation draws) so that the two columns are seen to train alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402
from bench import describe_machine, in_fresh_process, timing  # noqa: E402

from fedtier.config import Config, load_config  # noqa: E402
from fedtier.data import load_dataset, select_classes  # noqa: E402
from fedtier.experiment import make_task, prepare_arm, split_clients  # noqa: E402
from fedtier.local.select import close_executor  # noqa: E402
from fedtier.models import build_model  # noqa: E402
from fedtier.rounds import run_rounds  # noqa: E402
from fedtier.topology import build_topology, plan_round  # noqa: E402

Result = dict


def bench_config(rounds: int, executor: str = "auto") -> Config:
    return load_config(
        "ssdiff-mnist",
        [
            f"train.rounds={rounds}",
            f"eval.every={rounds}",
            "pretrain=null",
            "arms={}",
            "upload=[{name: fp32}]",
            "train.task.samples=0",
            f"train.executor={executor}",
        ],
    )


def cpu_per_round(cpu: list[float]) -> float:
    """CPU seconds of this process per round over rounds 2..R (as :func:`bench.timing`'s
    wall seconds): on a shared machine the wall clock depends on the other load, the CPU
    time of a single-threaded column much less."""
    timed = max(len(cpu) - 2, 1)
    return (cpu[-1] - cpu[-1 - timed]) / timed


def run_fedtier_diffusion(cfg: Config) -> Result:
    """:func:`bench.run_fedtier` with this process's CPU time stamped at every round too."""
    cpu = [time.process_time()]
    start = time.perf_counter()
    data = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    setup = prepare_arm(cfg, data)
    startup = time.perf_counter() - start
    evals: list[dict] = []
    stamps, cpu = [time.perf_counter()], [time.process_time()]

    def on_round(_: int) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    try:
        run_rounds(setup, evals.append, on_round=on_round)
    finally:
        close_executor(setup)
    return {
        "executor": setup.executor_name,
        **timing(stamps, startup, cfg, setup.topology.num_samples, setup.topology),
        "cpu_per_round": cpu_per_round(cpu),
        "mse": evals[-1]["bits"]["32"]["mse"],
    }


def run_hand_loop(cfg: Config) -> Result:
    """deepcopy the global U-Net per client, the preset's local optimiser (torch.optim.SGD
    with momentum or torch.optim.Adam), DDPM loss with diffusers' scheduler, average the state
    dicts weighted by sample count."""
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    train, test = (
        select_classes(d, cfg.data.classes)
        for d in load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    )
    parts, _ = split_clients(cfg, train)
    sizes = np.array([len(p) for p in parts])
    topology = build_topology(cfg.topology, sizes, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, train.input_shape, train.num_classes, **cfg.model.options)
    task_cfg = cfg.train.task
    sched = DDPMScheduler(
        num_train_timesteps=task_cfg.timesteps,
        beta_start=task_cfg.beta_start,
        beta_end=task_cfg.beta_end,
    )
    tr = cfg.train
    startup = time.perf_counter() - start
    stamps, cpu = [time.perf_counter()], [time.process_time()]
    for t in range(tr.rounds):
        plan = plan_round(topology, cfg.topology, cfg.seed, t)
        states, weights = [], []
        for c in plan.clients:
            local = copy.deepcopy(model)
            opt = (
                torch.optim.Adam(local.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
                if tr.optimizer == "adam"
                else torch.optim.SGD(
                    local.parameters(), lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay
                )
            )
            x = train.x[torch.from_numpy(parts[c])]
            for _ in range(tr.epochs):
                order = torch.randperm(len(x))
                for s in range(0, len(x), tr.batch_size):
                    x0 = x[order[s : s + tr.batch_size]]
                    steps = torch.randint(0, task_cfg.timesteps, (len(x0),))
                    eps = torch.randn_like(x0)
                    loss = F.mse_loss(local(sched.add_noise(x0, eps, steps), steps), eps)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append(local.state_dict())
            weights.append(float(len(x)))
        total = sum(weights)
        model.load_state_dict(
            {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}
        )
        if t + 1 == tr.rounds:
            mse = make_task(cfg, 10, [32]).evaluate(model.eval(), test, 1000)["mse"]
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    return {
        **timing(stamps, startup, cfg, sizes, topology),
        "cpu_per_round": cpu_per_round(cpu),
        "mse": mse,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--executor", default="auto", help="fedtier's train.executor")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each column's process (0: torch's default, which follows "
        "OMP_NUM_THREADS or the cores)",
    )
    args = p.parse_args(argv)
    bench.THREADS = args.threads  # both columns alike, whatever the environment says
    print(f"machine: {describe_machine()}")
    cfg = bench_config(args.rounds, args.executor)
    rows: dict[str, list[Result]] = {"fedtier": [], "hand-written loop": []}
    columns = {"fedtier": run_fedtier_diffusion, "hand-written loop": run_hand_loop}
    for i in range(args.repeats):
        # alternate the order too (fedtier first, then the loop first, ...): on a shared
        # machine whose load drifts, the column that always runs second would always see
        # the later load, and even CPU seconds grow with the other jobs' pressure on caches
        for name in list(columns)[:: 1 if i % 2 == 0 else -1]:
            load = os.getloadavg()[0]
            rows[name].append({**in_fresh_process(columns[name], cfg), "load": load})
    print(f"\n### diffusion fine-tuning (ssdiff-mnist's U-Net), {args.rounds} rounds\n")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    print(
        "| column | run | s/round | CPU s/round | client-samples/s | peak MB | test MSE | "
        "start-up s | load at start |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        for i, r in enumerate(results):
            if "error" in r:
                print(f"| {name} | {i + 1} | failed: {r['error']} | | | | | | |")
                continue
            label = f"{name} ({r['executor']})" if "executor" in r else name
            print(
                f"| {label} | {i + 1} | {r['s_per_round']:.2f} | {r['cpu_per_round']:.2f} | "
                f"{r['samples_per_s']:,.0f} | "
                f"{r['peak_mb']:,.0f} | {r['mse']:.4f} | {r['startup_s']:.1f} | {r['load']:.1f} |"
            )
    ours = [r["s_per_round"] for r in rows["fedtier"] if "s_per_round" in r]
    loop = [r["s_per_round"] for r in rows["hand-written loop"] if "s_per_round" in r]
    if ours and loop:
        print(
            f"\nratio (hand-written s/round ÷ fedtier s/round, medians): "
            f"{np.median(loop) / np.median(ours):.2f}"
        )
        ours_cpu = [r["cpu_per_round"] for r in rows["fedtier"] if "cpu_per_round" in r]
        loop_cpu = [r["cpu_per_round"] for r in rows["hand-written loop"] if "cpu_per_round" in r]
        print(
            f"ratio of CPU seconds per round (hand-written ÷ fedtier, medians; fedtier's "
            f"own process only, so meaningful for the sequential executor): "
            f"{np.median(loop_cpu) / np.median(ours_cpu):.2f}"
        )


if __name__ == "__main__":
    main()
