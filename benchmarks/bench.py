"""fedtier side by side with a hand-written PyTorch loop and Flower, on the bench presets.

    PYTHONPATH=src python benchmarks/bench.py                      # both presets, 10 rounds
    PYTHONPATH=src python benchmarks/bench.py --rounds 20 --qat --population
    PYTHONPATH=src python benchmarks/bench.py --presets bench-small-mnist --no-flower
    PYTHONPATH=src python benchmarks/bench.py --presets bench-fedavg-mnist --rounds 20 \
        --precision bf16 fp32 --no-flower --no-loop     # mixed precision, where the CPU has it
    PYTHONPATH=src python benchmarks/bench.py --presets bench-fedavg-mnist \
        --executors processes ray --no-loop --no-flower --repeat 3 --overhead

Every column runs in its own fresh process, one after another, so peak memory (the
process's maximum resident set) and thread settings do not leak between columns. The
workload is the same in every column: the preset's data, partition, model, local epochs,
batch size and learning rate; fedtier and the hand-written loop also share the round plans
(which clients train in which round), Flower samples its own. Seconds per round are the
training rounds plus one final test evaluation, divided by the rounds; start-up (data
loading, Flower's Ray start) is reported apart. Flower's column needs ``flwr[simulation]``
(``pip install -e ".[bench]"``) and is skipped with a message when it is not installed.
``--repeat k`` runs the executor columns k times, alternating, and keeps each column's
fastest run (columns measured under the same, shared load). ``--overhead`` measures each
executor's scheduling cost per client job on trivial jobs (one SGD step of a tiny MLP).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedtier.config import Config, load_config
from fedtier.data import ArrayDataset, load_dataset
from fedtier.experiment import prepare_arm, split_clients
from fedtier.local.precision import BF16_CPU_FLAGS, bf16_units, cpu_flags
from fedtier.local.select import close_executor
from fedtier.models import build_model
from fedtier.rounds import run_rounds
from fedtier.topology import build_topology, plan_round

Result = dict[str, Any]


def bench_config(preset: str, rounds: int, extra: list[str] | None = None) -> Config:
    """The preset with ``rounds`` rounds, evaluated once at the end."""
    return load_config(preset, [f"train.rounds={rounds}", f"eval.every={rounds}", *(extra or [])])


def peak_mb() -> float:
    """Peak resident set of this process in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def client_samples(cfg: Config, sizes: np.ndarray, topology: Any) -> int:
    """Samples processed by the clients over all rounds (E passes over each sampled client)."""
    return client_samples_upto(cfg, sizes, topology, cfg.train.rounds)


# --------------------------------------------------------------------------- fedtier


def run_fedtier(cfg: Config, data: tuple[ArrayDataset, ArrayDataset] | None = None) -> Result:
    start = time.perf_counter()
    if data is None:
        data = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    setup = prepare_arm(cfg, data)
    startup = time.perf_counter() - start
    evals: list[dict] = []
    stamps = [time.perf_counter()]
    try:
        run_rounds(setup, evals.append, on_round=lambda t: stamps.append(time.perf_counter()))
    finally:
        close_executor(setup)
    return {
        "executor": setup.executor_name,
        **timing(stamps, startup, cfg, setup.topology.num_samples, setup.topology),
        "accuracy": evals[-1]["bits"]["32"].get("accuracy", float("nan")),
        "metrics": evals[-1]["bits"]["32"],  # every metric of the task (MSE for diffusion)
    }


def timing(
    stamps: list[float], startup: float, cfg: Config, sizes: np.ndarray, topology: Any
) -> Result:
    """Seconds per round over rounds 2..R (round 1, with its one-off warm-up such as worker
    start or Flower's actors, counts as start-up), and client-samples per second."""
    timed = max(len(stamps) - 2, 1)
    wall = stamps[-1] - stamps[-1 - timed]
    first = cfg.train.rounds - timed
    samples = client_samples(cfg, sizes, topology) - client_samples_upto(
        cfg, sizes, topology, first
    )
    return {
        "s_per_round": wall / timed,
        "samples_per_s": samples / wall,
        "startup_s": startup + (stamps[-1 - timed] - stamps[0]),
    }


def client_samples_upto(cfg: Config, sizes: np.ndarray, topology: Any, rounds: int) -> int:
    """Client samples of the first ``rounds`` rounds."""
    return sum(
        int(sum(sizes[c] for c in plan_round(topology, cfg.topology, cfg.seed, t).clients))
        * cfg.train.epochs
        for t in range(rounds)
    )


# --------------------------------------------------------------------------- hand-written


