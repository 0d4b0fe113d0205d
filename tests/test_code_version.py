"""Stage code versions come from the code: an edit rebuilds the stages that run the edited code.

Each scenario copies the project, edits one module of the copy, and reads every asset's
`code_version` from the copy's Dagster definitions in a fresh interpreter, as the webserver would.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("vlmtune", "assets", "pipelines", "resources")
ASSETS = ("raw_samples", "clean_samples", "base_model", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model")
READ_VERSIONS = (
    "import json; from pipelines.definitions import defs; "
    "print(json.dumps({spec.key.to_user_string(): spec.code_version for spec in defs.resolve_all_asset_specs()}))"
)


def code_versions(root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "DAGSTER_HOME": str(root / ".dagster-home")}
    (root / ".dagster-home").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", READ_VERSIONS], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    copy = tmp_path_factory.mktemp("original")
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy, code_versions(copy)


def edited(original: tuple[Path, dict[str, str]], tmp_path: Path, module: str, old: str, new: str) -> set[str]:
    """The assets whose code version differs after replacing `old` with `new` in `module` of a copy."""
    source, before = original
    copy = tmp_path / "edited"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__", ".dagster-home"))
    path = copy / module
    text = path.read_text()
    assert old in text, f"{old!r} is not in {module}"
    path.write_text(text.replace(old, new, 1))
    after = code_versions(copy)
    assert set(after) == set(before)
    return {key for key in before if before[key] != after[key]}


def test_every_stage_has_a_derived_code_version(original):
    _, versions = original
    assert set(ASSETS) <= set(versions)
    assert all(len(versions[name]) == 16 for name in ASSETS)
    assert len({versions[name] for name in ASSETS}) == len(ASSETS)  # each stage hashes its own code


def test_a_metric_change_rebuilds_only_the_evaluation_and_what_runs_its_code(original, tmp_path):
    # vlmtune.metrics is used by the evaluation alone (and by the merge, which loads the adapter through vlmtune.evaluate)
    changed = edited(original, tmp_path, "vlmtune/metrics.py", "def ", "def _unused_helper():\n    return 0\n\n\ndef ")
    assert "evaluation_report" in changed
    assert changed <= {"evaluation_report", "merged_model"}


def test_a_tokenization_change_rebuilds_tokenization_and_training_but_not_cleaning(original, tmp_path):
    changed = edited(original, tmp_path, "vlmtune/tokenization.py", "def ", "def _unused_helper():\n    return 0\n\n\ndef ")
    assert {"tokenized_dataset", "lora_adapter"} <= changed
    assert not changed & {"raw_samples", "clean_samples"}


def test_a_training_change_rebuilds_training_and_downstream_but_no_data_stage(original, tmp_path):
    changed = edited(original, tmp_path, "vlmtune/train.py", "def ", "def _unused_helper():\n    return 0\n\n\ndef ")
    assert "lora_adapter" in changed
    assert not changed & {"raw_samples", "clean_samples", "tokenized_dataset"}


def test_a_comment_or_a_blank_line_rebuilds_nothing(original, tmp_path):
    assert edited(original, tmp_path, "vlmtune/train.py", "\nimport ", "\n# a reworded comment\n\nimport ") == set()


def test_a_library_upgrade_counts_for_the_stages_that_name_it(monkeypatch):
    from vlmtune import code_version
    from vlmtune.code_version import stage_code_version

    before = stage_code_version(["vlmtune.metrics"], ["transformers"]), stage_code_version(["vlmtune.metrics"], ["pyarrow"])
    real = code_version.library_version
    monkeypatch.setattr(code_version, "library_version", lambda name: "99.0" if name == "transformers" else real(name))
    after = stage_code_version(["vlmtune.metrics"], ["transformers"]), stage_code_version(["vlmtune.metrics"], ["pyarrow"])
    assert before[0] != after[0] and before[1] == after[1]
    with pytest.raises(ModuleNotFoundError, match="no source"):
        stage_code_version(["vlmtune.no_such_module"])
