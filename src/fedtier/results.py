"""The run directory: config.yaml, metrics.jsonl, summary.json, report.md and plots.

Everything a report needs is in metrics.jsonl and summary.json, so ``fedtier report DIR``
re-renders tables and plots of a finished (or interrupted) run without re-running it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedtier.errors import FedtierError
from fedtier.metrics import MetricSpec


class RunWriter:
    """Appends evaluation records as they come, so nothing computed is lost on an error.

    ``metrics.jsonl`` is only ever appended to. A resumed run (``resume_from`` = the number of
    lines its checkpoint had seen) appends a ``{"event": "resume", "valid_lines": N}`` marker:
    readers drop the lines between the N-th and the marker (written after the checkpoint by
    the killed process, possibly cut short), which the resumed run writes again.
    """

    def __init__(self, out: Path, config: dict[str, Any], resume_from: int | None = None) -> None:
        self.out = out
        self.metrics = out / "metrics.jsonl"
        if resume_from is None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self.metrics.touch()
            self.lines = 0
            return
        text = self.metrics.read_bytes() if self.metrics.is_file() else b""
        if text and not text.endswith(b"\n"):  # a line cut short by a kill
            with self.metrics.open("ab") as f:
                f.write(b"\n")
            text += b"\n"
        self.lines = text.count(b"\n")
        self.log(
            {"event": "resume", "valid_lines": resume_from, "discarded": self.lines - resume_from}
        )

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1

    def finish(self, summary: dict[str, Any]) -> None:
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        render_report(self.out)


def read_run(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics records, summary) of a run directory; clear errors when files are missing.

    Lines superseded by a resume (see :class:`RunWriter`) are dropped."""
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
    summary = (
        json.loads(summary_path.read_text()) if summary_path.is_file() else summary_from(records)
    )
    return records, summary


def summary_from(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A summary rebuilt from the last evaluation of each arm (for interrupted runs)."""
    arms: dict[str, Any] = {}
    tasks = {r["arm"]: r["task"] for r in records if r.get("event") == "setup" and "task" in r}
    for r in records:
        if "bits" in r:
            arms[r["arm"]] = {
                "cda": {b: m["accuracy"] for b, m in r["bits"].items() if "accuracy" in m},
                "metrics": r["bits"],
                "rounds": r["round"],
                "wall_s": r.get("wall_s", 0.0),
                **({"costs": r["costs"]} if "costs" in r else {}),
                **({"task": tasks[r["arm"]]} if r["arm"] in tasks else {}),
            }
    return {"arms": arms}


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
    return "\n".join(lines)


def render_report(out: Path) -> Path:
    """Write report.md (a table per metric the arms' tasks tabulate, per bit width: CDA, and
    ASR under a backdoor evaluation, for classification) and <headline>.png (the headline
    metric per bit width against round, per arm; accuracy.png for classification)."""
    records, summary = read_run(out)
    lines = [f"# fedtier run: {summary.get('name', out.name)}", ""]
    if summary.get("target_bits") is not None:
        lines += [f"Target bit set B: {summary['target_bits']}", ""]
    lines += [summary_tables(summary), ""]
    security = security_section(summary)
    if security:
        lines += [security, ""]
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
