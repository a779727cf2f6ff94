"""From a Config to a finished run directory: data, topology, per-arm setup, the rounds."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedtier.aggregate.robust import check_rule_config
from fedtier.attacks import malicious_clients, measures_asr, observation_key
from fedtier.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_model
from fedtier.config import Attacker, Config, DiffusionTaskConfig, to_dict
from fedtier.costs import CostModel
from fedtier.costs.flops import training_flops
from fedtier.data import ArrayDataset, ClientData, load_dataset, partition, select_classes
from fedtier.deploy import generation_report, wants_generation
from fedtier.errors import FedtierError
from fedtier.faults import add_faults
from fedtier.gan_experiment import (
    check_gan_arm,
    gan_arm_config,
    is_gan,
    prepare_gan_arm,
    run_gan_arm,
)
from fedtier.local.arm import ArmSetup
from fedtier.local.parallel import available_workers
from fedtier.local.select import close_executor, select_executor
from fedtier.models import build_model
from fedtier.pretrain import Pretrained, ensure_pretrained, pretrained_path
from fedtier.quant import QuantSpec
from fedtier.quant.bnstats import add_bit_stats
from fedtier.quant.election import elect_bits
from fedtier.results import (
    RunWriter,
    check_new_run_dir,
    plot_reconstructions,
    read_run,
    summary_from,
)
from fedtier.rounds import RunState, evaluated_state, headline
from fedtier.schedules import run_schedule
from fedtier.secure.edge import add_secure
from fedtier.security import (
    add_rejections,
    install,
    privacy_attacks,
    privacy_record,
    sampling_security,
)
from fedtier.seeding import numpy_rng
from fedtier.side_by_side import ArmProcesses, resolve_jobs
from fedtier.state import StateLayout, all_of, keep_batchnorm_local, upload_everything
from fedtier.tasks import (
    AutoencoderTask,
    ClassificationTask,
    ClientTask,
    DiffusionTask,
    batch_to,
    client_batch,
    qat,
)
from fedtier.tasks.base import device_of
from fedtier.topology import Topology, build_topology
from fedtier.upload import build_chain


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FedtierError(
            "train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def split_clients(cfg: Config, train: ArrayDataset) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Client index arrays (and, for region-level schemes, the edge of each client)."""
    rng = numpy_rng(cfg.seed, "partition")
    d, t = cfg.data, cfg.topology
    per_edge = [len(a) for a in np.array_split(np.arange(t.clients), t.edges)]
    parts = partition(
        train.y.numpy(),
        t.clients,
        d.partition,
        rng,
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
        clients_per_region=per_edge,
        min_size=d.min_size,
        sources=None if train.source is None else train.source.numpy(),
    )
    regional = d.partition in ("feature", "label", "source")
    edge_of_client = np.repeat(np.arange(t.edges), per_edge) if regional else None
    return parts, edge_of_client


def make_task(cfg: Config, num_classes: int, target_bits: list[int]) -> ClientTask:
    """The arm's task (``train.task``), wrapped with QAFed's multi-bit QAT loss (eq. 8) over
    the quantized target bits when ``quant.qat`` is on."""
    task: ClientTask
    if cfg.train.task.name == "autoencoder":
        task = AutoencoderTask()
    elif cfg.train.task.name == "diffusion-test":
        task = DiffusionTask(eval_seed=cfg.seed)
    elif isinstance(cfg.train.task, DiffusionTaskConfig):
        d = cfg.train.task
        task = DiffusionTask(
            steps=d.timesteps,
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            eval_seed=cfg.seed,
            sample_steps=d.sample_steps,
        )
    else:
        task = ClassificationTask(num_classes)
    qat_bits = tuple(b for b in target_bits if b < 32) if cfg.quant.qat else ()
    if qat_bits:
        task = qat(task, qat_bits, QuantSpec(cfg.quant.quantizer, cfg.quant.params))
    return task


