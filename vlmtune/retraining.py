"""Whether the current adapter is behind the data: the logic behind scheduled retraining."""

from __future__ import annotations

from vlmtune.artifacts import ArtifactStore


def retraining_reason(store: ArtifactStore, drops: list[str]) -> str | None:
    """Why the adapter should be retrained (new or changed clean data since it was trained), or None."""
    cleaned = {drop: store.current("clean_samples", drop) for drop in drops}
    available = {drop: artifact.fingerprint for drop, artifact in cleaned.items() if artifact is not None}
    if not available:
        return None
    adapter = store.current("lora_adapter")
    if adapter is None:
        return "no adapter yet"
    trained_on = adapter.summary.get("inputs", {}).get("drop_versions", {})
    new = sorted(set(available) - set(trained_on))
    changed = sorted(drop for drop in set(available) & set(trained_on) if available[drop] != trained_on[drop])
    if not new and not changed:
        return None
    return "; ".join(part for part in (f"new drops {new}" if new else "", f"changed drops {changed}" if changed else "") if part)
