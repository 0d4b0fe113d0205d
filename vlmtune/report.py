"""The evaluation report as Markdown and a PNG: what a reviewer reads before promoting an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_markdown(report: dict[str, Any], plot_name: str | None = None) -> str:
    baselines = report["baselines"]
    lines = [
        "# Evaluation report",
        "",
        f"Test questions: **{report['n']}** · metric: {report['metric']}",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| fine-tuned | **{report['accuracy']:.1%}** |",
        *(f"| baseline: {name} | {value['accuracy']:.1%} |" for name, value in baselines.items()),
        "",
        "## Per answer type",
        "",
        "| answer type | n | fine-tuned | " + " | ".join(baselines) + " |",
        "|---|---|---|" + "---|" * len(baselines),
    ]
    for name, value in report["per_answer_type"].items():
        cells = [f"{baselines[b]['per_answer_type'].get(name, {}).get('accuracy', float('nan')):.1%}" for b in baselines]
        lines.append(f"| {name} | {value['n']} | {value['accuracy']:.1%} | " + " | ".join(cells) + " |")
    lines += ["", "## Per question type", "", "| question type | n | accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {value['n']} | {value['accuracy']:.1%} |" for name, value in report["per_question_type"].items()]
    lines += ["", f"Answers that ran into `max_new_tokens`: {report['hit_max_new_tokens_rate']:.1%}"]
    if plot_name:
        lines += ["", f"![training and accuracy]({plot_name})"]
    return "\n".join(lines) + "\n"


def render_plots(report: dict[str, Any], log_history: list[dict[str, Any]], path: Path) -> None:
    """Left: training and validation loss by step. Right: accuracy per answer type against the baselines."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if train:
        loss_axis.plot(*zip(*train), label="training")
    if evaluation:
        loss_axis.plot(*zip(*evaluation), marker="o", label="validation")
    loss_axis.set(title="Loss", xlabel="step", ylabel="cross-entropy")
    loss_axis.legend()

    types = list(report["per_answer_type"])
    series = {"fine-tuned": [report["per_answer_type"][t]["accuracy"] for t in types]}
    for name, baseline in report["baselines"].items():
        series[name] = [baseline["per_answer_type"].get(t, {}).get("accuracy", 0.0) for t in types]
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        accuracy_axis.bar([i + offset * width for i in range(len(types))], values, width, label=name)
    accuracy_axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(types))], types)
    accuracy_axis.set(title=f"Accuracy per answer type (overall {report['accuracy']:.1%})", ylim=(0, 1))
    accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