def check_task_fits(cfg: Config, task: ClientTask, model: nn.Module, train: ArrayDataset) -> None:
    """One loss evaluation on two training samples (eval mode, no gradient, a throwaway
    generator: nothing of the run changes), so that a model that does not fit the task (a
    classifier under ``diffusion-test``, say) is a one-line error at setup, not a traceback
    in the first round."""
    sample = client_batch(task, train.x[:2], train.y[:2])
    mode = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. MSE between unequal shapes
            task.loss(model, batch_to(sample, device_of(model)), torch.Generator())
    except Exception as e:  # the user's model and task: any failure is a configuration error
        raise FedtierError(
            f"train.task '{cfg.train.task.name}' cannot train model '{cfg.model.name}': "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(mode)


def prepare_arm(cfg: Config, data: tuple[ArrayDataset, ArrayDataset]) -> ArmSetup:
    train, test = (select_classes(d, cfg.data.classes) for d in data)
    parts, edge_of_client = split_clients(cfg, train)
    sizes = np.array([len(p) for p in parts])
    topology: Topology = build_topology(cfg.topology, sizes, cfg.seed, edge_of_client)
    device = resolve_device(cfg.train.device)
    if is_gan(cfg):
        return prepare_gan_arm(cfg, train, test, topology, parts, edge_of_client, device)
    election: dict[str, Any] | None = None
    if cfg.quant.bits is not None:
        target_bits = sorted(cfg.quant.bits, reverse=True)
    else:
        target_bits, election = elect_bits(topology, cfg.quant.elect_top)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, train.input_shape, train.num_classes, **cfg.model.options)
    if cfg.model.init_from is not None:
        load_weights(model, Path(cfg.model.init_from), "model.init_from")
    elif cfg.pretrain is not None:
        path = pretrained_path(cfg)
        if not path.is_file():
            raise FedtierError(
                f"the pretrained model of this config is not in the cache ({path}); "
                f"build it with: fedtier pretrain CONFIG"
            )
        load_weights(model, path, "pretrain")
    model = model.to(device)
    task = make_task(cfg, train.num_classes, target_bits)
    task.groups.check(model)
    check_task_fits(cfg, task, model, train)
    qat_bits = [b for b in target_bits if b < 32] if cfg.quant.qat else []
    if qat_bits and cfg.quant.bn_stats == "per-bit":  # per-precision statistics, on the model
        add_bit_stats(model, qat_bits)
    fedbn = keep_batchnorm_local if cfg.model.batchnorm == "local" else upload_everything
    upload = all_of(task.groups.uploads, fedbn)
    region_x = _region_views(cfg, train, edge_of_client)
    if region_x is not None and edge_of_client is not None:  # each region its own view
        client_data = ClientData(tuple(region_x), train.y, tuple(parts), edge_of_client)
    else:
        client_data = ClientData((train.x,), train.y, tuple(parts))
    layout = StateLayout.of(model, upload)
    setup = ArmSetup(
        cfg=cfg,
        model=model,
        task=task,
        layout=layout,
        client_data=client_data,
        test=_test_view(cfg, test, topology.num_edges),
        topology=topology,
        spec=QuantSpec(cfg.quant.quantizer, cfg.quant.params),
        target_bits=target_bits,
        election=election,
        upload=build_chain(cfg.upload),
        costs=CostModel(
            cfg.costs,
            topology,
            cfg.train.epochs,
            layout.size,
            sample_cycles=sample_cycles(cfg, task, model, train),
        ),
    )
    setup.executor_name = select_executor(setup)
    setup.attack = install(setup, train)  # wraps the executor for the attackers' own training
    return setup


def sample_cycles(
    cfg: Config, task: ClientTask, model: nn.Module, train: ArrayDataset
) -> float | None:
    """C of the energy model under ``costs.compute: flops``: the counted FLOPs of one
    training sample (forward + backward of the task's loss) over ``costs.flops_per_cycle``;
    None under ``device-class`` (each device class's constant)."""
    if cfg.costs.compute != "flops":
        return None
    sample = batch_to(client_batch(task, train.x[:1], train.y[:1]), device_of(model))
    return training_flops(model, task, sample) / cfg.costs.flops_per_cycle


def _region_views(
    cfg: Config, train: ArrayDataset, edge_of_client: np.ndarray | None
) -> list[torch.Tensor] | None:
    """Label-related scenario: region r sees its own input domain (seed 001)."""
    if cfg.data.partition != "label":
        return None
    from fedtier.data.partition import apply_domain

    return [apply_domain(train.x, r) for r in range(cfg.topology.edges)]


