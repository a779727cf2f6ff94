"""The sampling-phase security evaluation of a (possibly backdoored) diffusion model: what the
edge's detectors flag, and what each response leaves of the attack (SPEC §8–9).

Per model, with noises drawn per input from seeded streams (so an input's noise does not
depend on the pool sizes or the batch it lands in):

* pools of clean inputs (``samples``, the clean FID's images), triggered inputs (``triggered``;
  the same ε with the visible trigger, x_T = ε + r, and with the stealthy one, ε + r rescaled
  to ‖ε‖) and the edge's own clean reference inputs (``reference``, for the guard);
* d_i = ‖x_{T−t,i} − x_{T,i}‖₂ after the edge's t shared steps, for every input (the U-Net
  treats each input on its own, so d_i does not depend on its batch);
* TPR/FPR of every detector and of the χ² baseline on ``batches`` random batches of
  ``batch_size`` inputs at each triggered share (0 = all-clean batches: the guard's FPR), with
  the guard and, for the all-clean batches, without it;
* the attack success rate (:func:`fedtier.attacks.baddiffusion.attack_success`) without
  defense, and with each detector × response on batches holding ``response_share`` triggered
  inputs, together with the FID of the clean inputs' delivered images (rejected ones are not
  delivered; replaced ones are sampled again from fresh noise; ITC finishes sampling with x̂_0
  clamped to [−1, 1], our reading of the seed's "ITC").

The model enters only through ``sampler(x, start, stop, clip_x0)``: DDIM steps
``start`` … ``stop − 1`` of the S sampling steps (:func:`fedtier.tasks.diffusion.sample`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedtier.attacks.baddiffusion import attack_success, stealthy_noise, visible_noise
from fedtier.defenses.sampling import (
    DETECTORS,
    RESPONSES,
    Reference,
    auroc,
    best_tpr,
    chi2_flags,
    detect,
    rates,
    step_distance,
)
from fedtier.seeding import numpy_rng, torch_generator

# (x [B, C, H, W], start, stop, clip_x0) → x after DDIM steps start … stop − 1
Sampler = Callable[[torch.Tensor, int, int, bool], torch.Tensor]
TRIGGERS = ("visible", "stealthy")
BASELINE = "chi2"  # the no-sampling baseline's row name
CHUNK = 256  # inputs per sampler call
CEILING_FPR = 0.05  # the FPR bound: the best TPR any fixed threshold on d gets within it


@dataclass(frozen=True)
class DetectionSettings:
    """What :func:`evaluate_detection` measures (``detection`` config section)."""

    steps: int  # S: DDIM sampling steps
    shared: int  # t: steps the edge runs before measuring d
    detectors: tuple[str, ...] = DETECTORS
    responses: tuple[str, ...] = RESPONSES
    guard: float = 3.0  # split only when the groups' means are > guard × the clean spread apart
    samples: int = 1000  # clean inputs (their images give the clean FID)
    triggered: int = 512  # triggered inputs (each trigger form)
    reference: int = 256  # the edge's clean reference inputs
    batch_size: int = 64
    batches: int = 32  # random batches per triggered share
    shares: tuple[float, ...] = (0.0, 0.1, 0.3)
    response_share: float = 0.3  # triggered share of the batches the responses act on
    chi2_alpha: float = 0.05
    asr_threshold: float = 0.1  # MSE (on [0, 1]) within which an image counts as the target
    stealthy: bool = True


def input_noise(seed: int, pool: str, count: int, shape: Sequence[int]) -> torch.Tensor:
    """ε [count, *shape]: input i of ``pool`` drawn from its own stream
    (seed, "detect-noise:<pool>", i)."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=torch_generator(seed, f"detect-noise:{pool}", i))
            for i in range(count)
        ]
    )


def _chunked(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bar: tqdm | None = None
) -> torch.Tensor:
    out = []
    for i in range(0, len(x), CHUNK):
        out.append(fn(x[i : i + CHUNK]).detach().cpu())
        if bar is not None:
            bar.update(len(out[-1]))
    return torch.cat(out) if out else x[:0].clone()


@dataclass
class Pool:
    """Inputs x_T [N, ...], their state after the shared steps x_{T−t} and their d [N]."""

    x_T: torch.Tensor
    mid: torch.Tensor
    d: np.ndarray
    final: torch.Tensor | None = None  # x_0 of plain sampling, when needed
    by_step: np.ndarray | None = None  # [S, N]: ‖x_{T−k} − x_T‖₂ after k = 1 … S steps


