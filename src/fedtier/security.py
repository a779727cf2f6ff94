"""Wires cfg.attack and cfg.defense into an arm: malicious clients, ASR evaluation, the
quantization-consistency screen, global clipping / server noise, and DP accounting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtier.attacks import (
    Attack,
    attack_executor,
    attack_stage,
    baddiffusion_images,
    build_attack,
    make_trigger,
    malicious_clients,
    measures_asr,
    unwrap_diffusion,
    with_asr,
)
from fedtier.config import (
    BadDiffusionAttack,
    DiffusionTaskConfig,
    GlobalClipDefense,
    QCheckDefense,
    ServerNoiseDefense,
    TrainedAttack,
)
from fedtier.data import ArrayDataset, select_classes
from fedtier.defenses import compose, global_clip, server_noise
from fedtier.defenses.qcheck import quant_consistency
from fedtier.defenses.sampling_eval import (
    DetectionSettings,
    evaluate_detection,
    plot_auroc_by_step,
)
from fedtier.local.arm import ArmSetup
from fedtier.privacy import dp_epsilon, dp_mechanism, round_noise
from fedtier.privacy.inversion import infer_label, invert, match_images, psnr, sgd_update, ssim
from fedtier.privacy.membership import loss_scores, membership_auc
from fedtier.rounds import server_lr
from fedtier.seeding import numpy_rng
from fedtier.tasks.base import device_of
from fedtier.topology import expected_clients, expected_sampled, sample_rate
from fedtier.upload import Chain
from fedtier.upload.chain import UploadContext


def parameter_mask(setup: ArmSetup) -> torch.Tensor:
    """[P] bool: True on the entries of the state vector that are model parameters."""
    params = {n for n, _ in setup.model.named_parameters()}
    return torch.cat(
        [
            torch.full((s.numel(),), n in params)
            for n, s in zip(setup.layout.names, setup.layout.shapes)
        ]
    )


def install(setup: ArmSetup, train: ArrayDataset) -> Attack | None:
    """Apply the arm's attack and defenses to ``setup`` in place; returns the attack."""
    cfg = setup.cfg
    attack = None
    needs_trigger = measures_asr(cfg)
    trigger = make_trigger(cfg, train) if needs_trigger or cfg.attack.kind != "none" else None
    if trigger is not None and needs_trigger:
        setup.task = with_asr(setup.task, trigger)
    if cfg.attack.kind != "none":
        assert trigger is not None
        n = setup.topology.num_clients
        gamma_auto = (
            n / server_lr(setup)
            if cfg.aggregate.rule == "qafed"
            else expected_sampled(setup.topology, cfg.topology)
        )
        attack = build_attack(
            cfg, trigger, train.num_classes, float(gamma_auto), setup.task, train.input_shape
        )
        attack.amplify_mask = parameter_mask(setup)
        a = cfg.attack
        if cfg.aggregate.rule == "fedavg" and isinstance(a, TrainedAttack) and a.gamma is None:
            attack.mean_size = float(setup.topology.num_samples.mean())
        assert setup.executor is not None
        setup.executor = attack_executor(setup.executor, attack)
        # the attack's rows are transformed or amplified first on the way up
        setup.upload = Chain((("attack", attack_stage(setup, attack)), *setup.upload.stages))
        setup.malicious = attack.malicious
    steps = []
    mask = parameter_mask(setup)
    for d in cfg.defenses:  # post-step defenses act in the order listed
        if isinstance(d, QCheckDefense):
            rng = numpy_rng(cfg.seed, "qcheck")
            idx = torch.from_numpy(
                rng.choice(len(train), size=min(d.samples, len(train)), replace=False)
            )
            bits = [b for b in setup.target_bits if b < 32] or [8]
            setup.screen = quant_consistency(train.x[idx], bits, setup.spec, d.ratio)
        elif isinstance(d, GlobalClipDefense):
            steps.append(global_clip(d.rho0, d.rho_step, mask))
        elif isinstance(d, ServerNoiseDefense):
            steps.append(server_noise(d.sigma, cfg.seed, mask))
    if steps:
        setup.post_step = compose(*steps)
    return attack