def _test_view(cfg: Config, test: ArrayDataset, regions: int) -> ArrayDataset:
    """In the label-related scenario the test set holds every region's domain."""
    if cfg.data.partition != "label":
        return test
    from fedtier.data.partition import apply_domain

    xs = torch.cat([apply_domain(test.x, r) for r in range(regions)])
    return ArrayDataset(xs, test.y.repeat(regions), test.num_classes, test.name)


def task_record(task: ClientTask) -> dict[str, Any]:
    """What the report needs to know of the arm's task: its headline metric, the metrics it
    tabulates per bit width, and the spec of each metric it reports."""
    return {
        "headline": task.headline,
        "tables": list(task.tables),
        "metrics": {name: spec.to_dict() for name, spec in task.metrics.items()},
    }


def load_arm_data(
    arms: dict[str, Config],
) -> dict[tuple[str, str | None], tuple[ArrayDataset, ArrayDataset]]:
    """(train, test) of every data set the arms use, each loaded once."""
    cache: dict[tuple[str, str | None], tuple[ArrayDataset, ArrayDataset]] = {}
    for acfg in arms.values():
        key = (acfg.data.dataset, acfg.data.root)
        if key not in cache:
            cache[key] = load_dataset(acfg.data.dataset, acfg.data.root, seed=acfg.seed)
    return cache


def pretrain_arms(
    arms: dict[str, Config],
    data: dict[tuple[str, str | None], tuple[ArrayDataset, ArrayDataset]],
    progress: bool = True,
) -> dict[str, Pretrained]:
    """Build (or find in the cache) the pretrained model of every arm with a ``pretrain``
    section and no ``model.init_from``; each distinct model is trained once, and its
    training time is logged once."""
    out: dict[str, Pretrained] = {}
    done: dict[str, Pretrained] = {}
    for arm, acfg in arms.items():
        if acfg.pretrain is None or acfg.model.init_from is not None:
            continue
        train = data[(acfg.data.dataset, acfg.data.root)][0]
        task = make_task(acfg, train.num_classes, [32])
        key = str(pretrained_path(acfg))
        if key not in done:
            done[key] = ensure_pretrained(acfg, train, task, progress)
            p = done[key]
            how = "found in the cache" if p.cached else "trained now"
            logging.getLogger("fedtier").info(
                "pretrained model %s (%s; training took %.0f s): %s",
                p.key,
                how,
                p.seconds,
                p.path,
            )
        out[arm] = done[key]
    return out


def preflight(
    arms: dict[str, Config], data: dict[tuple[str, str | None], tuple[ArrayDataset, ArrayDataset]]
) -> None:
    """Prepare every arm once and discard it, so that what can only fail while building a
    run (an unknown model, a bad model option, a missing device) fails before the run
    directory is touched. Each arm is prepared again when it runs: ``prepare_arm`` seeds
    itself, so the numbers are those of a run without this check."""
    log = logging.getLogger("fedtier")
    level = log.level
    log.setLevel(logging.WARNING)  # the executor choice is logged when the arm runs
    try:
        for acfg in arms.values():
            close_executor(prepare_arm(acfg, data[(acfg.data.dataset, acfg.data.root)]))
    finally:
        log.setLevel(level)


def _without_attack(cfg: Config) -> str:
    d = to_dict(cfg)
    d.pop("attack", None)
    return json.dumps(d, sort_keys=True, default=str)