def paper_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """QAFed eq. (5)-(6) with a straight-through gradient, written out by hand."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (w.max() - w.min()).clamp_min(1e-12)
    q = torch.clamp(torch.round(w * scale), lo, hi) / scale
    return w + (q - w).detach()


def run_hand_loop(cfg: Config) -> Result:
    """The textbook loop: deepcopy the global model per client, torch.optim.SGD, average the
    state dicts weighted by sample count (with QAT: CE + Σ_b CE at Q_b(w), eq. 8)."""
    start = time.perf_counter()
    train, test = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    parts, _ = split_clients(cfg, train)
    sizes = np.array([len(p) for p in parts])
    topology = build_topology(cfg.topology, sizes, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, train.input_shape, train.num_classes)
    qat_bits = [b for b in (cfg.quant.bits or []) if b < 32] if cfg.quant.qat else []
    startup = time.perf_counter() - start
    stamps = [time.perf_counter()]
    for t in range(cfg.train.rounds):
        plan = plan_round(topology, cfg.topology, cfg.seed, t)
        states, weights = [], []
        for c in plan.clients:
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=cfg.train.lr)
            idx = torch.from_numpy(parts[c])
            x, y = train.x[idx], train.y[idx]
            for _ in range(cfg.train.epochs):
                order = torch.randperm(len(y))
                for s in range(0, len(y), cfg.train.batch_size):
                    b = order[s : s + cfg.train.batch_size]
                    loss = F.cross_entropy(local(x[b]), y[b])
                    for bits in qat_bits:
                        params = {n: paper_fake_quant(p, bits) for n, p in local.named_parameters()}
                        out = torch.func.functional_call(local, params, (x[b],))
                        loss = loss + F.cross_entropy(out, y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append(local.state_dict())
            weights.append(float(len(y)))
        total = sum(weights)
        model.load_state_dict(
            {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}
        )
        if t + 1 == cfg.train.rounds:
            with torch.no_grad():
                model.eval()
                accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
        stamps.append(time.perf_counter())
    return {**timing(stamps, startup, cfg, sizes, topology), "accuracy": accuracy}


# --------------------------------------------------------------------------- Flower


def run_flower(cfg: Config) -> Result:
    """Flower's simulation engine (Ray), one CPU per client app, FedAvg weighted by samples."""
    import logging

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    train, test = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    parts, _ = split_clients(cfg, train)
    sizes = np.array([len(p) for p in parts])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, train.input_shape, train.num_classes)
    keys = list(model.state_dict())
    tr = cfg.train

    def set_weights(net: torch.nn.Module, arrays: list[np.ndarray]) -> None:
        net.load_state_dict({k: torch.from_numpy(np.copy(a)) for k, a in zip(keys, arrays)})

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            torch.set_num_threads(1)
            net = build_model(cfg.model.name, train.input_shape, train.num_classes)
            set_weights(net, parameters)
            opt = torch.optim.SGD(net.parameters(), lr=tr.lr)
            idx = torch.from_numpy(np.copy(parts[self.cid]))
            x, y = train.x[idx], train.y[idx]
            for _ in range(tr.epochs):
                order = torch.randperm(len(y))
                for s in range(0, len(y), tr.batch_size):
                    b = order[s : s + tr.batch_size]
                    opt.zero_grad()
                    F.cross_entropy(net(x[b]), y[b]).backward()
                    opt.step()
            return [v.numpy() for v in net.state_dict().values()], len(y), {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(int(context.node_config["partition-id"])).to_client()

    stamps: list[float] = []
    final: dict[str, float] = {}

    def evaluate_fn(server_round, arrays, config):  # type: ignore[no-untyped-def]
        stamps.append(time.perf_counter())
        if server_round == cfg.train.rounds:
            set_weights(model, arrays)
            with torch.no_grad():
                final["accuracy"] = (model(test.x).argmax(1) == test.y).float().mean().item()
            stamps[-1] = time.perf_counter()
        return 0.0, {}

    n = cfg.topology.clients
    per_round = int(cfg.topology.clients_per_edge)
    strategy = FedAvg(
        fraction_fit=per_round / n,
        min_fit_clients=per_round,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        min_available_clients=n,
        evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
    )

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=tr.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    # Round 1 also starts Ray's client actors: it counts as start-up, rounds 2..R are timed.
    rounds = max(tr.rounds - 1, 1)
    wall = stamps[-1] - stamps[-1 - rounds]
    expected = float(sizes.mean()) * per_round * tr.epochs * rounds
    return {
        "s_per_round": wall / rounds,
        "samples_per_s": expected / wall,  # Flower samples its own clients: expected count
        "startup_s": stamps[-1 - rounds] - start,
        "accuracy": final.get("accuracy", float("nan")),
        "note": "peak memory of the driver process only (Ray workers not counted)",
    }


def flower_available() -> bool:
    try:
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- population


def tiled(data: ArrayDataset, n: int) -> ArrayDataset:
    """The first n samples of ``data`` repeated as needed (a larger federation's data)."""
    idx = torch.arange(n) % len(data)
    return ArrayDataset(data.x[idx].clone(), data.y[idx].clone(), data.num_classes, data.name)


def run_population(preset: str, clients: int, rounds: int, per_client: int) -> Result:
    """fedtier with ``clients`` registered clients of ``per_client`` samples each (iid)."""
    cfg = bench_config(preset, rounds, [f"topology.clients={clients}", "data.partition=iid"])
    train, test = load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed)
    data = tiled(train, clients * per_client)
    base = peak_mb()
    result = run_fedtier(cfg, (data, test))
    result["data_mb"] = data.x.numel() * data.x.element_size() / 2**20
    result["rss_before_mb"] = base
    return result


