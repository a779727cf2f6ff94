"""fedtier on Flower (the optional ``flower`` extra): a ``ClientApp`` and a ``Strategy``.

A fedtier experiment deployed with Flower's own tooling (its simulation engine, or SuperLink
and SuperNodes on real devices) keeps fedtier's numbers:

* :func:`client_app` — the device tier as a Flower ``ClientApp``. A node is the fedtier
  client named by its ``partition-id`` (``flower-supernode --node-config
  "partition-id=7"``; the simulation engine numbers its nodes the same way). On a train
  message it runs fedtier's task and local training on its samples
  (:func:`fedtier.local.jobs.run_job` through the arm's executor, with the run's
  per-(seed, step, client) generator), then the arm's upload chain (clipping, local DP,
  codecs), and replies with the delta it uploads [P] and its weight. What the device keeps
  between rounds (FedBN's BatchNorm state, an error-feedback codec's residual) lives in the
  node's own Flower ``Context.state``.
* :class:`TierStrategy` — the edge and cloud tiers as a Flower ``Strategy``: fedtier's round
  plan says which clients train (the same clients as ``fedtier run``), and the uploads that
  come back go through fedtier's own edge step (screening, the edge rule with its
  precondition checks, e.g. Krum's n > 2f + 2) and cloud step (cloud rule, server step,
  global clipping, server noise) — the functions :func:`fedtier.rounds.run_rounds` calls,
  with Flower's nodes as the device step. Any rule of ``aggregate.edge_rule`` and
  ``aggregate.cloud_rule`` works unchanged.
* :func:`server_app` — a ``ServerApp`` running the strategy for ``train.rounds`` rounds with
  fedtier's evaluation at ``eval.every``.

Flower's rounds are flat: a server sends a model to clients and aggregates their replies.
One Flower round is therefore one cloud round with one edge round per edge
(``aggregate.edge_rounds: 1``); the edges are virtual, aggregated on the server, and the
synchronous schedule is the only one.

Configuration under ``flwr run``: the run config's ``fedtier-config`` (a preset name or a
YAML path) and ``fedtier-set`` (dotted overrides separated by ``;``), read by
:func:`config_from_run`. The Python API takes a :class:`fedtier.config.Config`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

from fedtier.aggregate.robust import check_rule_config
from fedtier.config import Config, from_dict, load_config, to_dict
from fedtier.data import load_dataset
from fedtier.errors import ConfigError, FedtierError
from fedtier.experiment import prepare_arm
from fedtier.local.arm import ArmSetup, is_private
from fedtier.local.select import close_executor
from fedtier.metrics import accumulate, reduce_stages
from fedtier.rounds import (
    EdgeResult,
    RunState,
    Uploads,
    bind_state,
    evaluate,
    init_state,
    program_of,
)
from fedtier.topology import RoundPlan, plan_round
from fedtier.upload import UploadContext

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise FedtierError(
        f"fedtier.interop.flower needs Flower, which is not installed ({e}); install the "
        "extra: pip install 'fedtier[flower]'"
    ) from None

log = logging.getLogger("fedtier")

STATE_KEY = "fedtier"  # the node's Context.state entry: what the device keeps between rounds


# ----------------------------------------------------------------------------- config


def flat_config(cfg: Config, executor: str = "sequential") -> Config:
    """``cfg`` checked for Flower's flat rounds (one arm, one edge round per cloud round,
    the synchronous schedule, no simulated secure aggregation), with ``train.executor`` set to ``executor`` (a node trains one
    client: no worker pool)."""
    arms = cfg.arm_configs()
    if len(arms) != 1:
        raise ConfigError("arms", sorted(arms), "one arm per Flower app (run each arm apart)")
    cfg = next(iter(arms.values()))
    if cfg.aggregate.edge_rounds != 1:
        raise ConfigError(
            "aggregate.edge_rounds",
            cfg.aggregate.edge_rounds,
            "1 under Flower (a Flower round is one cloud round with one edge round)",
        )
    if cfg.schedule.name != "sync":
        raise ConfigError("schedule.name", cfg.schedule.name, "'sync' under Flower")
    if cfg.aggregate.secure is not None:
        raise ConfigError(
            "aggregate.secure",
            cfg.aggregate.secure.name,
            "null under Flower (fedtier simulates the clients' masking inside its edge step, "
            "which runs on the Flower server: it would hide nothing; use Flower's own "
            "SecAgg+ mods)",
        )
    d = to_dict(cfg)
    d["train"]["executor"] = executor
    return from_dict(d)


def config_from_run(context: Context) -> Config:
    """The experiment named by a Flower run config: ``fedtier-config`` (preset or YAML
    path) and ``fedtier-set`` (``key=value`` overrides separated by ``;``)."""
    run = context.run_config
    if "fedtier-config" not in run:
        raise FedtierError(
            "the Flower run config has no 'fedtier-config' (a preset name or a YAML path); "
            "set it in pyproject.toml [tool.flwr.app.config] or with "
            '--run-config "fedtier-config=..."'
        )
    overrides = [s.strip() for s in str(run.get("fedtier-set", "")).split(";") if s.strip()]
    return load_config(str(run["fedtier-config"]), overrides)


def build_arm(cfg: Config) -> ArmSetup:
    """The arm of ``cfg`` for Flower (:func:`flat_config`: one arm, the sequential executor)."""
    cfg = flat_config(cfg)
    return prepare_arm(cfg, load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.seed))


_arms: dict[str, ArmSetup] = {}  # per node process: the arm of the config it was built from


def arm_of(cfg: Config) -> ArmSetup:
    """A node's arm of ``cfg``, built once per process (a node's jobs load their start
    state into its model, so nothing carries over from one message to the next)."""
    key = repr(to_dict(cfg))
    if key not in _arms:
        for setup in _arms.values():
            close_executor(setup)
        _arms.clear()
        _arms[key] = build_arm(cfg)
    return _arms[key]


# ----------------------------------------------------------------------------- wire format


def state_record(w: torch.Tensor) -> ArrayRecord:
    """A flat state [P] (layout order) as Flower arrays."""
    return ArrayRecord({"w": Array(w.detach().numpy())})


def record_state(record: ArrayRecord, key: str = "w") -> torch.Tensor:
    """The flat state [P] of a record made by :func:`state_record` (or a reply's delta)."""
    return torch.from_numpy(record[key].numpy().copy())


def _number(value: Any) -> float:
    """A scalar of a Flower record as a float (records type their values loosely)."""
    if not isinstance(value, int | float):
        raise FedtierError(f"expected a number in a Flower record, got {type(value).__name__}")
    return float(value)


def _saved(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _loaded(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


# ----------------------------------------------------------------------------- device tier


def client_app(cfg: Config | None = None) -> ClientApp:
    """fedtier's device tier as a Flower ``ClientApp`` (see the module docstring); ``cfg``
    None reads the experiment from the run config (:func:`config_from_run`)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"client": client})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        setup = arm_of(cfg if cfg is not None else config_from_run(context))
        client = int(context.node_config["partition-id"])
        order = msg.content.config_records["config"]
        delta, metrics = device_update(
            setup,
            record_state(msg.content.array_records["arrays"]),
            client,
            int(_number(order["edge"])),
            int(_number(order["step"])),
            context.state,
        )
        metrics["client"] = client
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"delta": Array(delta.numpy())}),
                    "metrics": MetricRecord(dict(metrics)),
                }
            ),
            reply_to=msg,
        )

    return app


def device_update(
    setup: ArmSetup, w: torch.Tensor, client: int, edge: int, step: int, kept: RecordDict
) -> tuple[torch.Tensor, dict[str, float]]:
    """One device's part of an edge round: local training from w [P] (the arm's executor:
    the attackers' own training included), then the upload chain on its one row. ``kept``
    (the node's ``Context.state``) carries its device-kept state and its upload stages'
    state from round to round. Returns the delta it uploads [P] and its metrics
    (``num-examples``, ``payload-bytes`` when a codec counted them, the chain's metrics)."""
    assert setup.executor is not None
    saved = kept[STATE_KEY]["blob"] if STATE_KEY in kept else None
    mine = _loaded(saved) if isinstance(saved, bytes) else {"device": None, "upload": {}}
    setup.local_state.clear()
    if mine["device"] is not None:
        setup.local_state[client] = mine["device"]
    deltas = setup.executor(setup, w, [client], step)
    size = float(setup.topology.num_samples[client])
    ctx = UploadContext(
        step,
        edge,
        [client],
        torch.tensor([size]),
        setup.cfg.seed,
        radio=setup.costs,
        states=mine["upload"],
    )
    deltas, chain_metrics = setup.upload(deltas, ctx)
    mine["device"] = setup.local_state.get(client)
    kept[STATE_KEY] = ConfigRecord({"blob": _saved(mine)})
    metrics = {"num-examples": size, **{f"chain/{k}": float(v) for k, v in chain_metrics.items()}}
    if client in ctx.payload_bytes:
        metrics["payload-bytes"] = float(ctx.payload_bytes[client])
    return deltas[0], metrics


# ----------------------------------------------------------------------------- edge and cloud


class TierStrategy(Strategy):
    """fedtier's edge and cloud tiers as a Flower ``Strategy`` over the arm ``setup`` (see
    the module docstring). Like ``fedtier run``, it checks the rules' preconditions on the
    topology's row counts when it is made (a :class:`fedtier.errors.ConfigError` naming the
    rule), and again on the rows of every aggregation. ``state`` is the run's state
    (default: the arm's initial one); after every round ``state.w`` is the global state [P]
    and ``state.stages`` holds the stage metrics since the last :meth:`take_stages`. The
    upload chain's metrics arrive per client (each device runs the chain on its own row), so
    a metric averaged over an edge's rows is averaged over clients here."""

    def __init__(self, setup: ArmSetup, state: RunState | None = None) -> None:
        flat_config(setup.cfg)  # refuses what Flower's flat rounds cannot run
        check_rule_config(setup.cfg)  # the rules' preconditions, before any node trains
        self.setup = setup
        self.state = state if state is not None else init_state(setup)
        bind_state(setup, self.state)
        self.nodes: dict[int, int] = {}  # fedtier client id → Flower node id
        self.plan: RoundPlan | None = None

    def summary(self) -> None:
        a = self.setup.cfg.aggregate
        log.info(
            "fedtier tiers: edge rule %s, cloud rule %s, %d clients on %d edges",
            a.edge_rule.name,
            a.cloud_rule.name,
            self.setup.topology.num_clients,
            self.setup.topology.num_edges,
        )

    def find_nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every node which fedtier client it is (its ``partition-id``), once."""
        if not self.nodes:
            asked = [
                Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in grid.get_node_ids()
            ]
            for reply in grid.send_and_receive(asked):
                if not reply.has_error():
                    client = int(_number(reply.content.metric_records["metrics"]["client"]))
                    self.nodes[client] = reply.metadata.src_node_id
        return self.nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round plan's clients, each sent the global state and its (edge, step)."""
        setup, t = self.setup, server_round - 1
        self.state.w = record_state(arrays)
        self.plan = plan_round(
            setup.topology, setup.cfg.topology, setup.cfg.seed, t, poisson=is_private(setup.cfg)
        )
        nodes = self.find_nodes(grid)
        missing = [c for c in self.plan.clients if c not in nodes]
        if missing:
            raise FedtierError(
                f"round {server_round}: no Flower node is fedtier client(s) {missing[:5]} "
                f"({len(nodes)} nodes answered; start one node per client with "
                '--node-config "partition-id=<client>")'
            )
        messages = []
        for edge, clients in self.plan.edges.items():
            for c in clients:
                order = ConfigRecord(
                    {**config, "server-round": server_round, "step": t, "edge": edge}
                )
                content = RecordDict({"arrays": arrays, "config": order})
                messages.append(
                    Message(content, message_type=MessageType.TRAIN, dst_node_id=nodes[c])
                )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """fedtier's edge step at every planned edge over the uploads that came back (a node
        that failed counts as an upload that did not arrive), then its cloud step."""
        setup, state, t = self.setup, self.state, server_round - 1
        assert self.plan is not None
        uploads: dict[int, torch.Tensor] = {}
        payload: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "Flower node %d failed: %s", reply.metadata.src_node_id, reply.error.reason
                )
                continue
            metrics = {k: _number(v) for k, v in reply.content.metric_records["metrics"].items()}
            client = int(metrics["client"])
            uploads[client] = record_state(reply.content.array_records["arrays"], "delta")
            if "payload-bytes" in metrics:
                payload[client] = int(metrics["payload-bytes"])
            chain = {
                k[len("chain/") :]: float(v) for k, v in metrics.items() if k.startswith("chain/")
            }
            accumulate(state.stages, "client", chain)
        previous = setup.program
        base = program_of(setup)
        setup.program = replace(base, device=_replayed(uploads, payload))
        try:
            results: list[EdgeResult] = [
                base.edge(setup, state, state.w, edge, clients, t)
                for edge, clients in self.plan.edges.items()
            ]
            state.w = base.cloud(setup, state, state.w, results, self.plan, t)
        finally:
            setup.program = previous
        state.round = server_round
        return state_record(state.w), MetricRecord({"clients-replied": len(uploads)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # fedtier evaluates the global model centrally (server_app's evaluate_fn)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def take_stages(self) -> dict[str, float]:
        """The stage metrics since the last call, reduced as declared (then cleared)."""
        out = reduce_stages(self.state.stages)
        self.state.stages.clear()
        return out


def _replayed(uploads: dict[int, torch.Tensor], payload: dict[int, int]) -> Callable[..., Uploads]:
    """A device step that returns the uploads Flower's nodes sent (rows of ``clients``; a
    client without a reply did not arrive), priced on the arm's radio."""

    def device(
        setup: ArmSetup, state: RunState, w: torch.Tensor, edge: int, clients: list[int], step: int
    ) -> Uploads:
        arrived = torch.tensor([c in uploads for c in clients], dtype=torch.bool)
        deltas = torch.stack([uploads.get(c, torch.zeros_like(w)) for c in clients])
        if setup.costs is None:
            return Uploads(deltas, arrived)
        sent = {c: b for c, b in payload.items() if c in clients}
        cost = setup.costs.edge_round(edge, clients, sent, int(setup.upload_mask.sum()))
        return Uploads(deltas, arrived & torch.from_numpy(cost.kept), cost.finish_s)

    return device


# ----------------------------------------------------------------------------- server app


def server_app(
    cfg: Config | None = None, on_eval: Callable[[dict[str, Any]], None] | None = None
) -> ServerApp:
    """A ``ServerApp`` running :class:`TierStrategy` for ``train.rounds`` rounds, evaluating
    the global model as ``fedtier run`` does (every ``eval.every`` rounds and after the last,
    at ``quant.eval_bits``). Each evaluation record (``round``, ``stages``, ``bits``) is
    logged and passed to ``on_eval``. ``cfg`` None reads the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        experiment = cfg if cfg is not None else config_from_run(context)
        setup = build_arm(experiment)  # fresh: its model starts from the initial state
        strategy = TierStrategy(setup)
        rounds, every = setup.cfg.train.rounds, setup.cfg.eval.every

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 or (server_round % every and server_round != rounds):
                return None
            bits = evaluate(setup, record_state(arrays))
            record = {"round": server_round, "stages": strategy.take_stages(), "bits": bits}
            log.info("fedtier evaluation: %s", record)
            if on_eval is not None:
                on_eval(record)
            return MetricRecord(
                {f"{b}/{name}": float(v) for b, m in bits.items() for name, v in m.items()}
            )

        strategy.start(
            grid,
            state_record(strategy.state.w),
            num_rounds=rounds,
            evaluate_fn=evaluate_fn,
        )

    return app
