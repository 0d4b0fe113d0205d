"""The sensor-to-materialization path against a real PostgreSQL server started on loopback."""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from pipelines import definitions
from tests_support import free_port, write_drop

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql")


def postgres_binaries() -> Path | None:
    found = sorted(PG_BIN.glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture
def postgres():
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs Debian's postgresql)")
    # Outside pytest's private tmp folder: the server may run as another user, who must reach it.
    scratch = Path(tempfile.mkdtemp(prefix="vlmtune-pg-"))
    scratch.chmod(0o755)
    data = scratch / "data"
    data.mkdir()
    run_as = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, binaries / "initdb", "-D", data, "-U", "dagster", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [*run_as, binaries / "pg_ctl", "-D", data, "-w", "-l", data / "server.log", "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
        check=True, capture_output=True,
    )
    try:
        subprocess.run([*run_as, binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "dagster"], check=True, capture_output=True)
        yield port
    finally:
        subprocess.run([*run_as, binaries / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def test_sensor_to_materialization_on_postgres(postgres, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    for key, value in {"DAGSTER_HOME": str(home), "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "",
                       "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PORT": str(postgres),
                       "VQA_HOME": str(tmp_path / "artifacts"), "VQA_DATA_DIR": str(tmp_path / "data"),
                       "VQA_PROFILE": "smoke", "VQA_AUTOMATION": "off"}.items():
        monkeypatch.setenv(key, value)
    write_drop(tmp_path / "data" / "drops", "first", n=4, ready=True)

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        defs = definitions.build_definitions()
        result = defs.resolve_sensor_def("new_drops")(
            dg.build_sensor_context(instance=instance, resources={"drops": defs.resources["drops"]})
        )
        [request] = result.run_requests
        instance.add_dynamic_partitions("drops", result.dynamic_partitions_requests[0].partition_keys)
        run = dg.execute_job(dg.reconstructable(definitions.ingest_drop_job), instance, tags={"dagster/partition": request.partition_key})
        assert run.success
        event = instance.get_latest_materialization_event(dg.AssetKey("clean_samples"))
        assert event.asset_materialization.partition == "first"
        assert event.asset_materialization.metadata["n_kept"].value == 4
        assert instance.get_dynamic_partitions("drops") == ["first"]