def shared_prefixes(arms: dict[str, Config]) -> dict[str, tuple[str, int]]:
    """Arms that may start from another arm's state instead of training the same rounds again:
    {arm: (donor arm, rounds)}.

    Before ``attack.start_round`` an attack's clients train honestly, so arms whose configs
    differ only in the attack (same start round, same malicious clients, synchronous rounds)
    run the same rounds, with the same plans, uploads, screens, rules and evaluations, up to
    then, provided their evaluations measure the same (the attack success rate for backdoor
    attacks). Their attacks' states differ only by what they observed
    (:func:`fedtier.attacks.observation_key`): an arm takes the donor's state when it
    observes what the donor observed, and the donor's state with its own fresh attack state
    when it observes nothing. The rounds shared are those up to the last evaluation at or
    before the start round (a checkpointable state, as for ``--resume``); the donor is the
    group's first arm that observes (else its first arm), and only arms after it share."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for arm, acfg in arms.items():
        a = acfg.attack
        if not isinstance(a, Attacker) or is_gan(acfg) or acfg.schedule.name != "sync":
            continue
        shared = a.start_round // acfg.eval.every * acfg.eval.every
        if shared < 1 or shared >= acfg.train.rounds:
            continue
        key = (
            _without_attack(acfg),
            a.start_round,
            tuple(sorted(malicious_clients(acfg))),
            measures_asr(acfg),  # the evaluation itself differs otherwise
        )
        groups.setdefault(key, []).append(arm)
    out: dict[str, tuple[str, int]] = {}
    for members in groups.values():
        observing = [m for m in members if observation_key(arms[m]) is not None]
        donor = observing[0] if observing else members[0]
        seen = observation_key(arms[donor])
        a = arms[donor].attack
        assert isinstance(a, Attacker)
        rounds = a.start_round // arms[donor].eval.every * arms[donor].eval.every
        for m in members[members.index(donor) + 1 :]:
            if observation_key(arms[m]) in (None, seen):
                out[m] = (donor, rounds)
    return out


def sibling_progress(
    prefix: dict[str, Any], donor: Config, arm: str, acfg: Config
) -> dict[str, Any]:
    """The donor's checkpointed state after the shared rounds, as ``arm``'s progress (see
    :func:`shared_prefixes`): its attack state is the donor's when both observe the same,
    else (``arm`` observes nothing) left to the arm's own fresh attack."""
    progress = copy.deepcopy(prefix["progress"])
    if observation_key(acfg) != observation_key(donor):
        progress["state"]["attack"] = {}
    progress["run"]["last"] = {**progress["run"]["last"], "arm": arm}
    return progress


