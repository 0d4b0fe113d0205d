import json

import pytest

from vlmtune.artifacts import ArtifactStore, fingerprint


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_build_is_cached_by_fingerprint(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(out):
        calls.append(out)
        (out / "data.txt").write_text("v1")
        return {"n": 1}

    first = store.build("stage", "fp1", build)
    second = store.build("stage", "fp1", build)
    assert len(calls) == 1 and not first.cached and second.cached
    assert second.summary["n"] == 1 and (second.path / "data.txt").read_text() == "v1"
    assert store.current("stage").fingerprint == "fp1"


def test_a_failed_build_leaves_the_previous_version_current_and_no_partial_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    store.build("stage", "fp1", lambda out: (out / "x").write_text("ok") and {})

    def crash(out):
        (out / "half-written").write_text("...")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.build("stage", "fp2", crash)
    assert store.current("stage").fingerprint == "fp1"
    assert store.find("stage", "fp2") is None
    assert sorted(p.name for p in (tmp_path / "stage" / "_all").iterdir()) == ["CURRENT", "fp1"]


def test_require_current_names_the_missing_asset(tmp_path):
    with pytest.raises(FileNotFoundError, match="lora_adapter"):
        ArtifactStore(tmp_path).require_current("lora_adapter")


def test_every_manifest_records_code_and_library_versions(tmp_path):
    artifact = ArtifactStore(tmp_path).build("stage", "fp", lambda out: {}, manifest={"config": {"lr": 0.1}})
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["config"] == {"lr": 0.1} and manifest["fingerprint"] == "fp"
    assert manifest["libraries"]["torch"] and manifest["libraries"]["transformers"]
    assert "git_commit" in manifest and manifest["python"]
