"""Whether an evaluated adapter may be shipped (merged): the rules behind the blocking check."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmtune.config import EvalConfig


def gate_config(saved: dict[str, Any]) -> EvalConfig:
    """The evaluation config a report was made under (its manifest's `config`), so the gate judges by the report's own rules."""
    names = {field.name for field in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{key: value for key, value in saved.items() if key in names})


def promotion_problems(summary: dict[str, Any], config: EvalConfig) -> list[str]:
    """Every reason not to ship the adapter this evaluation summary describes; empty means ship it.

    With `config.gate == "interval"` the comparisons use the paired 95 % interval on the adapter's
    lead over each baseline: it must beat blind with the whole interval above zero, and it is a
    regression unless the interval's low end stays above -max_regression. Summaries written before
    the intervals were kept fall back to the point estimates.
    """
    problems = []
    accuracy, baselines = summary["accuracy"], summary["baselines"]
    leads = summary.get("lead_ci95", {}) if config.gate == "interval" else {}
    if "blind" in leads:
        low = leads["blind"][0]
        if not low > 0:
            problems.append(
                f"accuracy {accuracy:.1%} does not beat the blind (question-only) baseline {baselines['blind']:.1%} "
                f"with 95 % confidence (paired interval on the lead starts at {low:+.1%})"
            )
    elif not accuracy > baselines["blind"]:
        problems.append(f"accuracy {accuracy:.1%} does not beat the blind (question-only) baseline {baselines['blind']:.1%}")
    previous = baselines.get("previous_adapter")
    if previous is not None and "previous_adapter" in leads:
        low = leads["previous_adapter"][0]
        if low < -config.max_regression:
            problems.append(
                f"accuracy {accuracy:.1%} against the previous adapter's {previous:.1%}: the paired 95 % interval on the "
                f"difference reaches {low:+.1%}, beyond the {config.max_regression:.1%} allowed"
            )
    elif previous is not None and accuracy < previous - config.max_regression:
        problems.append(f"accuracy {accuracy:.1%} is more than {config.max_regression:.1%} below the previous adapter's {previous:.1%}")
    unfinished = summary["hit_max_new_tokens_rate"]
    if unfinished > config.max_unfinished_rate:
        problems.append(f"{unfinished:.1%} of answers ran into max_new_tokens without stopping (limit {config.max_unfinished_rate:.1%})")
    return problems
