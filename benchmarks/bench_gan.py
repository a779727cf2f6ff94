"""The three-tier GAN's local phase: fedtier against a hand-written PyTorch loop, side by side.

    PYTHONPATH=src python benchmarks/bench_gan.py                  # 3 regions × 3 devices, B 64
    PYTHONPATH=src python benchmarks/bench_gan.py --iterations 10 --repeats 3 --threads 1
    PYTHONPATH=src python benchmarks/bench_gan.py --iterations 2 --repeats 3 --bf16

Workload (seed 001's local phase, issue 11's prototype sizes): MNIST-5k in [-1, 1], split into
three regions by class groups (0–3, 4–6, 7–9) and three devices per region; DCGAN-sized
generator (z = 64) and discriminator (no BatchNorm); batch 64; Adam 2e-4, β = (0.5, 0.999).
One iteration: every region's G_k draws z_d, z_g; every device takes one Adam step of its D on
a real batch vs G_k(z_d), then returns the gradient of −E log D(G_k(z_g)) w.r.t. the samples;
G_k takes one Adam step from the mean feedback.

Columns, each timed over the same number of iterations, alternating (A B C A B C …) within one
process so that every column sees the same machine load:

* ``fedtier (vectorised)`` — :func:`fedtier.gan.three_tier.local_iteration`: all nine
  discriminators in one ``torch.func.vmap`` call, with the upload chain (fp32) and the cost
  model's accounting included;
* ``fedtier (sequential)`` — the same with ``gan.executor: sequential``;
* ``hand-written loop`` — nine ``nn.Module`` discriminators, one ``torch.optim.Adam`` each,
  ``loss.backward()`` and ``torch.autograd.grad`` for the feedback, one device after another;
* with ``--bf16``: ``fedtier (sequential, bf16)`` (``train.precision: bf16``) and the same loop
  under ``torch.autocast(bfloat16)``, so that what bf16 buys is not credited to batching.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedtier.config import Config, from_dict
from fedtier.data import load_dataset
from fedtier.gan.three_tier import init_state, local_iteration, prepare_three_tier

GROUPS = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))


def regions(devices: int) -> list[list[torch.Tensor]]:
    """MNIST-5k's training images in [-1, 1], by class group, split evenly over devices."""
    train, _ = load_dataset("mnist5k", None, seed=0)
    x = (train.x * 0.3081 + 0.1307).clamp(0, 1) * 2 - 1
    out = []
    for group in GROUPS:
        idx = torch.nonzero(torch.isin(train.y, torch.tensor(group))).flatten()
        out.append([x[part] for part in idx.chunk(devices)])
    return out


def config(devices: int, batch: int, executor: str, precision: str = "fp32") -> Config:
    return from_dict(
        {
            "topology": {"edges": 3, "clients": 3 * devices},
            "train": {"precision": precision},
            "gan": {"batch_size": batch, "executor": executor},
        }
    )


def fedtier_column(data: list[list[torch.Tensor]], cfg: Config) -> Callable[[], None]:
    setup = prepare_three_tier(cfg, data)
    state = init_state(setup)
    everyone = list(range(setup.regions))
    return lambda: local_iteration(setup, state, everyone)


def hand_loop_column(
    data: list[list[torch.Tensor]], cfg: Config, bf16: bool = False
) -> Callable[[], None]:
    """The prototype's loop, written plainly: modules and optimisers per device; ``bf16``
    runs the discriminators' forward passes under bf16 autocast (as fedtier's bf16 does)."""
    setup = prepare_three_tier(cfg, data)  # same initial models
    g, b = cfg.gan, cfg.gan.batch_size
    betas = (g.beta1, g.beta2)
    gens = [copy.deepcopy(m) for m in setup.generators]
    g_opts = [torch.optim.Adam(m.parameters(), lr=g.lr_g, betas=betas) for m in gens]
    base = setup.discriminators.model
    discs = []
    for n in range(setup.discriminators.count):
        d = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in d.named_parameters():
                p.copy_(setup.discriminators.params[name][n])
        discs.append(d)
    d_opts = [torch.optim.Adam(d.parameters(), lr=g.lr_d, betas=betas) for d in discs]
    devices = [(k, n) for k in range(3) for n in setup.devices(k)]
    step = [0]

    def iteration() -> None:
        s = step[0]
        for k in range(3):
            z = torch.randn(2, b, g.z_dim)
            with torch.no_grad():
                fake_d = gens[k](z[0])
            fake_g = gens[k](z[1])
            probe = fake_g.detach()
            feedback = torch.zeros_like(probe)
            members = [n for kk, n in devices if kk == k]
            for n in members:
                x = setup.data[n]
                real = x[torch.randint(len(x), (b,))]
                d, opt = discs[n], d_opts[n]
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    lr, lf = d(real).float(), d(fake_d).float()
                loss = F.softplus(-lr).mean() + F.softplus(lf).mean()
                loss.backward()
                opt.step()
                probe_n = probe.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    lp = d(probe_n).float()
                (grad,) = torch.autograd.grad(F.softplus(-lp).mean(), probe_n)
                feedback += grad / len(members)
            g_opts[k].zero_grad()
            fake_g.backward(feedback)
            g_opts[k].step()
        step[0] = s + 1

    return iteration


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=3, help="devices per region (3 regions)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iterations", type=int, default=5, help="local iterations per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per column (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="add bf16-autocast columns (fedtier's train.precision: bf16, and the loop's)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = regions(args.devices)
    columns = {
        "fedtier (vectorised)": fedtier_column(
            data, config(args.devices, args.batch, "vectorised")
        ),
        "fedtier (sequential)": fedtier_column(
            data, config(args.devices, args.batch, "sequential")
        ),
        "hand-written loop": hand_loop_column(data, config(args.devices, args.batch, "sequential")),
    }
    if args.bf16:
        columns["fedtier (sequential, bf16)"] = fedtier_column(
            data, config(args.devices, args.batch, "sequential", "bf16")
        )
        columns["hand-written loop (bf16)"] = hand_loop_column(
            data, config(args.devices, args.batch, "sequential"), bf16=True
        )
    for fn in columns.values():  # warm-up (allocator, oneDNN primitives)
        fn()
    times: dict[str, list[float]] = {name: [] for name in columns}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, fn in columns.items():
            t = time.perf_counter()
            for _ in range(args.iterations):
                fn()
            times[name].append((time.perf_counter() - t) / args.iterations)
        loads.append(os.getloadavg()[0])
    print(
        f"three-tier GAN local phase: 3 regions × {args.devices} devices, batch {args.batch}, "
        f"{args.iterations} iterations × {args.repeats} alternating repeats, "
        f"{args.threads} torch thread(s); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {min(loads):.1f}–{max(loads):.1f}"
    )
    loop = float(np.median(times["hand-written loop"]))
    print(f"{'column':28s} {'s/iteration (median)':>22s} {'min':>8s} {'loop / column':>14s}")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:28s} {med:22.3f} {min(ts):8.3f} {loop / med:14.2f}×")


if __name__ == "__main__":
    main()