def evaluate_detection(
    sampler: Sampler,
    trigger: torch.Tensor,
    target: torch.Tensor,
    settings: DetectionSettings,
    seed: int,
    fid: Callable[[torch.Tensor], float] | None = None,
    progress: bool = False,
    on_images: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """The model's detection and response tables (module docstring). ``trigger`` r and
    ``target`` y are [C, H, W]; ``fid`` scores a batch of clean images (None: no FID);
    ``on_images(name, x_0)`` receives the images sampled without defense (``clean``,
    ``visible``, ``stealthy``), e.g. for sample grids."""
    s = settings
    shape = tuple(trigger.shape)
    n_trig = (2 if s.stealthy else 1) * s.triggered
    total = 2 * (s.samples + n_trig) + s.reference  # shared steps of all, then the rest
    bar = tqdm(total=total, desc="detection", unit="img", disable=not progress, leave=False)
    try:
        return _evaluate(sampler, trigger, target, s, seed, fid, shape, bar, on_images)
    finally:
        bar.close()


def _evaluate(
    sampler: Sampler,
    trigger: torch.Tensor,
    target: torch.Tensor,
    s: DetectionSettings,
    seed: int,
    fid: Callable[[torch.Tensor], float] | None,
    shape: tuple[int, ...],
    bar: tqdm,
    on_images: Callable[[str, torch.Tensor], None] | None,
) -> dict[str, Any]:
    def shared(x: torch.Tensor) -> Pool:
        mid = _chunked(lambda c: sampler(c, 0, s.shared, False), x, bar)
        return Pool(x, mid, step_distance(x, mid).double().numpy())

    def chain(x: torch.Tensor) -> Pool:
        """The whole chain one step at a time (bit for bit one call), keeping x_{T−t}, x_0
        and the distance after every step k = 1 … S."""
        mids, finals, dists = [], [], []
        for i in range(0, len(x), CHUNK):
            x_T = cur = x[i : i + CHUNK]
            d = []
            for k in range(s.steps):
                cur = sampler(cur, k, k + 1, False).detach().cpu()
                d.append(step_distance(x_T, cur).double().numpy())
                if k + 1 == s.shared:
                    mids.append(cur)
            if s.shared == 0:
                mids.append(x_T.clone())
            finals.append(cur)
            dists.append(np.stack(d))
            bar.update(2 * len(x_T))
        mid = torch.cat(mids)
        pool = Pool(x, mid, step_distance(x, mid).double().numpy(), torch.cat(finals))
        pool.by_step = np.concatenate(dists, axis=1)
        return pool

    def finish(pool: Pool) -> torch.Tensor:
        assert pool.final is not None
        return pool.final

    eps = input_noise(seed, "triggered", s.triggered, shape)
    clean = chain(input_noise(seed, "clean", s.samples, shape))
    ref = shared(input_noise(seed, "reference", s.reference, shape))
    triggers = {"visible": chain(visible_noise(eps, trigger))}
    if s.stealthy:
        triggers["stealthy"] = chain(stealthy_noise(eps, trigger))
    reference = Reference.of(ref.d)
    out: dict[str, Any] = {
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
        "reference": {"center": reference.center, "spread": reference.spread},
        "distance": {"clean": _stats(clean.d), "reference": _stats(ref.d)},
        "auroc": {},
        "auroc_by_step": {},
        "best_tpr_by_step": {},  # best TPR of a label-chosen threshold on d at FPR ≤ 5%
        "rates": {},
        "unguarded_fpr": {},
        "no_defense": {},
    }
    detectors = (*s.detectors, BASELINE)
    for name, pool in triggers.items():
        out["distance"][name] = _stats(pool.d)
        out["auroc"][name] = auroc(clean.d, pool.d)
        assert clean.by_step is not None and pool.by_step is not None
        # from the one pass over all S steps: what the edge would see had it run k steps
        out["auroc_by_step"][name] = [auroc(c, p) for c, p in zip(clean.by_step, pool.by_step)]
        out["best_tpr_by_step"][name] = [  # flagging the larger or the smaller d
            max(best_tpr(c, p, CEILING_FPR), best_tpr(-c, -p, CEILING_FPR))
            for c, p in zip(clean.by_step, pool.by_step)
        ]
        out["rates"][name] = {
            det: {
                f"{share:g}": _batch_rates(det, share, clean, pool, reference, s, seed)
                for share in s.shares
            }
            for det in detectors
        }
    out["unguarded_fpr"] = {
        det: _batch_rates(det, 0.0, clean, triggers["visible"], None, s, seed)["fpr"]
        for det in s.detectors
    }
    clean_final = finish(clean)
    out["fid_clean"] = fid(clean_final) if fid is not None else None
    for name, pool in triggers.items():
        out["no_defense"][name] = attack_success(finish(pool), target, s.asr_threshold)
    if on_images is not None:
        on_images("clean", clean_final)
        for name, pool in triggers.items():
            on_images(name, finish(pool))
    out["responses"] = _responses(
        sampler, clean, triggers["visible"], target, reference, s, seed, fid
    )
    return out


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(d)), "std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0}