# --------------------------------------------------------------------------- scheduling overhead


def run_overhead(executor: str, jobs: int = 100, calls: int = 5) -> Result:
    """Milliseconds per client job of ``executor`` on trivial jobs: ``jobs`` clients of a
    100-client digits federation, each one SGD step of an MLP with 8 hidden units, per call;
    the first call (worker or Ray start, the data sent to the workers) is not timed."""
    cfg = load_config(
        "bench-small-mnist",
        [
            "data.dataset=digits",
            "data.partition=iid",
            "topology.clients=100",
            "model.name=mlp",
            "model.options={hidden: 8}",
            "train.epochs=1",
            "train.batch_size=1000",
            f"train.executor={executor}",
        ],
    )
    setup = prepare_arm(cfg, load_dataset("digits", seed=cfg.seed))
    assert setup.executor is not None
    w = setup.layout.flatten(setup.model)
    clients = list(range(jobs))
    try:
        setup.executor(setup, w, clients, 0)
        start = time.perf_counter()
        for step in range(1, calls + 1):
            setup.executor(setup, w, clients, step)
        wall = time.perf_counter() - start
    finally:
        close_executor(setup)
    return {"executor": setup.executor_name, "ms_per_job": 1000 * wall / (jobs * calls)}


# --------------------------------------------------------------------------- driver


