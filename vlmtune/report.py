"""The evaluation report as Markdown and a PNG: what a reviewer reads before promoting an adapter."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

FULL_FINETUNE_CLAIM = 0.95  # the source recipe's claim: LoRA at rank 8 reaches >= 95 % of full fine-tuning
_LABELS = {
    "majority": "majority answer",
    "blind": "blind (question only)",
    "base_model": "base model, before fine-tuning",
    "image_shuffle": "this adapter, images shuffled",
    "previous_adapter": "previous adapter version",
    "full_finetune": "full fine-tuning, same data / steps / seed",
}


def render_markdown(report: dict[str, Any], plot_name: str | None = None, thumbnails_dir: str | None = None) -> str:
    baselines = report["baselines"]
    accuracy = report["accuracy"]
    lines = [
        "# Evaluation report",
        "",
        f"Test questions: **{report['n']}** · metric: {report['metric']}",
        "",
        "| model | accuracy | 95 % CI | fine-tuned − model | its 95 % CI (paired) |",
        "|---|---|---|---|---|",
        f"| **fine-tuned (this adapter)** | **{accuracy:.1%}** | {_interval(report['ci95'])} | | |",
        *(
            f"| {_LABELS.get(name, name)} | {value['accuracy']:.1%} | {_interval(value['ci95'])} | "
            f"{accuracy - value['accuracy']:+.1%} | {_interval(value['difference_ci95'], signed=True)} |"
            for name, value in baselines.items()
        ),
        "",
        *_findings(report),
        "",
        "## Per answer type",
        "",
        "| answer type | n | fine-tuned | " + " | ".join(baselines) + " |",
        "|---|---|---|" + "---|" * len(baselines),
    ]
    for name, value in report["per_answer_type"].items():
        cells = [f"{_type_accuracy(baselines[b], name):.1%}" for b in baselines]
        lines.append(f"| {name} | {value['n']} | {value['accuracy']:.1%} | " + " | ".join(cells) + " |")
    lines += ["", "## Per question type", "", "| question type | n | accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {value['n']} | {value['accuracy']:.1%} |" for name, value in report["per_question_type"].items()]
    for kind, table in report.get("confusion", {}).items():
        columns = list(next(iter(table.values())))
        lines += ["", f"## Confusion: {kind} (rows: reference, columns: prediction)", ""]
        lines += ["| reference | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {answer} | " + " | ".join(str(row[c]) for c in columns) + " |" for answer, row in table.items()]
    if report.get("worst_examples"):
        lines += ["", f"## The {len(report['worst_examples'])} worst-answered questions", "",
                  "Wrong answers, the most confidently wrong first (highest loss on the reference answer).", "",
                  "| image | question | reference | prediction | answer loss |", "|---|---|---|---|---|"]
        for example in report["worst_examples"]:
            image = f"![{example['sample_id']}]({example['thumbnail']})" if thumbnails_dir else example["sample_id"]
            lines.append(f"| {image} | {_cell(example['question'])} | {_cell(example['answer'])} | "
                         f"{_cell(example['prediction']) or '(empty)'} | {example['answer_loss']:.2f} |")
    lines += ["", f"Answers that ran into `max_new_tokens`: {report['hit_max_new_tokens_rate']:.1%} · "
              f"generation: {report['questions_per_second']:.1f} questions/s"]
    if plot_name:
        lines += ["", f"![loss, accuracy per answer type, this version against the previous]({plot_name})"]
    return "\n".join(lines) + "\n"


def _findings(report: dict[str, Any]) -> list[str]:
    """One sentence per question a reviewer asks: does it use the image, beat the last version, match full FT?"""
    baselines, accuracy = report["baselines"], report["accuracy"]
    findings = []
    if "image_shuffle" in baselines:
        drop, (low, high) = report["image_shuffle_drop"], report["image_shuffle_drop_ci95"]
        verdict = "the model uses the image" if low > 0 else "**no evidence at this sample size that the model uses the image**"
        findings.append(f"- Image shuffle: accuracy drops by {drop:.1%} (95 % CI {low:+.1%} to {high:+.1%}) when each question "
                        f"gets another sample's image: {verdict}.")
    if "previous_adapter" in baselines:
        findings.append(f"- Previous adapter version: {baselines['previous_adapter']['accuracy']:.1%} → "
                        f"{accuracy:.1%} ({accuracy - baselines['previous_adapter']['accuracy']:+.1%}).")
    else:
        findings.append(f"- Previous adapter version: none to compare with ({report['previous_adapter'].get('absent', 'absent')}).")
    ratio = report.get("lora_to_full_ratio")
    if ratio is not None:
        met = "meets" if ratio >= FULL_FINETUNE_CLAIM else "**falls short of**"
        full = report.get("full_finetune_config") or {}
        findings.append(f"- LoRA reached **{ratio:.1%}** of full fine-tuning accuracy (full: {full.get('max_steps')} steps, "
                        f"learning rate {full.get('learning_rate')}); this {met} the recipe's claim of ≥ {FULL_FINETUNE_CLAIM:.0%} at rank 8.")
    else:
        findings.append("- LoRA against full fine-tuning: not measured in this report (materialize `full_finetune_reference`).")
    return findings


def with_inline_images(markdown: str, folder: Path) -> str:
    """The report's Markdown with each relative `.png` link replaced by its data URI, so it renders where
    the files are not reachable (the Dagster UI's metadata panel)."""
    def inline(match: re.Match) -> str:
        return f"](data:image/png;base64,{base64.b64encode((Path(folder) / match[1]).read_bytes()).decode()})"

    return re.sub(r"\]\(([\w/.-]+\.png)\)", inline, markdown)


def render_plots(report: dict[str, Any], log_history: list[dict[str, Any]], path: Path) -> None:
    """Loss by step; accuracy per answer type against the baselines; this version against the previous one."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    figure, (loss_axis, baseline_axis, previous_axis) = plt.subplots(1, 3, figsize=(16, 4.2))
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
    series |= {name: [_type_accuracy(value, t) for t in types] for name, value in report["baselines"].items() if name != "previous_adapter"}
    _bars(baseline_axis, types, series, f"Accuracy per answer type (overall {report['accuracy']:.1%})")

    previous = report["baselines"].get("previous_adapter")
    if previous:
        _bars(previous_axis, ["overall", *types], {
            "previous version": [previous["accuracy"], *(_type_accuracy(previous, t) for t in types)],
            "this version": [report["accuracy"], *series["fine-tuned"]],
        }, "This version against the previous one")
    else:
        previous_axis.axis("off")
        previous_axis.text(0.5, 0.5, "No previous adapter version\n" + report["previous_adapter"].get("absent", ""), ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _bars(axis, groups: list[str], series: dict[str, list[float]], title: str) -> None:
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        axis.bar([i + offset * width for i in range(len(groups))], values, width, label=name)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    axis.set(title=title, ylim=(0, 1))
    axis.legend(fontsize="small")


def _type_accuracy(result: dict[str, Any], answer_type: str) -> float:
    return result["per_answer_type"].get(answer_type, {}).get("accuracy", float("nan"))


def _interval(ci: list[float], signed: bool = False) -> str:
    return f"{ci[0]:+.1%} to {ci[1]:+.1%}" if signed else f"{ci[0]:.1%} – {ci[1]:.1%}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