def run_experiment(
    cfg: Config,
    out: Path,
    progress: bool = True,
    *,
    overwrite: bool = False,
    resume: bool = False,
    jobs: int | str = 1,
) -> dict[str, Any]:
    """Run every arm of ``cfg`` into the new run directory ``out``; returns the summary (also
    in summary.json).

    ``out`` must not hold a run yet unless ``overwrite`` (then it is replaced once every arm
    has been prepared). Nothing is written before the data are loaded and every arm is
    prepared, so a mistake found there leaves no directory behind. A run that stops early
    (Ctrl-C, an error) still writes summary.json and report.md, marked ``"complete": false``
    with the arm and round it stopped at; the arm's last evaluation is in the tables.

    With ``resume`` the run continues from ``out``'s checkpoint (arms already finished are
    kept, the arm in progress continues from its last checkpointed evaluation) and gives the
    summary and final models an uninterrupted run gives.

    ``jobs`` arms run at once, each in a process of its own (:func:`run_side_by_side`; the
    same numbers as one at a time); ``"auto"``: one per core, or ``$FEDTIER_JOBS``.
    """
    arms = {name: gan_arm_config(acfg) for name, acfg in cfg.arm_configs().items()}
    for acfg in arms.values():
        check_gan_arm(acfg)
        check_rule_config(acfg)  # robust rules' preconditions on the row counts, before training
    resolve_jobs(jobs, len(arms))  # a bad value fails before anything is written
    checkpoint = load_checkpoint(out) if resume else None
    if checkpoint is not None and checkpoint["config"] != to_dict(cfg):
        raise FedtierError(
            f"the checkpoint in '{out}' belongs to another configuration; resume it with the "
            f"run's own config (fedtier run --resume {out}) or start a new run directory"
        )
    if not resume:
        check_new_run_dir(out, overwrite)
    data = load_arm_data(arms)
    pretrained = pretrain_arms(arms, data, progress)
    if not resume:
        preflight(arms, data)
    if resume:
        writer = RunWriter.reopen(out, checkpoint["metrics_lines"] if checkpoint else 0)
    else:
        writer = RunWriter(out, to_dict(cfg), overwrite=overwrite)
    summary: dict[str, Any] = {"name": cfg.name, "seed": cfg.seed, "arms": {}}
    if pretrained:  # the provider's model: its training time, reported once
        summary["pretrained"] = {
            p.key: {"path": str(p.path), "train_s": round(p.seconds, 1), "cached": p.cached}
            for p in pretrained.values()
        }
    if checkpoint is not None:
        summary["arms"].update(checkpoint["arms_done"])
        if checkpoint.get("target_bits") is not None:
            summary["target_bits"] = checkpoint["target_bits"]
    resumed = checkpoint if checkpoint is not None and checkpoint.get("progress") else None
    done = sum(a.train.rounds for n, a in arms.items() if n in summary["arms"])
    bar = tqdm(
        total=sum(a.train.rounds for a in arms.values()),
        initial=done + (resumed["progress"]["state"]["round"] if resumed else 0),
        desc=cfg.name,
        unit="round",
        disable=not progress,
        dynamic_ncols=True,
    )
    rounds_done: dict[str, int] = {
        n: a.train.rounds for n, a in arms.items() if n in summary["arms"]
    }
    current: str | None = None
    siblings = shared_prefixes(arms)
    donors = {donor: rounds for donor, rounds in siblings.values()}
    prefixes: dict[str, dict[str, Any]] = {}  # donor → its state and records after the prefix

    def save(arm_progress: dict[str, Any] | None, arm: str | None) -> None:
        save_checkpoint(
            out,
            {
                "config": to_dict(cfg),
                "arms_done": dict(summary["arms"]),
                "target_bits": summary.get("target_bits"),
                "arm": arm,
                "progress": arm_progress,
                "metrics_lines": writer.lines,
            },
        )

    def start(arm: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None] | None:
        """(progress, shared records) the arm starts from; None while it waits for its
        donor's prefix (side by side only)."""
        if resumed is not None and resumed["arm"] == arm:
            return resumed["progress"], None
        donor = siblings.get(arm, ("", 0))[0]
        if donor in prefixes:
            shared = prefixes[donor]
            return sibling_progress(shared, arms[donor], arm, arms[arm]), shared["records"]
        if donor in todo and donor not in summary["arms"] and donor not in finished:
            return None  # the donor is still before its prefix
        return {}, None  # from the first round

    todo = [a for a in arms if a not in summary["arms"]]
    finished: set[str] = set()
    workers = arms_at_once(jobs, [arms[a] for a in todo])
    try:
        if workers > 1:
            together = Together(arms, out, writer, bar, summary, rounds_done, save, start)
            run_side_by_side(together, todo, workers, siblings, prefixes, finished)
        for current in todo if workers == 1 else []:
            begin = start(current)
            assert begin is not None  # one arm at a time: a donor ran before its siblings
            from_checkpoint = begin[0] or None
            rounds_done[current] = from_checkpoint["state"]["round"] if from_checkpoint else 0
            key = (arms[current].data.dataset, arms[current].data.root)
            entry = run_arm(
                current,
                arms[current],
                data[key],
                writer,
                bar,
                rounds_done,
                partial(save, arm=current),
                from_checkpoint,
                share_at=donors.get(current) if from_checkpoint is None else None,
                prefixes=prefixes,
                shared_records=begin[1],
            )
            summary["arms"][current] = entry
            summary["target_bits"] = entry["target_bits"]
            save(None, current)  # the arm is done
        summary["complete"] = True
    except BaseException as e:
        summary["complete"] = False
        if workers > 1:  # the first arm not finished: the one whose records are in order
            current = next((a for a in todo if a not in summary["arms"] and a in rounds_done), None)
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by an error: {e}"
        summary["stopped"] = _stopped(arms, current, rounds_done, reason, writer, summary)
        raise
    finally:
        bar.close()
        writer.finish(summary)
    return summary


def arms_at_once(jobs: int | str, todo: list[Config]) -> int:
    """How many of the arms ``todo`` run side by side (:func:`fedtier.side_by_side.resolve_jobs`);
    one at a time when an arm trains on Ray, which spreads each arm over the cluster already
    (and two arm processes would each start a local Ray)."""
    workers = resolve_jobs(jobs, len(todo))
    if workers > 1 and any(a.train.executor == "ray" for a in todo):
        logging.getLogger("fedtier").info(
            "arms run one at a time: with train.executor 'ray' each arm spreads its clients "
            "over the Ray cluster already"
        )
        return 1
    return workers


@dataclass
class Together:
    """What arms run side by side share with the run (see :func:`run_side_by_side`)."""

    arms: dict[str, Config]
    out: Path
    writer: RunWriter
    bar: tqdm
    summary: dict[str, Any]
    rounds_done: dict[str, int]
    save: Callable[[dict[str, Any] | None, str | None], None]
    start: Callable[[str], tuple[dict[str, Any] | None, list[dict[str, Any]] | None] | None]


