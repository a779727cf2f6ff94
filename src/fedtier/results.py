"""The run directory: config.yaml, metrics.jsonl, summary.json, report.md and plots.

Everything a report needs is in metrics.jsonl and summary.json, so ``fedtier report DIR``
re-renders tables and plots of a finished (or interrupted) run without re-running it.

A run directory is never overwritten by accident: a new run refuses a directory that already
holds one (:func:`check_new_run_dir`) unless asked to replace it, and ``metrics.jsonl`` is
only ever appended to. A run that stops early (Ctrl-C, an error, a killed process) is marked
``"complete": false`` in summary.json, and its report says which arm stopped at which round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from fedtier.defenses.sampling_eval import detection_tables
from fedtier.errors import FedtierError
from fedtier.metrics import MetricSpec

RUN_MARKERS = ("metrics.jsonl", "config.yaml")  # files that make a directory a fedtier run


def is_run_dir(out: Path) -> bool:
    """True when ``out`` is a directory holding a fedtier run (config.yaml or metrics.jsonl)."""
    return out.is_dir() and any((out / name).is_file() for name in RUN_MARKERS)


def check_new_run_dir(out: Path, overwrite: bool = False) -> None:
    """Raise FedtierError, before any work is done, when a new run cannot go to ``out``.

    Allowed: a path that does not exist yet (its nearest existing ancestor must be a writable
    directory), an empty directory, or, with ``overwrite``, a directory holding a fedtier run.
    Refused: a regular file, a path under a file, an unwritable place, a run directory
    without ``overwrite``, and a non-empty directory that holds no run (never deleted).
    """
    try:
        if out.exists():
            if not out.is_dir():
                raise FedtierError(f"--out '{out}' is a file, not a directory; choose a new path")
            if any(out.iterdir()):
                if not is_run_dir(out):
                    raise FedtierError(
                        f"--out '{out}' is a non-empty directory that holds no fedtier run "
                        f"(no {' or '.join(RUN_MARKERS)}); choose a new or empty directory"
                    )
                if not overwrite:
                    # `--resume DIR` (continue this run) is the other way out, where offered.
                    raise FedtierError(
                        f"run directory '{out}' already holds a run; pass --overwrite to "
                        "replace it, or choose another --out"
                    )
            # replacing renames the old run aside, so its parent must be writable too
            places = [out, out.resolve().parent] if overwrite else [out]
        else:
            ancestor = out.absolute().parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise FedtierError(
                    f"--out '{out}': '{ancestor}' is a file, not a directory; choose another path"
                )
            places = [ancestor]
        for place in places:
            if not os.access(place, os.W_OK | os.X_OK):
                raise FedtierError(
                    f"--out '{out}': cannot write in '{place}' "
                    "(permission denied or a read-only file system)"
                )
    except OSError as e:  # e.g. a directory we may not list
        raise FedtierError(f"--out '{out}': {e.strerror or e}") from None


class RunWriter:
    """Creates a new run directory and appends evaluation records as they come, so nothing
    computed is lost on an error. ``metrics.jsonl`` is opened for appending only.

    A resumed run (:meth:`reopen`, with the number of lines its checkpoint had seen) appends
    a ``{"event": "resume", "valid_lines": N}`` marker: readers drop the lines between the
    N-th and the marker (written after the checkpoint by the killed process, possibly cut
    short), which the resumed run writes again.

    ``overwrite`` replaces an existing run directory: the old one is renamed aside and deleted
    only once the new directory and its config.yaml are written (call this after everything
    that can fail while preparing the run, as :func:`fedtier.experiment.run_experiment` does).
    """

    def __init__(self, out: Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
        check_new_run_dir(out, overwrite)
        self.out = out
        self.metrics = out / "metrics.jsonl"
        aside = None
        if overwrite and is_run_dir(out):
            aside = out.resolve().with_name(f".{out.resolve().name}.replaced-{os.getpid()}")
            out.rename(aside)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self.metrics.open("a").close()
        except OSError as e:
            if aside is not None:  # put the old run back where it was
                shutil.rmtree(out, ignore_errors=True)
                aside.rename(out)
            raise FedtierError(
                f"cannot write the run directory '{out}': {e.strerror or e}"
            ) from None
        if aside is not None:
            shutil.rmtree(aside)
        self.lines = 0

    @classmethod
    def reopen(cls, out: Path, valid_lines: int) -> RunWriter:
        """The writer of an existing run directory that a resumed run continues."""
        writer = cls.__new__(cls)
        writer.out, writer.metrics = out, out / "metrics.jsonl"
        text = writer.metrics.read_bytes() if writer.metrics.is_file() else b""
        if text and not text.endswith(b"\n"):  # a line cut short by a kill
            with writer.metrics.open("ab") as f:
                f.write(b"\n")
            text += b"\n"
        writer.lines = text.count(b"\n")
        writer.log(
            {"event": "resume", "valid_lines": valid_lines, "discarded": writer.lines - valid_lines}
        )
        return writer

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1

    def finish(self, summary: dict[str, Any]) -> None:
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        render_report(self.out)


def read_run(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics records, summary) of a run directory; clear errors when files are missing.

    Lines superseded by a resume (see :class:`RunWriter`) are dropped. Without summary.json
    (the process was killed) the summary is rebuilt from the records and marked incomplete."""
    if not out.is_dir():
        raise FedtierError(f"run directory '{out}' does not exist")
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise FedtierError(f"'{out}' is not a fedtier run directory: {path.name} is missing")
    rows: list[tuple[int, dict[str, Any] | str]] = []  # (line number, record or parse error)
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i < len(lines):
                rows.append((i, e.msg))
            continue  # an unterminated last line was cut short by a kill

        if isinstance(record, dict) and record.get("event") == "resume":
            rows = [(j, r) for j, r in rows if j <= int(record["valid_lines"])]
        rows.append((i, record))
    records = []
    for i, r in rows:
        if isinstance(r, str):
            raise FedtierError(f"{path}: line {i} is not valid JSON ({r})")
        records.append(r)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            raise FedtierError(f"{summary_path} is not valid JSON ({e.msg})") from None
    else:
        summary = summary_from(records)
        try:
            name = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            name = None
        summary = {"name": name or out.name, **summary, "complete": False}
        summary["stopped"] = {"reason": "no summary.json: the process ended before finishing"}
    return records, summary