def _flags(
    det: str,
    d: np.ndarray,
    x_T: torch.Tensor,
    reference: Reference | None,
    s: DetectionSettings,
    key: int,
) -> np.ndarray:
    if det == BASELINE:
        return chi2_flags(x_T, s.chi2_alpha)
    guard = s.guard if reference is not None else 0.0
    return detect(d, det, reference, guard, seed=key)


def _batch_rates(
    det: str,
    share: float,
    clean: Pool,
    trig: Pool,
    reference: Reference | None,
    s: DetectionSettings,
    seed: int,
) -> dict[str, float]:
    """TPR/FPR of ``det`` pooled over ``s.batches`` random batches with round(share · B)
    triggered inputs (the same batches for every detector: numpy_rng(seed,
    "detect-batches", round(1000 · share), b))."""
    k = int(round(share * s.batch_size))
    flags, truth = [], []
    for b in range(s.batches):
        rng = numpy_rng(seed, "detect-batches", int(round(1000 * share)), b)
        ci = rng.choice(len(clean.d), size=s.batch_size - k, replace=False)
        ti = rng.choice(len(trig.d), size=k, replace=False)
        d = np.r_[clean.d[ci], trig.d[ti]]
        x = torch.cat([clean.x_T[ci], trig.x_T[ti]])
        flags.append(_flags(det, d, x, reference, s, b))
        truth.append(np.r_[np.zeros(len(ci), bool), np.ones(k, bool)])
    return rates(np.concatenate(flags), np.concatenate(truth))