def run_side_by_side(
    run: Together,
    todo: list[str],
    workers: int,
    siblings: dict[str, tuple[str, int]],
    prefixes: dict[str, dict[str, Any]],
    finished: set[str],
) -> None:
    """Run the arms ``todo`` in up to ``workers`` processes at once (:mod:`fedtier.side_by_side`),
    each as :func:`run_arm` runs it alone, so the numbers are a one-at-a-time run's.

    metrics.jsonl gets the arms' records in the config's arm order: the first unfinished
    arm's as they come, the others' when every arm before them is done (and, if the run
    stops, all that arrived). The checkpoint follows that order: it holds the arms done and
    the first unfinished arm's last checkpointed state, so ``--resume`` continues that arm
    and reruns the others from their start. An arm that shares its first rounds with a donor
    arm starts when the donor has run them."""
    procs = ArmProcesses()
    shared = {arm: rounds for arm, (_, rounds) in siblings.items()}
    donors = {donor: rounds for donor, rounds in siblings.values()}
    pending = sorted(todo, key=lambda arm: -expected_work(run.arms[arm], shared.get(arm, 0)))
    threads = max(1, min(torch.get_num_threads(), available_workers() // workers))
    logging.getLogger("fedtier").info(
        "%d arms at once, each in its own process with %d thread(s) (--jobs; the numbers "
        "are those of one arm at a time)",
        workers,
        threads,
    )
    held: dict[str, list[dict[str, Any]]] = {arm: [] for arm in todo}  # records not written
    entries: dict[str, dict[str, Any]] = {}
    order = iter(todo)
    head = next(order, None)

    def launch() -> None:
        for arm in list(pending):
            if len(procs.running) >= workers:
                return
            begin = run.start(arm)
            if begin is None:
                continue  # its donor has not run the shared rounds yet
            pending.remove(arm)
            progress = begin[0] or None
            run.rounds_done[arm] = progress["state"]["round"] if progress else 0
            share_at = donors.get(arm) if progress is None else None
            args = (run.arms[arm], progress, share_at, begin[1])
            procs.start(arm, arm_job, args, run.out, threads)

    try:
        launch()
        for kind, arm, payload in procs.messages():
            if kind == "log":
                (run.writer.log if arm == head else held[arm].append)(payload)
            elif kind == "round":
                run.rounds_done[arm] = run.rounds_done.get(arm, 0) + payload
                run.bar.update(payload)
            elif kind == "postfix":
                run.bar.set_postfix(payload)
            elif kind == "checkpoint" and arm == head:
                run.save(payload, arm)
            elif kind == "prefix":
                prefixes[arm] = payload
            elif kind == "done":
                entries[arm] = payload
                finished.add(arm)
                while head is not None and head in entries:  # arms done, in order
                    run.summary["arms"][head] = entries[head]
                    run.summary["target_bits"] = entries[head]["target_bits"]
                    run.save(None, head)
                    head = next(order, None)
                    for record in held.pop(head, []) if head is not None else []:
                        run.writer.log(record)
            elif kind == "user-error":
                raise FedtierError(f"arm '{arm}': {payload}")
            elif kind == "error":
                raise RuntimeError(f"arm '{arm}' failed in its process:\n{payload}")
            elif kind == "interrupted":
                raise KeyboardInterrupt
            launch()
    finally:
        procs.stop()
        for records in held.values():  # what the arms still running had computed
            for record in records:
                run.writer.log(record)


def expected_work(cfg: Config, from_round: int = 0) -> float:
    """A rough relative cost of an arm that starts at round ``from_round``, to order the arms
    side by side: its rounds (each the honest clients' training and one pass per screen),
    plus each attacking round weighted by the attackers' local epochs relative to the honest
    clients' (their solver dominates an attack arm). Only the order matters."""
    rounds = cfg.train.rounds - from_round
    work = rounds * (1.0 + len(cfg.defenses))
    a = cfg.attack
    if isinstance(a, Attacker):
        attacking = cfg.train.rounds - max(a.start_round, from_round)
        epochs = getattr(a, "epochs", None) or cfg.train.epochs
        work += max(attacking, 0) * epochs / cfg.train.epochs
    return work


def arm_job(
    arm: str,
    cfg: Config,
    progress: dict[str, Any] | None,
    share_at: int | None,
    shared_records: list[dict[str, Any]] | None,
    *,
    writer: Any,
    bar: Any,
    save: Callable[[dict[str, Any] | None], None],
    prefixes: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One arm in its own process (:func:`run_side_by_side`): its data, then :func:`run_arm`."""
    data = load_arm_data({arm: cfg})[(cfg.data.dataset, cfg.data.root)]
    return run_arm(
        arm,
        cfg,
        data,
        writer,
        bar,
        None,
        save,
        progress,
        share_at=share_at,
        prefixes=prefixes,
        shared_records=shared_records,
    )


def _stopped(
    arms: dict[str, Config],
    arm: str | None,
    rounds_done: dict[str, int],
    reason: str,
    writer: RunWriter,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Where a run stopped; the last evaluation (if any) of each arm stopped on the way joins
    summary["arms"] so the tables show what the plot of metrics.jsonl shows. ``arm`` is the
    stopped arm named first (arms side by side may stop several; all are under "running")."""
    stop: dict[str, Any] = {"reason": reason, "not_run": [a for a in arms if a not in rounds_done]}
    started = [a for a in arms if a in rounds_done and a not in summary["arms"]]
    if not started:
        return stop
    records, _ = read_run(writer.out)
    partials = summary_from([r for r in records if r.get("arm") in started])["arms"]
    where: dict[str, dict[str, Any]] = {}
    for a in started:
        partial = partials.get(a)
        if partial is not None:
            summary["arms"][a] = {**partial, "complete": False}
        where[a] = {
            "rounds_done": rounds_done.get(a, 0),
            "rounds": arms[a].train.rounds,
            "last_evaluation": None if partial is None else partial["rounds"],
        }
    first = arm if arm in where else started[0]
    stop.update(arm=first, **where[first])
    if len(where) > 1:
        stop["running"] = where
    return stop


def run_arm(
    arm: str,
    cfg: Config,
    data: tuple[ArrayDataset, ArrayDataset],
    writer: RunWriter,
    bar: tqdm,
    rounds_done: dict[str, int] | None = None,
    save: Callable[[dict[str, Any] | None], None] | None = None,
    progress: dict[str, Any] | None = None,
    share_at: int | None = None,
    prefixes: dict[str, dict[str, Any]] | None = None,
    shared_records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One arm: set up, log the bit-width election, train (from ``progress``, a checkpoint's
    state of this arm, when resuming or starting after rounds shared with another arm), save
    the final model, and return its summary entry. ``rounds_done[arm]`` counts the arm's
    completed rounds as they finish; ``save`` receives the arm's state after every
    ``eval.checkpoint_every``-th evaluation. With ``share_at`` the arm's state and records
    after that many rounds go to ``prefixes[arm]`` (:func:`shared_prefixes`); an arm that
    starts from such a state gets the donor's records of those rounds as ``shared_records``
    and logs them as its own."""
    done = rounds_done if rounds_done is not None else {}

    def on_round(t: int) -> None:
        done[arm] = done.get(arm, 0) + 1
        bar.update(1)

    setup = prepare_arm(cfg, data)
    if is_gan(cfg):
        return run_gan_arm(arm, setup, writer, on_round)
    w_before = setup.layout.flatten(setup.model)  # for the generative report
    # integer buffers (BatchNorm's num_batches_tracked) are not federated: the final model
    # keeps their initial values, so it does not depend on which executor trained it
    initial = {
        k: v.clone() for k, v in setup.model.state_dict().items() if not v.is_floating_point()
    }
    records: list[dict[str, Any]] = []  # this arm's evaluations, while another arm may share them
    if progress is None or shared_records is not None:
        writer.log(
            {
                "arm": arm,
                "event": "setup",
                "target_bits": setup.target_bits,
                "election": setup.election,
                "executor": setup.executor_name,
                "task": task_record(setup.task),
            }
        )
    for record in shared_records or []:  # the rounds shared with the donor arm
        writer.log({**record, "arm": arm})
    if shared_records is not None and progress is not None:
        bar.update(progress["state"]["round"])
    run: dict[str, Any] = (
        progress["run"]
        if progress is not None
        else {"last": {}, "rejections": {}, "evals": 0, "wall_s": 0.0}
    )
    state = RunState.from_dict(progress["state"]) if progress is not None else None
    if progress is not None:  # torch's global stream (dropout in the sequential executor)
        torch.set_rng_state(progress["torch_rng"])
    start = time.perf_counter() - run["wall_s"]
    last, rejections = run["last"], run["rejections"]
    faults = run.setdefault("faults", {})  # absent in checkpoints before fedtier.faults

    def on_eval(record: dict[str, Any]) -> None:
        record = {"arm": arm, **record, "wall_s": round(time.perf_counter() - start, 3)}
        add_rejections(rejections, record["stages"])
        add_secure(run.setdefault("secure", {}), record["stages"])
        add_faults(faults, record["stages"])
        privacy = privacy_record(setup, record["round"])
        if privacy is not None:
            record["privacy"] = privacy
        writer.log(record)
        if share_at is not None:
            records.append(record)
        last.clear()
        last.update(record)
        run["evals"] += 1
        name = setup.task.headline
        bar.set_postfix(
            {
                "arm": arm,
                **{
                    f"{name}{b}": f"{headline(setup.task, m):.3g}"
                    for b, m in record["bits"].items()
                },
            }
        )

    def on_checkpoint(state: RunState) -> None:
        if share_at is not None and prefixes is not None and state.round == share_at:
            run["wall_s"] = time.perf_counter() - start
            prefixes[arm] = copy.deepcopy(
                {
                    "progress": {
                        "state": state.to_dict(),
                        "run": run,
                        "torch_rng": torch.get_rng_state(),
                    },
                    "records": records,
                }
            )
        every = cfg.eval.checkpoint_every
        if save is not None and every > 0 and run["evals"] % every == 0:
            run["wall_s"] = time.perf_counter() - start
            save({"state": state.to_dict(), "run": run, "torch_rng": torch.get_rng_state()})

    bar.set_postfix({"arm": arm})
    # the model the clients receive in the first round, for the gradient-inversion attack
    initial_model = copy.deepcopy(setup.model) if cfg.eval.privacy is not None else None
    try:
        w = run_schedule(
            setup,
            on_eval,
            on_round=on_round,
            state=state,
            on_checkpoint=on_checkpoint,
        )
    finally:
        close_executor(setup)
    extra: dict[str, Any] = {}
    if wants_generation(cfg):
        w_final = evaluated_state(setup, w)
        extra["generation"] = generation_report(setup, w_before, w_final, data, writer.out, arm)
        writer.log({"arm": arm, "event": "generation", **extra["generation"]})
        if setup.costs is not None:
            last["costs"] = setup.costs.snapshot()  # training, plus the sampling's ledger
    setup.layout.load(setup.model, evaluated_state(setup, w))
    final = {**setup.model.state_dict(), **initial}
    save_model(writer.out, arm, final, setup.test.input_shape, setup.test.num_classes)
    if "costs" in last:
        extra["costs"] = last["costs"]
    if any("asr" in m for m in last["bits"].values()):
        extra["asr"] = {b: m["asr"] for b, m in last["bits"].items() if "asr" in m}
    if setup.attack is not None:
        extra["attack"] = setup.attack.summary(setup.target_bits)
        writer.log({"arm": arm, "event": "attack", **extra["attack"]})
    if rejections:
        extra["rejections"] = rejections
    if run.get("secure"):
        extra["secure"] = run["secure"]
    if any(faults.values()):
        extra["faults"] = {k: v for k, v in faults.items() if v}
    if "privacy" in last:
        extra["privacy"] = last["privacy"]
    if initial_model is not None:
        extra["privacy_attacks"], (truth, recon) = privacy_attacks(
            setup, initial_model, setup.model
        )
        plot_reconstructions(writer.out, arm, truth.numpy(), recon.numpy())
        writer.log({"arm": arm, "event": "privacy_attacks", **extra["privacy_attacks"]})
    if cfg.detection is not None:  # sampling-phase trigger detection on the final model
        extra["detection"] = sampling_security(
            setup, data, not bar.disable, writer.out / "plots", arm
        )
    return {
        **extra,
        "cda": {b: m["accuracy"] for b, m in last["bits"].items() if "accuracy" in m},
        "metrics": last["bits"],
        "task": task_record(setup.task),
        "rounds": cfg.train.rounds,
        "wall_s": round(time.perf_counter() - start, 3),
        "target_bits": setup.target_bits,
        "qat": cfg.quant.qat,
        "rule": cfg.aggregate.rule,
    }