def _child(fn: Callable[..., Result], args: tuple, queue: Any, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
        result["peak_mb"] = peak_mb()
        queue.put(result)
    except Exception as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


THREADS = 0  # torch threads in each column's process; 0 = torch's default


def in_fresh_process(fn: Callable[..., Result], *args: Any) -> Result:
    """Run fn(*args) in a new process; its result plus its peak memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue, THREADS))
    proc.start()
    result = queue.get()
    proc.join(timeout=60)
    if proc.is_alive():  # finished its work but does not exit: do not hang the benchmark
        proc.terminate()
    return result


def fmt_row(name: str, r: Result) -> str:
    if "error" in r:
        return f"| {name} | failed: {r['error']} | | | | |"
    return (
        f"| {name} | {r['s_per_round']:.3f} | {r['samples_per_s']:,.0f} | "
        f"{r['peak_mb']:,.0f} | {r['accuracy']:.4f} | {r['startup_s']:.1f} |"
    )


def compare(title: str, columns: dict[str, Result], reference: str) -> None:
    print(f"\n### {title}\n")
    print("| column | s/round | client-samples/s | peak MB | final accuracy | start-up s |")
    print("|---|---|---|---|---|---|")
    for name, r in columns.items():
        print(fmt_row(name, r))
    ref = columns.get(reference, {})
    for name, r in columns.items():
        if name != reference and "s_per_round" in r and "s_per_round" in ref:
            print(
                f"\n{reference} vs {name}: {r['s_per_round'] / ref['s_per_round']:.2f}x faster "
                f"per round, accuracy {100 * (ref['accuracy'] - r['accuracy']):+.2f} points "
                f"({name} reaches {ref['s_per_round'] / r['s_per_round']:.2f}x the rounds per "
                f"second of {reference})"
            )
    sys.stdout.flush()


def load_now() -> str:
    """The machine's load averages (1, 5, 15 min): how shared it was while measuring."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    flags = sorted(cpu_flags().intersection({"avx2", "avx512f", *BF16_CPU_FLAGS}))
    return (
        f"{cpu} (flags: {', '.join(flags) or 'none listed'}), {mp.cpu_count()} cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
        f"Python {platform.python_version()}"
    )


def precisions_here(wanted: list[str]) -> list[str]:
    """``wanted`` without bf16 when this CPU has no bf16 units (said once, with why)."""
    ok, why = bf16_units("cpu")
    if "bf16" in wanted and not ok:
        print(f"bf16 columns skipped: {why}")
        return [p for p in wanted if p != "bf16"]
    return wanted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="*", default=["bench-small-mnist", "bench-fedavg-mnist"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--executors",
        nargs="+",
        default=["auto"],
        help="fedtier columns: train.executor values (auto, sequential, vectorised, dense, "
        "processes, ray)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="fedtier columns: train.precision values (the first is the reference)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of the executor columns (alternating; fastest kept)",
    )
    p.add_argument("--overhead", action="store_true", help="also ms per client job on trivial jobs")
    p.add_argument("--no-flower", action="store_true", help="skip the Flower column")
    p.add_argument("--no-loop", action="store_true", help="skip the hand-written loop column")
    p.add_argument("--qat", action="store_true", help="also QAT with B = {8, 4} on the CNN")
    p.add_argument("--population", action="store_true", help="also 100 vs 10,000 clients")
    p.add_argument("--threads", type=int, default=0, help="torch threads per column (0: default)")
    args = p.parse_args(argv)
    global THREADS
    THREADS = args.threads
    print(f"machine: {describe_machine()}")
    flower = not args.no_flower and flower_available()
    if not args.no_flower and not flower:
        print('Flower column skipped: flwr[simulation] is not installed (pip install ".[bench]")')
    precisions = precisions_here(args.precision)
    for preset in args.presets:
        cfg = bench_config(preset, args.rounds)
        columns: dict[str, Result] = {}
        print(f"{preset}: before the executor columns, {load_now()}")
        for _ in range(args.repeat):
            for ex in args.executors:
                for prec in precisions:
                    r = in_fresh_process(
                        run_fedtier,
                        bench_config(
                            preset, args.rounds, [f"train.executor={ex}", f"train.precision={prec}"]
                        ),
                    )
                    label = f", {prec}" if len(args.precision) > 1 else ""
                    name = f"fedtier ({ex}: {r.get('executor', '?')}{label})"
                    best = columns.get(name)
                    if best is None or r.get("s_per_round", 1e9) < best.get("s_per_round", 1e9):
                        columns[name] = r
        print(f"{preset}: after the executor columns, {load_now()}")
        if not args.no_loop:
            columns["hand-written loop"] = in_fresh_process(run_hand_loop, cfg)
        if flower:
            columns["Flower (Ray simulation)"] = in_fresh_process(run_flower, cfg)
        compare(f"{preset}, {args.rounds} rounds", columns, next(iter(columns)))
    if args.overhead:
        print(f"\n### scheduling overhead per client job (trivial jobs), {load_now()}\n")
        print("| executor | ms per client job |")
        print("|---|---|")
        for ex in ("sequential", *[e for e in args.executors if e not in ("sequential", "auto")]):
            r = in_fresh_process(run_overhead, ex)
            if "error" in r:
                print(f"| {ex} | failed: {r['error']} |")
            else:
                print(f"| {ex} ({r['executor']}) | {r['ms_per_job']:.2f} |")
        print(f"\n(after: {load_now()})")
    if args.qat:
        extra = ["quant.qat=true", "quant.bits=[8,4]"]
        cfg = bench_config("bench-fedavg-mnist", args.rounds, extra)
        columns = {}
        for ex in args.executors:
            for prec in precisions:
                more = [*extra, f"train.executor={ex}", f"train.precision={prec}"]
                r = in_fresh_process(
                    run_fedtier, bench_config("bench-fedavg-mnist", args.rounds, more)
                )
                label = f", {prec}" if len(args.precision) > 1 else ""
                columns[f"fedtier QAT ({ex}: {r.get('executor', '?')}{label})"] = r
        columns["hand-written QAT loop"] = in_fresh_process(run_hand_loop, cfg)
        compare(
            f"QAT B={{8, 4}}, bench-fedavg-mnist, {args.rounds} rounds",
            columns,
            next(iter(columns)),
        )
    if args.population:
        print("\n### population scaling (bench-small-mnist, iid, 8 samples per client)\n")
        print("| registered clients | start-up s | s/round | peak MB | data set MB |")
        print("|---|---|---|---|---|")
        rows = {}
        for n in (100, 10_000):
            r = rows[n] = in_fresh_process(run_population, "bench-small-mnist", n, 5, 8)
            if "error" in r:
                print(f"| {n:,} | failed: {r['error']} | | | |")
                continue
            print(
                f"| {n:,} | {r['startup_s']:.2f} | {r['s_per_round']:.3f} | "
                f"{r['peak_mb']:,.0f} | {r['data_mb']:,.0f} |"
            )
        a, b = rows[100], rows[10_000]
        if "error" not in a and "error" not in b:
            extra_mb = (b["peak_mb"] - a["peak_mb"]) - (b["data_mb"] - a["data_mb"])
            extra_s = (b["startup_s"] - a["startup_s"]) + 5 * (b["s_per_round"] - a["s_per_round"])
            print(
                f"\n10,000 vs 100 clients: {extra_s:+.2f} s per run (start-up + 5 rounds), "
                f"{extra_mb:+.0f} MB peak beyond the larger data set itself"
            )


if __name__ == "__main__":
    main()
