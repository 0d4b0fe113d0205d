"""Lineage in the live UI: `dagster dev` (webserver + daemon) on loopback, runs launched and read back over GraphQL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests_support import free_port
from vlmtune.config import profile_config
from vlmtune.easyvqa import write_demo_drops

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["raw_samples", "clean_samples", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model"]
CHECKS = {"clean_counts_conserved", "tokenized_dataset_sound", "ready_to_ship", "merged_matches_adapter"}


class Dagit:
    def __init__(self, url: str):
        self.url = url

    def query(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        assert "errors" not in payload, payload["errors"]
        return payload["data"]

    def launch(self, job: str, tags: dict[str, str] | None = None) -> str:
        data = self.query(
            """mutation($params: ExecutionParams!) { launchPipelineExecution(executionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            {"params": {"selector": {"repositoryLocationName": "vlmtune", "repositoryName": "__repository__", "pipelineName": job},
                        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}}},
        )["launchPipelineExecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def wait(self, run_id: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.query("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(2)
        raise TimeoutError(f"run {run_id} still {status}")


@pytest.fixture(scope="module")
def live_ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    env = {**os.environ, "DAGSTER_HOME": str(root / ".dagster"), "VQA_HOME": str(root / "artifacts"),
           "VQA_DATA_DIR": str(root / "data"), "VQA_PROFILE": "smoke", "VQA_AUTOMATION": "off"}
    (root / ".dagster").mkdir()
    (root / ".dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    log = open(root / "dagster-dev.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    ui = Dagit(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 240
        while True:
            try:
                if ui.query("{ version }"):
                    break
            except (OSError, AssertionError):
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError((root / "dagster-dev.log").read_text()[-3000:])
                time.sleep(2)
        config = profile_config("smoke")
        drops = write_demo_drops(root / "data" / "drops", config.demo_data.max_finetune_samples, config.demo_data.max_test_samples)
        for drop in drops:
            added = ui.query(
                """mutation($key: String!) { addDynamicPartition(repositorySelector: {repositoryLocationName: "vlmtune", repositoryName: "__repository__"},
                     partitionsDefName: "drops", partitionKey: $key) { __typename } }""", {"key": drop.name})
            assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", added
            assert ui.wait(ui.launch("ingest_drop", {"dagster/partition": drop.name})) == "SUCCESS"
        assert ui.wait(ui.launch("train_and_ship")) == "SUCCESS", (root / "dagster-dev.log").read_text()[-3000:]
        yield ui, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        # a run still going when the test failed outlives the server (its process and trainer are the
        # run launcher's, in their own sessions): stop everything that works on this instance
        for pid in processes_with_env("DAGSTER_HOME", env["DAGSTER_HOME"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended by itself meanwhile
        log.close()


def processes_with_env(name: str, value: str) -> list[int]:
    wanted = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if wanted in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_graphql_shows_the_six_stages_their_edges_paths_and_checks(live_ui):
    ui, root = live_ui
    nodes = ui.query(
        """{ assetNodes { assetKey { path } dependencyKeys { path }
             assetMaterializations(limit: 1) { metadataEntries { label ... on PathMetadataEntry { path } } }
             assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status evaluation { success } } } } } } }"""
    )["assetNodes"]
    by_key = {"/".join(node["assetKey"]["path"]): node for node in nodes}
    assert set(STAGES) <= set(by_key)
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        assert [upstream] in [dep["path"] for dep in by_key[downstream]["dependencyKeys"]], (upstream, downstream)
    for stage in STAGES:
        [latest] = by_key[stage]["assetMaterializations"]
        paths = [entry["path"] for entry in latest["metadataEntries"] if entry["label"] == "path"]
        assert paths and Path(paths[0]).is_dir() and Path(paths[0]).is_relative_to(root), stage
    results = {check["name"]: check["executionForLatestMaterialization"]
               for node in nodes for check in node.get("assetChecksOrError", {}).get("checks", [])}
    assert CHECKS <= set(results)
    for name in CHECKS:
        assert results[name]["evaluation"]["success"] is True, (name, results[name])


def test_lineage_page_renders(live_ui):
    ui, root = live_ui
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed and could not be installed (.ci/run installs Debian's chromium)")
    shot = root / "lineage.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={root / 'chromium'}", "--window-size=1600,1000", "--virtual-time-budget=20000",
         f"--screenshot={shot}", f"{ui.url}/asset-groups"],
        check=True, timeout=120, capture_output=True,
    )
    artifacts_dir = Path(os.environ.get("VQA_TEST_ARTIFACTS", ROOT / ".pytest-artifacts"))
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artifacts_dir / "lineage.png")
    image = Image.open(shot).convert("L")
    assert image.size == (1600, 1000)
    colours = len(set(image.getdata()))
    assert colours > 20 and ImageStat.Stat(image).stddev[0] > 5, "the page rendered blank"