def privacy_record(setup: ArmSetup, rounds_done: int) -> dict[str, Any] | None:
    """(ε, δ) after ``rounds_done`` cloud rounds, accounted for what the arm does
    (:mod:`fedtier.privacy`): one Poisson-subsampled mechanism per cloud round, q the largest
    client sampling rate q_e of an edge, base mechanism κ Gaussians with z = σ / C on the same
    sample = one Gaussian with z / √κ; Opacus's RDP accountant."""
    cfg = setup.cfg
    mech = dp_mechanism(cfg)
    if mech is None:
        return None
    kind, z, delta = mech
    kappa = cfg.aggregate.edge_rounds
    topo = setup.topology
    q = max(sample_rate(topo, cfg.topology, e) for e in range(topo.num_edges))
    z_round = round_noise(z, kappa)
    record: dict[str, Any] = {
        "mechanism": kind,
        "epsilon": dp_epsilon(z_round, q, rounds_done, delta),
        "delta": delta,
        "z": z,
        "q": q,
        "sampling": "poisson",
        "edge_rounds": kappa,
        "z_per_round": z_round,
        "steps": rounds_done,
        "accounting": "RDP (Opacus): one Poisson-subsampled Gaussian per cloud round, "
        "noise z/sqrt(edge_rounds); edge sampling not amplified",
    }
    if kind == "local":
        # the edge sees who uploads, so against it sampling does not amplify: every round
        # counts in full (q = 1), an upper bound on a client's loss to its edge server
        record["epsilon_vs_edge"] = dp_epsilon(z_round, 1.0, rounds_done, delta)
    return record


REJECTION_KEYS = ("rejected_honest", "rejected_malicious", "seen_honest", "seen_malicious")


def add_rejections(total: dict[str, dict[str, float]], stages: dict[str, float]) -> None:
    """Accumulate per-defense rejection counts (``screen/…``, ``edge/…``) over a run."""
    for key, v in stages.items():
        tier, _, name = key.partition("/")
        if name in REJECTION_KEYS:
            total.setdefault(tier, {k: 0.0 for k in REJECTION_KEYS})[name] += v


