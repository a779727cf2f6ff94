"""fedtier's secure aggregation side by side with Flower's SecAgg+ (flwr.client.mod.
secaggplus_mod), same n, threshold t, vector length P and dropouts, in one process.

    PYTHONPATH=src python benchmarks/secagg_flower.py --clients 10 --threshold 7 --params 6059 100000

Flower's column runs Flower's own client code, stage by stage (``_setup``, ``_share_keys``,
``_collect_masked_vectors``, ``_unmask`` of secaggplus_mod), with the server's routing and
its unmasking written out here from Flower's own primitives (``combine_shares``,
``pseudo_rand_gen``, ``generate_shared_key``), as SecAggPlusWorkflow does; it does not start
Flower's simulation engine (Ray), so neither column includes transport. Bytes are the
payload of each message: the ``bytes`` values, 8 per integer id (Flower) and 4 (fedtier), no
protobuf/gRPC framing. Time is each client's compute per phase (mean over clients) and the
server's unmasking, wall clock, best of ``--repeats``. Both sums are checked against the
plain sum.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np

from fedtier.secure.secagg import secure_sum

PHASES = ("advertise", "share_keys", "masked_input", "unmask")


def run_fedtier(n: int, t: int, p: int, dropped: list[int]) -> dict[str, Any]:
    x = np.random.default_rng(0).integers(0, 2**22, size=(n, p + 1), dtype=np.uint64)
    out = secure_sum(x, t, 32, drop_before_upload=dropped)
    alive = [u for u in range(n) if u not in dropped]
    assert out.total is not None
    assert (out.total == (x[alive].sum(0) % 2**32)).all()
    res: dict[str, Any] = {}
    for ph, c in out.costs.items():
        took = c.up > 0
        res[ph] = {
            "up": float(c.up[took].mean()),
            "down": float(c.down[took].mean()),
            "client_ms": 1e3 * float(c.seconds[took].mean()),
            "server_ms": 1e3 * c.server_s,
        }
    return res


def run_flower(n: int, t: int, p: int, dropped: list[int]) -> dict[str, Any]:
    import importlib

    from flwr.app import ConfigRecord
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    nids = list(range(1, n + 1))  # Flower's node ids (non-zero)
    states = {nid: mod.SecAggPlusState() for nid in nids}
    cost = {ph: {"up": {}, "down": {}, "s": {}} for ph in PHASES}
    rng = np.random.default_rng(0)
    params = {nid: [rng.uniform(-1, 1, size=p).astype(np.float32)] for nid in nids}

    def size(record: dict[str, Any]) -> int:
        total = 0
        for v in record.values():
            for item in v if isinstance(v, list) else [v]:
                total += len(item) if isinstance(item, bytes) else 8
        return total

    def timed(ph: str, nid: int, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        cost[ph]["s"][nid] = time.perf_counter() - t0
        cost[ph]["up"][nid] = size(out)
        return out

    setup_cfg = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: n,
        Key.THRESHOLD: t,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 1 << 22,
        Key.MOD_RANGE: 1 << 32,
        Key.MAX_WEIGHT: 1000.0,
    }
    pks = {}
    for nid in nids:  # stage 0: setup → public keys
        states[nid].nid = nid
        out = timed("advertise", nid, mod._setup, states[nid], ConfigRecord(dict(setup_cfg)))
        pks[nid] = (out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2])
        cost["advertise"]["down"][nid] = size(setup_cfg)
    fwd: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in nids}
    keys_record = {str(nid): [pk1, pk2] for nid, (pk1, pk2) in pks.items()}
    for nid in nids:  # stage 1: share keys
        cost["advertise"]["down"][nid] += size(keys_record)
        out = timed("share_keys", nid, mod._share_keys, states[nid], ConfigRecord(keys_record))
        for dst, ct in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST]):
            fwd[dst][0].append(nid)
            fwd[dst][1].append(ct)
    alive = [nid for i, nid in enumerate(nids) if i not in dropped]
    masked = None
    for nid in alive:  # stage 2: masked vectors (the dropped never send theirs)
        srcs, cts = fwd[nid]
        cfg = {Key.CIPHERTEXT_LIST: cts, Key.SOURCE_LIST: srcs}
        cost["share_keys"]["down"][nid] = size(cfg)
        out = timed(
            "masked_input",
            nid,
            mod._collect_masked_vectors,
            states[nid],
            ConfigRecord(cfg),
            100,
            ndarrays_to_parameters(params[nid]),
        )
        cost["masked_input"]["down"][nid] = 0
        vec = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
        masked = vec if masked is None else parameters_addition(masked, vec)
    dead = [nid for nid in nids if nid not in alive]
    shares: dict[int, list[bytes]] = {nid: [] for nid in nids}
    for nid in alive:  # stage 3: unmask
        cfg = {Key.ACTIVE_NODE_ID_LIST: alive, Key.DEAD_NODE_ID_LIST: dead}
        cost["unmask"]["down"][nid] = size(cfg)
        out = timed("unmask", nid, mod._unmask, states[nid], ConfigRecord(cfg))
        for owner, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST]):
            shares[owner].append(share)
    t0 = time.perf_counter()  # the server's unmasking, as SecAggPlusWorkflow.unmask_stage
    assert masked is not None
    shapes = [a.shape for a in masked]
    for nid, share_list in shares.items():
        secret = combine_shares(share_list)
        if nid in alive:
            masked = parameters_subtraction(masked, pseudo_rand_gen(secret, 1 << 32, shapes))
        else:
            for v in nids:
                if v == nid:
                    continue
                key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(pks[v][0])
                )
                mask = pseudo_rand_gen(key, 1 << 32, shapes)
                masked = (
                    parameters_addition(masked, mask)
                    if nid > v
                    else parameters_subtraction(masked, mask)
                )
    masked = parameters_mod(masked, 1 << 32)
    server_s = time.perf_counter() - t0
    res: dict[str, Any] = {}
    for ph in PHASES:
        who = list(cost[ph]["s"])
        res[ph] = {
            "up": float(np.mean([cost[ph]["up"][u] for u in who])),
            "down": float(np.mean([cost[ph]["down"].get(u, 0) for u in who])),
            "client_ms": 1e3 * float(np.mean([cost[ph]["s"][u] for u in who])),
            "server_ms": 1e3 * server_s if ph == "unmask" else 0.0,
        }
    return res


def best(fn: Any, repeats: int, *args: Any) -> dict[str, Any]:
    runs = [fn(*args) for _ in range(repeats)]
    return {
        ph: {
            k: min(r[ph][k] for r in runs) if k.endswith("ms") else runs[0][ph][k]
            for k in runs[0][ph]
        }
        for ph in PHASES
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--threshold", type=int, default=7)
    ap.add_argument("--params", type=int, nargs="+", default=[6059, 100_000])
    ap.add_argument("--dropped", type=int, default=1, help="clients dropping before upload")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dropped = list(range(a.dropped))
    print(f"# n = {a.clients}, t = {a.threshold}, dropped before upload = {a.dropped}; "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print("| P | phase | fedtier up (B) | Flower up (B) | fedtier down (B) | Flower down (B) "
          "| fedtier client (ms) | Flower client (ms) | fedtier edge (ms) | Flower server (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in a.params:
        ours = best(run_fedtier, a.repeats, a.clients, a.threshold, p, dropped)
        theirs = best(run_flower, a.repeats, a.clients, a.threshold, p, dropped)
        for ph in PHASES:
            o, f = ours[ph], theirs[ph]
            print(
                f"| {p} | {ph} | {o['up']:.0f} | {f['up']:.0f} | {o['down']:.0f} | {f['down']:.0f} "
                f"| {o['client_ms']:.2f} | {f['client_ms']:.2f} | {o['server_ms']:.2f} "
                f"| {f['server_ms']:.2f} |"
            )


if __name__ == "__main__":
    main()