def summary_from(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A summary rebuilt from the last evaluation of each arm (for interrupted runs): the
    same arms and last rounds the accuracy plot draws from these records."""
    arms: dict[str, Any] = {}
    tasks = {r["arm"]: r["task"] for r in records if r.get("event") == "setup" and "task" in r}
    target_bits = None
    for r in records:
        if r.get("event") == "setup":
            target_bits = r.get("target_bits")
        if "bits" in r:
            arms[r["arm"]] = {
                "cda": {b: m["accuracy"] for b, m in r["bits"].items() if "accuracy" in m},
                "metrics": r["bits"],
                "rounds": r["round"],
                "wall_s": r.get("wall_s", 0.0),
                **({"costs": r["costs"]} if "costs" in r else {}),
                **({"task": tasks[r["arm"]]} if r["arm"] in tasks else {}),
            }
    return {"arms": arms, **({"target_bits": target_bits} if target_bits is not None else {})}


def incomplete_note(summary: dict[str, Any]) -> str:
    """One paragraph saying how a run stopped early (empty for a complete run): which arm
    stopped after which round, which evaluation the tables show, which arms never ran."""
    if summary.get("complete", True):
        return ""
    stop = summary.get("stopped", {})
    parts = []
    if stop.get("arm") is not None:
        part = f"arm '{stop['arm']}' stopped after round {stop['rounds_done']} of {stop['rounds']}"
        last = stop.get("last_evaluation")
        part += (
            f" (the tables show its last evaluation, round {last})"
            if last is not None
            else " before its first evaluation (not in the tables)"
        )
        parts.append(part)
    elif summary.get("arms"):
        parts.append(
            "each arm shows its last evaluation: "
            + ", ".join(f"'{n}' round {a.get('rounds')}" for n, a in summary["arms"].items())
        )
    if stop.get("not_run"):
        parts.append("not run: " + ", ".join(f"'{n}'" for n in stop["not_run"]))
    reason = stop.get("reason", "stopped early")
    return f"**Incomplete run** ({reason}): " + "; ".join(parts or ["no evaluation recorded"]) + "."


def console_report(summary: dict[str, Any]) -> str:
    """What ``fedtier run`` prints at the end and ``fedtier report`` prints again: a table
    per metric the task tabulates (clean accuracy for classification), the costs table, the security section and, for a run that stopped
    early, which arm stopped where."""
    lines = []
    note = incomplete_note(summary)
    if note:
        lines += [note.replace("**", ""), ""]
    if is_gan_summary(summary):
        lines += [f"{summary.get('name', 'run')} (GAN)", "", gan_section(summary)]
        return "\n".join(lines)
    lines += [
        f"{summary.get('name', 'run')} (B = {summary.get('target_bits')})",
        "",
        summary_tables(summary),
    ]
    if any("costs" in a for a in summary.get("arms", {}).values()):
        lines += ["", "communication and energy (fedtier.costs):", costs_table(summary)]
    security = security_section(summary)
    if security:
        lines += ["", security.rstrip("\n")]
    generation = generation_section(summary)
    if generation:
        lines += ["", generation.replace("### ", "").rstrip("\n")]
    return "\n".join(lines)


def pretrained_line(summary: dict[str, Any]) -> str:
    """The pretrained model(s) the arms started from and how long their training took."""
    parts = [
        f"{p['path']} ({'from the cache; ' if p['cached'] else ''}pretraining took "
        f"{p['train_s']:.0f} s)"
        for p in summary.get("pretrained", {}).values()
    ]
    return "Pretrained model: " + "; ".join(parts) if parts else ""


def generation_section(summary: dict[str, Any]) -> str:
    """Diffusion arms (fedtier.deploy): FID, class shares and confidence of the samples
    before and after fine-tuning, the sample grids, and the collaborative-sampling table."""
    arms = {n: a["generation"] for n, a in summary.get("arms", {}).items() if "generation" in a}
    if not arms:
        return ""
    first = next(iter(arms.values()))
    classes = first.get("classes") or list(range(len(first["after"]["class_shares"])))
    before = first["before"]
    pre = before.get("pretrain_classes")
    shares = " | ".join(f"class {c} (%)" for c in classes)
    pre_line = pretrained_line(summary)
    clamp = " (x̂_0 clamped to [−1, 1] at every step)" if first["sampling"].get("clip_x0") else ""
    lines = [
        "### Generated samples (fedtier.deploy)",
        "",
        *([pre_line, ""] if pre_line else []),
        f"{first['samples']} samples per model, DDIM {first['sampling']['steps']} steps{clamp}, "
        f"the edge running the first {first['sampling']['shared_steps']}. {first['fid_note']}",
        "",
        f"| model | FID (classes {classes}) | {shares} | other classes (%) | mean confidence |",
        "|---|---|" + "---|" * len(classes) + "---|---|",
    ]

    def row(name: str, m: dict[str, Any]) -> str:
        sh = m["class_shares"]
        own = [100 * sh[c] for c in classes]
        rest = 100 * (1 - sum(sh[c] for c in classes))
        cells = " | ".join(f"{v:.1f}" for v in own)
        return f"| {name} | {m['fid']:.2f} | {cells} | {rest:.1f} | {m['mean_confidence']:.3f} |"

    lines.append(row("before fine-tuning (pretrained)", before))
    lines += [row(n, g["after"]) for n, g in arms.items()]
    if pre is not None:
        lines += [
            "",
            f"Pretrained model on its own classes {pre}: FID {before['fid_pretrain_classes']:.2f}.",
        ]
    grids = [("before fine-tuning", before.get("grid"))] + [
        (n, g["after"].get("grid")) for n, g in arms.items()
    ]
    grids = [(n, g) for n, g in grids if g]
    if grids:
        lines += [""] + [f"![{n}](plots/{g})" for n, g in grids]
    table = first["sampling"]["table"]
    lines += [
        "",
        "Collaborative sampling: the edge runs t of the S steps for the whole batch "
        "(t = 0 device-only, t = S edge-only); per device means (fedtier.costs.sampling):",
        "",
        "| t | device energy (J) | device latency (s) | slowest device (s) | edge time (s) "
        "| edge energy (J) | bytes up | bytes down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['t']} | {r['device_energy_j']:.4g} | {r['device_latency_s']:.4g} | "
        f"{r['max_latency_s']:.4g} | {r['edge_time_s']:.4g} | {r['edge_energy_j']:.4g} | "
        f"{r['bytes_up']:.0f} | {r['bytes_down']:.0f} |"
        for r in table
    ]
    return "\n".join(lines) + "\n"


LEGACY_TABLES = {"accuracy": "cda", "asr": "asr"}  # summaries written before typed metrics
LEGACY_SPECS = {
    "accuracy": MetricSpec("Clean accuracy", "%", scale=100.0, fmt=".1f"),
    "asr": MetricSpec("Attack success rate", "%", higher_is_better=False, scale=100.0, fmt=".1f"),
}


def metric_spec(summary: dict[str, Any], metric: str) -> MetricSpec:
    """The spec of ``metric`` as the first arm declaring it states it (typed metrics)."""
    for a in summary.get("arms", {}).values():
        spec = a.get("task", {}).get("metrics", {}).get(metric)
        if spec is not None:
            return MetricSpec.from_dict(spec)
    return LEGACY_SPECS.get(metric, MetricSpec(metric))


def metric_values(arm: dict[str, Any], metric: str) -> dict[str, float]:
    """{bits: value} of ``metric`` in an arm's summary entry."""
    values = {b: m[metric] for b, m in arm.get("metrics", {}).items() if metric in m}
    if not values and metric in LEGACY_TABLES:
        values = dict(arm.get(LEGACY_TABLES[metric]) or {})
    return values


def table_metrics(summary: dict[str, Any]) -> list[str]:
    """The metrics the arms' tasks tabulate per bit width, in declaration order (old
    summaries without a task record: clean accuracy)."""
    out: list[str] = []
    for a in summary.get("arms", {}).values():
        for m in a.get("task", {}).get("tables", ["accuracy"]):
            if m not in out:
                out.append(m)
    return out or ["accuracy"]


def metric_table(summary: dict[str, Any], metric: str) -> str:
    """Markdown table shaped like QAFed's Table 3: rows bit widths, columns arms, cells the
    metric as its spec shows it (clean accuracy in %, MSE…)."""
    arms = summary.get("arms", {})
    if not arms:
        return "(no evaluations recorded)"
    spec = metric_spec(summary, metric)
    values = {n: metric_values(a, metric) for n, a in arms.items()}
    names = [n for n in arms if values[n]] or list(arms)
    bits = sorted({int(b) for n in names for b in values[n]}, reverse=True)
    lines = ["| bits | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for b in bits:
        cells = [spec.show(values[n][str(b)]) if str(b) in values[n] else "–" for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_tables(summary: dict[str, Any]) -> str:
    """A titled table per metric the arms' tasks tabulate (``## <label> (<unit>) after
    post-training quantization``): CDA, plus ASR under a backdoor evaluation, for
    classification; MSE for the autoencoder and the diffusion task."""
    sections = []
    for metric in table_metrics(summary):
        title = metric_spec(summary, metric).title()
        table = metric_table(summary, metric)
        sections.append(f"## {title} after post-training quantization\n\n{table}\n")
    return "\n".join(sections).rstrip("\n")


def cda_table(summary: dict[str, Any]) -> str:
    """Clean accuracy (%) per bit width and arm (:func:`metric_table` of ``accuracy``)."""
    return metric_table(summary, "accuracy")


def security_section(summary: dict[str, Any]) -> str:
    """ASR per bit width (%), the attacks (B' predicted vs B), per-defense rejections and
    (ε, δ); empty when no arm measured any of them."""
    arms = summary.get("arms", {})
    lines: list[str] = []
    with_asr = {n: a for n, a in arms.items() if a.get("asr") and "task" not in a}
    if with_asr:  # old summaries; a task record tabulates ASR with the task's tables
        lines += ["## Attack success rate (%) after post-training quantization", ""]
        lines += [cda_table({"arms": {n: {"cda": a["asr"]} for n, a in with_asr.items()}}), ""]
    attacks = {n: a["attack"] for n, a in arms.items() if a.get("attack")}
    if attacks:
        lines += ["| arm | attack | malicious | γ | attacked B' | predicted B' | B | B' = B |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for n, a in attacks.items():
            lines.append(
                f"| {n} | {a['kind']} | {len(a['malicious'])} | {a['gamma']:g} | {a['attacked_bits']} "
                f"| {a['predicted_bits']} | {a['target_bits']} | {a['prediction_correct']} |"
            )
        lines.append("")
    rejections = {(n, d): r for n, a in arms.items() for d, r in a.get("rejections", {}).items()}
    if rejections:
        lines += ["| arm | defense | honest rejected | malicious rejected |", "|---|---|---|---|"]
        for (n, d), r in rejections.items():
            lines.append(
                f"| {n} | {d} | {r['rejected_honest']:g} / {r['seen_honest']:g} "
                f"| {r['rejected_malicious']:g} / {r['seen_malicious']:g} |"
            )
        lines.append("")
    secure = {n: a["secure"] for n, a in arms.items() if a.get("secure")}
    if secure:
        lines += [secure_table(secure), ""]
    detection = detection_tables(arms)
    if detection:
        lines += [detection]
    private = {n: a["privacy"] for n, a in arms.items() if a.get("privacy")}
    if private:
        lines += [
            "| arm | DP | sampling | z | q | κ | ε | δ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, p in private.items():
            lines.append(
                f"| {n} | {p['mechanism']} | {p.get('sampling', 'fixed-size')} | {p['z']:g} "
                f"| {p['q']:.3g} | {p.get('edge_rounds', 1)} | {p['epsilon']:.3g} | {p['delta']:g} |"
            )
        lines.append("")
    attacked = {n: a for n, a in arms.items() if a.get("privacy_attacks")}
    if attacked:
        lines += [privacy_attack_table(attacked), ""]
    return "\n".join(lines)


def privacy_attack_table(arms: dict[str, dict[str, Any]]) -> str:
    """Privacy attacks per arm (fedtier.privacy): gradient inversion by the edge on
    one-image, one-step uploads (PSNR/SSIM of the reconstruction, on [0, 1]), loss-threshold
    membership-inference AUC on the final model, fp32 accuracy, and ε against the edge (local
    DP only: central DP's edge sees the uploads in the clear) and against the released model."""
    lines = [
        "privacy attacks (fedtier.privacy): gradient inversion by the edge (B = 1, E = 1, "
        "initial model), membership inference on the final model:",
        "| arm | edge sees | label inferred | inversion PSNR (dB) | best PSNR (dB) | SSIM "
        "| MIA AUC | accuracy (%) | ε vs edge | ε vs model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, a in arms.items():
        inv, mia = a["privacy_attacks"]["inversion"], a["privacy_attacks"]["mia"]
        p = a.get("privacy")
        # local DP protects against the edge (no sampling amplification there) and the model;
        # central DP is added by the edge, which sees the uploads in the clear
        vs_edge = "∞" if p is None or "epsilon_vs_edge" not in p else f"{p['epsilon_vs_edge']:.3g}"
        vs_model = "∞" if p is None else f"{p['epsilon']:.3g}"
        acc = a.get("cda", {})
        fp = acc.get("32", acc.get(32, next(iter(acc.values()), None)))
        lines.append(
            f"| {n} | {inv['observes']} | {inv['label_correct']:.0%} | {inv['psnr']:.1f} "
            f"| {inv['psnr_max']:.1f} "
            f"| {inv['ssim']:.3f} | {mia['auc']:.3f} | {'–' if fp is None else f'{100 * fp:.1f}'} | {vs_edge} "
            f"| {vs_model} |"
        )
    return "\n".join(lines)


def plot_reconstructions(out: Path, arm: str, truth: Any, recon: Any, most: int = 8) -> Path:
    """``privacy/<arm>.png`` (the arm's name made safe as in ``models/``): the first ``most`` true images (top row) above the gradient
    inversion's reconstructions of them (bottom row); arrays [N, C, H, W] on [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(most, len(truth))
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8), squeeze=False)
    for j in range(n):
        for row, imgs in enumerate((truth, recon)):
            img = imgs[j].transpose(1, 2, 0)
            ax = axes[row][j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("true")
    axes[1][0].set_ylabel("inverted")
    fig.suptitle(f"{arm}: gradient inversion by the edge", fontsize=9)
    fig.tight_layout()
    path = out / "privacy" / (re.sub(r"[^A-Za-z0-9._-]", "_", arm) + ".png")  # as models/
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def secure_table(secure: dict[str, dict[str, float]]) -> str:
    """Secure aggregation per arm: threshold, aborted edge rounds, dropouts, and per client
    and edge round the bytes each phase sent and its compute (fedtier.secure)."""
    lines = [
        "secure aggregation (fedtier.secure), per client and edge round:",
        "| arm | t | aborted | dropped | keys+shares up (B) | masked input up (B) "
        "| unmask up (B) | down (B) | beyond fp32 (B) | client (ms) | edge (ms) "
        "| max fixed-point error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    phases = ("advertise", "share_keys", "masked_input", "unmask")
    for n, r in secure.items():
        g = r.get
        keys = g("advertise_up_bytes", 0.0) + g("share_keys_up_bytes", 0.0)
        down = sum(g(f"{p}_down_bytes", 0.0) for p in phases)
        client_ms = 1e3 * sum(g(f"{p}_client_s", 0.0) for p in phases)
        edge_ms = 1e3 * sum(g(f"{p}_edge_s", 0.0) for p in phases)
        lines.append(
            f"| {n} | {g('threshold', 0):g} | {g('aborted', 0):g} | {g('dropped', 0):g} "
            f"| {keys:.0f} | {g('masked_input_up_bytes', 0):.0f} | {g('unmask_up_bytes', 0):.0f} "
            f"| {down:.0f} | {g('overhead_up_bytes', 0):.0f} | {client_ms:.2f} | {edge_ms:.2f} "
            f"| {g('fixed_point_err', 0):.2g} |"
        )
    return "\n".join(lines)


def render_report(out: Path) -> Path:
    """Write report.md (a table per metric the arms' tasks tabulate, per bit width: CDA, and
    ASR under a backdoor evaluation, for classification) and <headline>.png (the headline
    metric per bit width against round, per arm; accuracy.png for classification)."""
    records, summary = read_run(out)
    lines = [f"# fedtier run: {summary.get('name', out.name)}", ""]
    note = incomplete_note(summary)
    if note:
        lines += [note, ""]
    if is_gan_summary(summary):
        lines += [gan_section(summary), ""]
        plot = plot_fid(records, out / "fid.png")
        if plot is not None:
            lines += ["## FID against generator updates", "", f"![fid]({plot.name})", ""]
        grids = [(n, a["gan"]["grid"]) for n, a in summary["arms"].items() if "gan" in a]
        lines += ["## Samples (the first 100 of the final samples)", ""]
        lines += [f"**{n}**\n\n![{n}]({g})\n" for n, g in grids]
        (out / "report.md").write_text("\n".join(lines))
        return out / "report.md"
    if summary.get("target_bits") is not None:
        lines += [f"Target bit set B: {summary['target_bits']}", ""]
    lines += [summary_tables(summary), ""]
    security = security_section(summary)
    if security:
        lines += [security, ""]
    generation = generation_section(summary)
    if generation:
        lines += [generation.replace("### ", "## "), ""]
    arms = summary.get("arms", {})
    if arms:
        lines += ["| arm | rounds | wall time (s) |", "|---|---|---|"]
        lines += [
            f"| {n} | {a.get('rounds', '–')} | {a.get('wall_s', 0):.1f} |" for n, a in arms.items()
        ]
        lines.append("")
    headline = headline_metric(summary)
    spec = metric_spec(summary, headline)
    plot = plot_accuracy(records, out / f"{headline}.png", headline, spec)
    if plot is not None:
        lines += [
            f"## {spec.label} per bit width against round",
            "",
            f"![{headline}]({plot.name})",
            "",
        ]
    if any("costs" in a for a in arms.values()):
        lines += ["## Communication and energy", "", costs_table(summary), ""]
        cost_plot = plot_costs(records, out / "costs.png", headline, spec)
        if cost_plot is not None:
            lines += [f"![accuracy against simulated time and energy]({cost_plot.name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def headline_metric(summary: dict[str, Any]) -> str:
    """The headline metric of the first arm that declares one (``accuracy`` otherwise)."""
    for a in summary.get("arms", {}).values():
        if "task" in a:
            return str(a["task"]["headline"])
    return "accuracy"


def plot_accuracy(
    records: list[dict[str, Any]],
    path: Path,
    metric: str = "accuracy",
    spec: MetricSpec = LEGACY_SPECS["accuracy"],
) -> Path | None:
    """``metric`` (the headline) per bit width against round, one panel per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "bits" in r]
    arms = list(dict.fromkeys(r["arm"] for r in evals))
    if not arms:
        return None
    fig, axes = plt.subplots(
        1, len(arms), figsize=(4.5 * len(arms), 3.5), squeeze=False, sharey=True
    )
    for ax, arm in zip(axes[0], arms):
        rs = [r for r in evals if r["arm"] == arm]
        for b in rs[0]["bits"]:
            ys = [spec.scale * r["bits"][b].get(metric, float("nan")) for r in rs]
            ax.plot([r["round"] for r in rs], ys, marker="o", ms=3, label=f"{b} bit")
        ax.set_title(arm)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(spec.title())
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def costs_table(summary: dict[str, Any]) -> str:
    """Markdown table per arm: the headline metric at fp32 (accuracy in %), bytes uploaded
    client → edge (and the share of the fp32 arm's, when one is named ``fp32…``), simulated
    time and device energy in total (fedtier.costs); with optimal allocation also the same
    run's cost at (f_max, P_max)."""
    arms = {n: a for n, a in summary.get("arms", {}).items() if "costs" in a}
    if not arms:
        return "(no cost records)"
    fp32 = next((a["costs"] for n, a in arms.items() if n.startswith("fp32")), None)
    headline = headline_metric(summary)
    spec = metric_spec(summary, headline)
    short = "acc fp32 (%)" if headline == "accuracy" else f"{headline} fp32"
    lines = [
        f"| arm | {short} | uploaded (MB) | vs fp32 | time (s) | energy (J) "
        "| at max f, P: time (s) | energy (J) | energy saved | infeasible | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, a in arms.items():
        c = a["costs"]
        acc = metric_values(a, headline).get("32")
        up = c.get("bytes_client_edge", 0.0)
        share = f"{up / fp32['bytes_client_edge']:.3f}" if fp32 else "–"
        at_max = c.get("energy_at_max_j")
        saved = f"{100 * (1 - c['energy_j'] / at_max):.1f}%" if at_max else "–"
        lines.append(
            f"| {n} | {'–' if acc is None else spec.show(acc)} | {up / 1e6:.2f} | {share} "
            f"| {c.get('time_s', 0):.1f} | {c.get('energy_j', 0):.2f} "
            f"| {c.get('time_at_max_s', c.get('time_s', 0)):.1f} "
            f"| {at_max if at_max is not None else c.get('energy_j', 0):.2f} | {saved} "
            f"| {int(c.get('infeasible', 0))} | {int(c.get('dropped', 0))} |"
        )
    return "\n".join(lines)


def plot_costs(
    records: list[dict[str, Any]],
    path: Path,
    metric: str = "accuracy",
    spec: MetricSpec = LEGACY_SPECS["accuracy"],
) -> Path | None:
    """``metric`` (the headline) at the first evaluated bit width against simulated time and
    against cumulative device energy, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "bits" in r and "costs" in r]
    arms = list(dict.fromkeys(r["arm"] for r in evals))
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for arm in arms:
        rs = [r for r in evals if r["arm"] == arm]
        b = next(iter(rs[0]["bits"]))
        ys = [spec.scale * r["bits"][b].get(metric, float("nan")) for r in rs]
        for ax, key in zip(axes, ("time_s", "energy_j")):
            ax.plot([r["costs"].get(key, 0.0) for r in rs], ys, marker="o", ms=3, label=arm)
    axes[0].set_xlabel("simulated time (s)")
    axes[1].set_xlabel("device energy (J)")
    axes[0].set_ylabel(spec.title())
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ GAN runs


def is_gan_summary(summary: dict[str, Any]) -> bool:
    """True when the run's arms are GAN arms (their entries carry final ``gan`` metrics)."""
    arms = summary.get("arms", {})
    return bool(arms) and all("gan" in a for a in arms.values())


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.3f}"


def gan_section(summary: dict[str, Any]) -> str:
    """The GAN comparisons (seed 001 / issue 11) from the arms' summary entries: quality at
    equal generator updates with the done-means checks against the ``central`` arm, class
    shares, sources (label-related), bytes per tier and per global round, and the
    three-tier region weights."""
    arms = {n: a for n, a in summary.get("arms", {}).items() if "gan" in a}
    if not arms:
        return "(no GAN arms)"
    central = next((a["gan"] for a in arms.values() if a.get("method") == "central"), None)
    first = next(iter(arms.values()))["gan"]
    out = [
        "## Quality at equal generator updates",
        "",
        f"{first['samples']} samples per arm (the same z for every arm). {first['fid_note']}",
        "",
        "| arm | method | generator updates (all copies) | FID | KL (nats) | mean confidence "
        "| region coverage | wall time (s) | FID ≤ 1.5× central | KL ≤ central + 0.1 "
        "| confidence ≥ central − 0.1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, a in arms.items():
        g = a["gan"]
        cov = " / ".join(f"{f:.2f}" for f in g["region_coverage"])
        checks = ["–", "–", "–"]
        if central is not None and a.get("method") != "central":
            checks = [
                _yes(g["fid"] <= 1.5 * central["fid"], f"{g['fid'] / central['fid']:.2f}×"),
                _yes(g["kl"] <= central["kl"] + 0.1, f"{g['kl'] - central['kl']:+.3f}"),
                _yes(
                    g["confidence"] >= central["confidence"] - 0.1,
                    f"{g['confidence'] - central['confidence']:+.3f}",
                ),
            ]
        out.append(
            f"| {n} | {a.get('method', '–')} | {_count(a.get('generator_updates'))} "
            f"({_count(a.get('generator_updates_all'))}) "
            f"| {g['fid']:.1f} | {g['kl']:.3f} | {g['confidence']:.3f} | {cov} "
            f"| {a.get('wall_s', 0):.1f} | " + " | ".join(checks) + " |"
        )
    classes = len(first["class_shares"])
    out += [
        "",
        "## Share of samples per class (the judge's argmax)",
        "",
        "| arm | " + " | ".join(str(c) for c in range(classes)) + " |",
        "|---|" + "---|" * classes,
        "| data | " + " | ".join(f"{v:.3f}" for v in first["data_shares"]) + " |",
    ]
    out += [
        f"| {n} | " + " | ".join(f"{v:.3f}" for v in a["gan"]["class_shares"]) + " |"
        for n, a in arms.items()
    ]
    sourced = {n: a for n, a in arms.items() if "source_shares" in a["gan"]}
    if sourced:
        k = len(next(iter(sourced.values()))["gan"]["source_shares"])
        out += [
            "",
            "## Sources (label-related): share of samples per source and FID per source",
            "",
            "| arm | "
            + " | ".join(f"share {s}" for s in range(k))
            + " | each ≥ 10% | "
            + " | ".join(f"FID {s}" for s in range(k))
            + " |",
            "|---|" + "---|" * (2 * k + 1),
        ]
        for n, a in sourced.items():
            g = a["gan"]
            shares = g["source_shares"]
            out.append(
                f"| {n} | "
                + " | ".join(f"{v:.3f}" for v in shares)
                + f" | {_yes(min(shares) >= 0.1, f'min {min(shares):.3f}')} | "
                + " | ".join(_fmt(v, ".1f") for v in g["source_fid"])
                + " |"
            )
    costed = {n: a for n, a in arms.items() if "costs" in a}
    if costed:
        out += [
            "",
            "## Bytes per tier (MB, whole run) and per global round",
            "",
            "| arm | device → edge | edge → device | edge → cloud | cloud → edge "
            "| per global round | rounds | simulated time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        per_round = {}
        for n, a in costed.items():
            c = a["costs"]
            tiers = [c.get(k, 0.0) for k in ("bytes_client_edge", "bytes_edge_client")]
            tiers += [c.get(k, 0.0) for k in ("bytes_edge_cloud", "bytes_cloud_edge")]
            rounds = a.get("rounds") or 1
            per_round[n] = sum(tiers) / rounds
            out.append(
                f"| {n} | "
                + " | ".join(_mb(v) for v in tiers)
                + f" | {_mb(per_round[n])} | {rounds} | {c.get('time_s', 0.0):.1f} |"
            )
        fedavg = next((n for n in costed if costed[n].get("method") == "fedavg"), None)
        for n in costed:
            if fedavg is not None and n != fedavg and per_round[fedavg] > 0:
                out.append(
                    f"\n{n} sends {per_round[n] / per_round[fedavg]:.3f}× the bytes per global "
                    f"round of {fedavg}."
                )
    weighted = {n: a["weights"] for n, a in arms.items() if a.get("weights")}
    if weighted:
        out += ["", "## Three-tier region weights (softmax of the scores)", ""]
        out += ["| arm | first round | last round | range over the run |", "|---|---|---|---|"]
        for n, w in weighted.items():
            flat = [v for row in w for v in row]
            first_w = " / ".join(f"{v:.3f}" for v in w[0])
            last_w = " / ".join(f"{v:.3f}" for v in w[-1])
            out.append(f"| {n} | {first_w} | {last_w} | {min(flat):.3f}–{max(flat):.3f} |")
        out += ["", "Weights along the run (cloud update: w_0 / w_1 / …):", ""]
        out += [
            "| arm | " + " | ".join(["1/5", "2/5", "3/5", "4/5", "end"]) + " |",
            "|---|" + "---|" * 5,
        ]
        for n, w in weighted.items():
            picks = [-(-len(w) * f // 5) - 1 for f in range(1, 6)]  # ⌈n·f/5⌉, 0-based
            cells = [f"{i + 1}: " + " / ".join(f"{v:.2f}" for v in w[i]) for i in picks]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _count(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _yes(ok: bool, detail: str) -> str:
    return f"{'yes' if ok else '**no**'} ({detail})"


def plot_fid(records: list[dict[str, Any]], path: Path) -> Path | None:
    """FID (in-house judge) against generator updates, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "bits" in r and "generator_updates" in r]
    arms = list(dict.fromkeys(r["arm"] for r in evals))
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        rs = [r for r in evals if r["arm"] == arm]
        ys = [r["bits"]["32"].get("fid", float("nan")) for r in rs]
        ax.plot([r["generator_updates"] for r in rs], ys, marker="o", ms=3, label=arm)
    ax.set_xlabel("generator updates")
    ax.set_ylabel("FID (in-house judge, not Inception)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