def _upload(
    setup: ArmSetup, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, clients: list[int]
) -> torch.Tensor:
    """[C, P_params] what the edge receives from ``clients``, each uploading one SGD step on
    its one image (xs [C, ...], ys [C]) of ``model``, after the arm's upload chain."""
    pc = setup.cfg.eval.privacy
    assert pc is not None
    params = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(len(clients)):
        step = setup.layout.views(torch.zeros(setup.layout.size))
        flat = sgd_update(model, xs[i : i + 1], ys[i : i + 1], params, pc.step_lr)
        off = 0
        for n, p in model.named_parameters():
            step[n].copy_(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        rows.append(torch.cat([step[n].reshape(-1) for n in setup.layout.names]))
    ctx = UploadContext(
        round=0,
        edge=0,
        clients=clients,
        num_samples=torch.ones(len(clients)),
        seed=setup.cfg.seed,
        radio=setup.costs,
    )
    out, _ = setup.upload(torch.stack(rows), ctx)
    views = setup.layout.views(out)
    return torch.cat([views[n].reshape(len(clients), -1) for n in params], dim=1)


def privacy_attacks(
    setup: ArmSetup, initial: nn.Module, final: nn.Module
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The arm's privacy attacks (cfg.eval.privacy; fedtier.privacy).

    Gradient inversion (Geiping et al. 2020) by edge 0 on ``initial`` (the model the clients
    receive in the first round): each target client uploads one SGD step on one image (B = 1,
    E = 1), passed through the arm's upload chain (codecs, local DP). Without secure
    aggregation the edge inverts that upload; with it the edge only learns the sum of the n
    uploads of an edge round (n = the clients it samples per round) and inverts the sum as
    one batch of n images (the sum of one-step updates points along the batch's mean
    gradient), each reconstruction matched to a true image by the assignment of highest total
    PSNR. The labels are known to the attacker (the strongest attacker; ``labels: inferred``
    reads a single upload's label off the update, iDLG); ``label_correct`` says whether iDLG
    would have found it (for a sum: one of its labels). Membership inference (Yeom et al. 2018) scores ``final`` on members (the clients'
    training samples) against non-members (the test set).

    Returns the record and the matched (true, reconstructed) images [M, C, H, W] on [0, 1]."""
    cfg = setup.cfg
    pc = cfg.eval.privacy
    assert pc is not None
    model = initial.cpu().eval()
    edge_clients = [int(c) for c in setup.topology.edge_clients[0]]
    n = max(2, expected_clients(setup.topology, cfg.topology, 0)) if cfg.aggregate.secure else 1
    members_x, members_y = zip(*(setup.client_data(c) for c in range(setup.topology.num_clients)))
    mx, my = torch.cat(members_x), torch.cat(members_y)
    lo, hi = float(mx.min()), float(mx.max())  # the dummy's box: the data's range
    params = [n_ for n_, _ in model.named_parameters()]
    classes = setup.test.num_classes
    shapes = {n_: p.shape for n_, p in model.named_parameters()}
    # the output layer's weight [classes, features]: the last matrix with a row per class
    last = next(p for p in reversed(params) if len(shapes[p]) == 2 and shapes[p][0] == classes)
    size = {n_: shapes[n_].numel() for n_ in params}
    start = sum(size[p] for p in params[: params.index(last)])
    last_weight = slice(start, start + size[last])
    psnrs, ssims, correct = [], [], 0
    shown: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(pc.images):
        clients = [edge_clients[(i * n + j) % len(edge_clients)] for j in range(n)]
        xs, ys = zip(*(setup.client_data(c) for c in clients))
        x = torch.stack([v[0] for v in xs]).cpu()
        y = torch.stack([v[0] for v in ys]).cpu()
        observed = _upload(setup, model, x, y, clients).sum(0)
        label = infer_label(observed, last_weight, classes)
        correct += int(label in y.tolist())
        labels = torch.tensor([label]) if pc.labels == "inferred" and n == 1 else y
        xh = invert(
            model,
            observed,
            labels,
            tuple(x.shape[1:]),
            params,
            bounds=(lo, hi),
            steps=pc.steps,
            lr=pc.lr,
            tv=pc.tv,
            seed=cfg.seed,
            key=(i,),
        )
        xh01, x01 = (xh - lo) / (hi - lo), (x - lo) / (hi - lo)
        for j, k in match_images(xh01, x01):
            psnrs.append(psnr(xh01[j], x01[k]))
            ssims.append(ssim(xh01[j], x01[k]))
            shown.append((x01[k], xh01[j]))
    m = min(pc.mia_samples, len(setup.test), len(mx))
    rng = numpy_rng(cfg.seed, "mia")
    mi = torch.from_numpy(rng.choice(len(mx), size=m, replace=False))
    ti = torch.from_numpy(rng.choice(len(setup.test), size=m, replace=False))
    dev = device_of(final)
    auc = membership_auc(
        loss_scores(final, mx[mi].to(dev), my[mi].to(dev)),
        loss_scores(final, setup.test.x[ti].to(dev), setup.test.y[ti].to(dev)),
    )
    truth, recon = (torch.stack(t) for t in zip(*shown))
    record = {
        "inversion": {
            "observes": "each upload" if n == 1 else f"sum of {n} uploads",
            "uploads_summed": n,
            "images": pc.images,
            "labels": "known" if n > 1 else pc.labels,
            "psnr": sum(psnrs) / len(psnrs),
            "psnr_max": max(psnrs),
            "psnr_min": min(psnrs),
            "matched": len(psnrs),
            "ssim": sum(ssims) / len(ssims),
            "label_correct": correct / pc.images,
            "steps": pc.steps,
            "batch": 1,
            "local_steps": 1,
        },
        "mia": {"auc": auc, "members": m, "non_members": m, "score": "-loss"},
    }
    return record, (truth, recon)


def sampling_security(
    setup: ArmSetup,
    data: tuple[ArrayDataset, ArrayDataset],
    progress: bool = False,
    plots: Path | None = None,
    arm: str = "main",
) -> dict[str, Any]:
    """The arm's sampling-phase security evaluation (``cfg.detection``;
    :func:`fedtier.defenses.sampling_eval.evaluate_detection`) on its final model: DDIM with
    the task's S sample_steps, the edge running the first t = shared_steps; the attack's
    trigger and target; FID of the clean images against the test images of ``data.classes``
    with the in-house judge (:mod:`fedtier.generative`, trained on the whole training set).
    With ``plots``, a grid of 64 samples per input kind (clean, visible, stealthy trigger)
    without defense goes to ``plots/triggered-<arm>-<kind>.png``."""
    from fedtier.generative import FidScorer, sample_grid, train_judge
    from fedtier.tasks.diffusion import ddim_scheduler, sample

    cfg = setup.cfg
    det, task_cfg, a = cfg.detection, cfg.train.task, cfg.attack
    assert det is not None and isinstance(task_cfg, DiffusionTaskConfig)
    assert isinstance(a, BadDiffusionAttack)
    train, test = data
    shape = tuple(setup.test.input_shape)
    r, y = baddiffusion_images(cfg, a, make_trigger(cfg, train), shape)
    diffusion = unwrap_diffusion(setup.task)
    assert diffusion is not None
    scheduler = ddim_scheduler(diffusion)
    model, steps = setup.model, task_cfg.sample_steps

    def sampler(x: torch.Tensor, start: int, stop: int, clip: bool) -> torch.Tensor:
        return sample(model, scheduler, x, steps, start, stop, clip or task_cfg.clip_x0)

    score = None
    if det.fid:
        judge = train_judge(train.x, train.y, seed=cfg.seed, num_classes=train.num_classes)
        score = FidScorer(select_classes(test, cfg.data.classes).x, judge).score
    settings = DetectionSettings(
        steps=steps,
        shared=task_cfg.shared_steps,
        detectors=tuple(det.detectors),
        responses=tuple(det.responses),
        guard=det.guard,
        samples=det.samples,
        triggered=det.triggered,
        reference=det.reference,
        batch_size=det.batch_size,
        batches=det.batches,
        shares=tuple(det.shares),
        response_share=det.response_share,
        chi2_alpha=det.chi2_alpha,
        asr_threshold=det.asr_threshold,
        stealthy=det.stealthy,
    )
    grids: dict[str, str] = {}

    def grid(kind: str, images: torch.Tensor) -> None:
        if plots is not None and len(images):
            path = sample_grid(
                images[:64], plots / f"triggered-{file_stem(arm)}-{kind}.png", 8, scale=4
            )
            grids[kind] = path.name

    out = evaluate_detection(sampler, r, y, settings, cfg.seed, score, progress, grid)
    out["malicious"] = len(malicious_clients(cfg))
    out["grids"] = grids
    if plots is not None:
        kind = "backdoored" if out["malicious"] else "never poisoned"
        path = plots / f"auroc-by-step-{file_stem(arm)}.png"
        plot_auroc_by_step(out["auroc_by_step"], settings.shared, path, f"{arm} ({kind})")
        out["auroc_plot"] = path.name
    return out


def file_stem(arm: str) -> str:
    """An arm's name made safe for a file name (as in ``plots/``)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in arm)