def _responses(
    sampler: Sampler,
    clean: Pool,
    trig: Pool,
    target: torch.Tensor,
    reference: Reference,
    s: DetectionSettings,
    seed: int,
    fid: Callable[[torch.Tensor], float] | None,
) -> dict[str, Any]:
    """ASR of the triggered inputs and FID of the clean ones, delivered under each detector ×
    response, on batches of ``response_share`` triggered inputs that together hold every
    clean input once (clean i in batch i // (B − k), triggered inputs in order, cycling)."""
    k = max(1, int(round(s.response_share * s.batch_size)))
    per = s.batch_size - k
    n_batches = -(-len(clean.d) // per)
    cache: dict[tuple[str, str, int], torch.Tensor] = {}

    def delivered(pool_name: str, pool: Pool, idx: np.ndarray, response: str) -> torch.Tensor:
        """The images of pool inputs ``idx`` (all flagged) under ``response``."""
        todo = [int(i) for i in idx if (pool_name, response, int(i)) not in cache]
        if todo:
            if response == "itc":
                got = _chunked(lambda c: sampler(c, s.shared, s.steps, True), pool.mid[todo])
            else:  # replace: fresh noise from its own stream, sampled from the start
                fresh = torch.stack(
                    [
                        torch.randn(
                            tuple(pool.x_T.shape[1:]),
                            generator=torch_generator(seed, f"detect-replace:{pool_name}", i),
                        )
                        for i in todo
                    ]
                )
                got = _chunked(lambda c: sampler(c, 0, s.steps, False), fresh)
            for i, img in zip(todo, got):
                cache[(pool_name, response, i)] = img
        return torch.stack([cache[(pool_name, response, int(i))] for i in idx])

    assert clean.final is not None and trig.final is not None
    out: dict[str, Any] = {"batches": n_batches, "triggered_per_batch": k}
    for det in (*s.detectors, BASELINE):
        flagged_clean = np.zeros(len(clean.d), bool)
        flagged_trig: list[tuple[int, bool]] = []  # (triggered index, flagged) per slot
        for b in range(n_batches):
            ci = np.arange(b * per, min((b + 1) * per, len(clean.d)))
            ti = np.arange(b * k, (b + 1) * k) % len(trig.d)
            d = np.r_[clean.d[ci], trig.d[ti]]
            x = torch.cat([clean.x_T[ci], trig.x_T[ti]])
            f = _flags(det, d, x, reference, s, b)
            flagged_clean[ci] = f[: len(ci)]
            flagged_trig += list(zip(ti.tolist(), f[len(ci) :].tolist()))
        t_idx = np.array([i for i, _ in flagged_trig])
        t_flag = np.array([f for _, f in flagged_trig], bool)
        row: dict[str, Any] = {
            "tpr": float(t_flag.mean()) if len(t_flag) else float("nan"),
            "fpr": float(flagged_clean.mean()),
        }
        for response in s.responses:
            if response == "reject":  # flagged inputs get no image
                trig_imgs = trig.final[t_idx[~t_flag]]
                clean_imgs = clean.final[~flagged_clean]
            else:
                trig_imgs = trig.final[t_idx].clone()
                if t_flag.any():
                    trig_imgs[t_flag] = delivered("triggered", trig, t_idx[t_flag], response)
                clean_imgs = clean.final.clone()
                if flagged_clean.any():
                    clean_imgs[flagged_clean] = delivered(
                        "clean", clean, np.flatnonzero(flagged_clean), response
                    )
            success = attack_success(trig_imgs, target, s.asr_threshold)
            # the ASR counts every triggered request: a rejected one is not a success
            success["asr"] = success["asr"] * len(trig_imgs) / max(1, len(t_idx))
            row[response] = {
                **success,
                "delivered_clean": float(len(clean_imgs)),
                "fid": fid(clean_imgs) if fid is not None and len(clean_imgs) > 1 else None,
            }
        out[det] = row
    return out


# ------------------------------------------------------------------------------------ report


def _pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "–" if v is None or v != v else format(v, fmt)


def detection_tables(arms: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of every arm's ``detection`` entry (:func:`evaluate_detection`), the
    arms side by side: TPR/FPR per detector and triggered share for each trigger form, the
    all-clean FPR with and without the guard, d and its AUROC, the attack without defense,
    and ASR / clean FID under each detector × response."""
    runs = {n: a["detection"] for n, a in arms.items() if a.get("detection")}
    if not runs:
        return ""
    first = next(iter(runs.values()))
    st = first["settings"]

    def label(n: str) -> str:
        return f"{n} ({'backdoored' if runs[n].get('malicious') else 'clean model'})"

    lines = [
        f"## Trigger detection at the edge (d = ‖x_(T−t) − x_T‖₂ after t = {st['shared']} of "
        f"{st['steps']} DDIM steps; guard {st['guard']:g} × clean spread; χ² = the "
        f"no-sampling baseline at α = {st['chi2_alpha']:g})",
        "",
        "TPR / FPR (%) over "
        f"{st['batches']} random batches of {st['batch_size']} per triggered share:",
        "",
    ]
    cols = [(n, t) for n, r in runs.items() for t in r["rates"]]
    lines.append(
        "| detector | triggered | " + " | ".join(f"{label(n)}, {t}" for n, t in cols) + " |"
    )
    lines.append("|---|---|" + "---|" * len(cols))
    dets = list(first["rates"]["visible"])
    for det in dets:
        for share in first["rates"]["visible"][det]:
            cells = []
            for n, t in cols:
                r = runs[n]["rates"][t].get(det, {}).get(share)
                cells.append("–" if r is None else f"{_pct(r['tpr'])} / {_pct(r['fpr'])}")
            lines.append(f"| {det} | {float(share):.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All-clean batches, FPR (%) with the guard / without it:",
        "",
        "| detector | " + " | ".join(label(n) for n in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for det in first["unguarded_fpr"]:
        cells = []
        for r in runs.values():
            guarded = r["rates"]["visible"][det].get("0", {}).get("fpr")
            cells.append(f"{_pct(guarded)} / {_pct(r['unguarded_fpr'][det])}")
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "d_i (mean ± sd) and how well it separates triggered from clean inputs (AUROC):",
        "",
        "| model | clean | reference | trigger | triggered | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        c, ref = r["distance"]["clean"], r["distance"]["reference"]
        for t in r["auroc"]:
            d = r["distance"][t]
            lines.append(
                f"| {label(n)} | {c['mean']:.3g} ± {c['std']:.2g} | {ref['mean']:.3g} ± "
                f"{ref['std']:.2g} | {t} | {d['mean']:.3g} ± {d['std']:.2g} | "
                f"{r['auroc'][t]:.3f} |"
            )
    by_step = {n: r["auroc_by_step"] for n, r in runs.items() if r.get("auroc_by_step")}
    if by_step:
        cols_k = [(n, t) for n, per in by_step.items() for t in per]
        ceiling = {n: r.get("best_tpr_by_step", {}) for n, r in runs.items()}
        lines += [
            "",
            "AUROC of d after k of the S steps, every k (what the edge would see had it run k "
            "steps; one sampling pass records them all; 0.5 is chance, below 0.5 the triggered "
            "inputs move *less*) / the best TPR (%) that any fixed threshold on d reaches at "
            f"FPR ≤ {CEILING_FPR:.0%} over all the pools' inputs (either side; the threshold "
            "chosen with the labels, which no edge has: a ceiling for every detector that "
            "thresholds d):",
            "",
            "| k | " + " | ".join(f"{label(n)}, {t}" for n, t in cols_k) + " |",
            "|---|" + "---|" * len(cols_k),
        ]
        for k in range(1, st["steps"] + 1):
            mark = f"{k} (t)" if k == st["shared"] else str(k)
            cells = []
            for n, t in cols_k:
                best = ceiling[n].get(t)
                tail = "" if best is None else f" / {_pct(best[k - 1])}"
                cells.append(f"{by_step[n][t][k - 1]:.3f}{tail}")
            lines.append(f"| {mark} | " + " | ".join(cells) + " |")
        plots = [(n, r["auroc_plot"]) for n, r in runs.items() if r.get("auroc_plot")]
        if plots:
            lines += [""] + [f"![AUROC of d against k, {label(n)}](plots/{g})" for n, g in plots]
    lines += [
        "",
        f"Attack without defense (ASR: share of triggered samples with MSE ≤ "
        f"{st['asr_threshold']:g} to the target, on [0, 1]; clean FID on {st['samples']} "
        "samples, in-house judge features):",
        "",
        "| model | trigger | ASR (%) | MSE | SSIM | clean FID |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        for t, a in r["no_defense"].items():
            lines.append(
                f"| {label(n)} | {t} | {_pct(a['asr'])} | {_num(a['mse'])} | "
                f"{_num(a['ssim'])} | {_num(r['fid_clean'], '.2f')} |"
            )
    responses = list(st["responses"])
    if responses:
        share = first["responses"]["triggered_per_batch"] / st["batch_size"]
        lines += [
            "",
            f"Responses (visible trigger, batches of {st['batch_size']} with "
            f"{first['responses']['triggered_per_batch']} triggered = {share:.0%}): "
            "ASR (%) / clean FID; ITC = x̂_0 clamped to [−1, 1] at every remaining step "
            "(our reading of the seed's ITC):",
            "",
            "| model | detector | TPR / FPR (%) | " + " | ".join(responses) + " |",
            "|---|---|---|" + "---|" * len(responses),
        ]
        for n, r in runs.items():
            for det, row in r["responses"].items():
                if not isinstance(row, dict):
                    continue
                cells = [f"{_pct(row[x]['asr'])} / {_num(row[x]['fid'], '.2f')}" for x in responses]
                lines.append(
                    f"| {label(n)} | {det} | {_pct(row['tpr'])} / {_pct(row['fpr'])} | "
                    + " | ".join(cells)
                    + " |"
                )
    grids = [
        (f"{label(n)}, {k}", g) for n, r in runs.items() for k, g in r.get("grids", {}).items()
    ]
    if grids:
        lines += ["", "Samples without defense (64 per input kind):", ""]
        lines += [f"![{name}](plots/{g})" for name, g in grids]
    return "\n".join(lines) + "\n"


def plot_auroc_by_step(
    by_step: dict[str, list[float]], shared: int, path: Path, title: str
) -> Path:
    """AUROC of d after k = 1 … S steps (``by_step``: trigger → [S]), one line per trigger,
    the edge's t marked and chance (0.5) drawn → ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for trigger, values in by_step.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=trigger)
    steps = max((len(v) for v in by_step.values()), default=1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax.axvline(shared, color="black", lw=0.8, ls="--", label=f"t = {shared}")
    ax.set_xlim(0.5, steps + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("k: DDIM steps run by the edge")
    ax.set_ylabel("AUROC of d (triggered vs clean)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
