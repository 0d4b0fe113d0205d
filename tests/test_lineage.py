"""A step reads the upstream version its lineage records: its own run's, or the latest Dagster has; never a moved pointer.

Two small assets on the real artifact store and a real Dagster instance: `numbers` writes a version
chosen by its config, `total` reads it through `assets.upstream.upstream`. Another run's
materialization is made to land in the middle of `total`'s step (a nested run on the same
instance), which is how two `train_and_ship` runs interleave on the `gpu` pool.
"""

import json
import os

import dagster as dg
import pytest

from assets.upstream import upstream
from vlmtune.artifacts import ArtifactStore, fingerprint


class NumbersConfig(dg.Config):
    value: int = 1


class TotalConfig(dg.Config):
    interleave_value: int | None = None  # another run materializes `numbers` with this value mid-step
    fail: bool = False


def _store() -> ArtifactStore:
    return ArtifactStore(os.environ["LINEAGE_TEST_STORE"])


@dg.asset
def numbers(config: NumbersConfig) -> dg.MaterializeResult:
    store = _store()
    version = fingerprint("numbers", config.value)
    artifact = store.build("numbers", version, lambda out: {"value": config.value})
    return dg.MaterializeResult(metadata={"fingerprint": artifact.fingerprint}, data_version=dg.DataVersion(artifact.fingerprint))


@dg.asset(deps=[numbers])
def total(context: dg.AssetExecutionContext, config: TotalConfig) -> dg.MaterializeResult:
    if config.interleave_value is not None:
        other = dg.materialize([numbers], instance=context.instance, run_config={"ops": {"numbers": {"config": {"value": config.interleave_value}}}})
        assert other.success
    if config.fail:
        raise RuntimeError("failing on purpose, to be re-executed")
    read = upstream(context, _store(), "numbers")
    return dg.MaterializeResult(metadata={"fingerprint": read.fingerprint, "read_value": read.summary["value"]})


both = dg.define_asset_job("both", selection=[numbers, total], executor_def=dg.in_process_executor)


def _job():
    return dg.Definitions(assets=[numbers, total], jobs=[both]).resolve_job_def("both")


def _config(value=1, interleave_value=None, fail=False) -> dict:
    return {"ops": {"numbers": {"config": {"value": value}}, "total": {"config": {"interleave_value": interleave_value, "fail": fail}}}}


def _recorded_input(instance) -> str:
    return instance.get_latest_materialization_event(dg.AssetKey("total")).asset_materialization.tags["dagster/input_data_version/numbers"]


def _failure(result) -> str:
    return " ".join(event.step_failure_data.error.to_string() for event in result.all_events if event.is_step_failure)


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEAGE_TEST_STORE", str(tmp_path / "store"))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield instance


def test_a_step_reads_what_its_own_run_materialized_and_dagster_records_it(instance):
    assert dg.execute_job(dg.reconstructable(_job), instance, run_config=_config(value=1)).success
    read = instance.get_latest_materialization_event(dg.AssetKey("total")).asset_materialization.metadata
    assert read["read_value"].value == 1 and read["fingerprint"].value == _recorded_input(instance) == fingerprint("numbers", 1)
    # `total` alone: the latest materialization Dagster has, which it also records as the input
    assert dg.materialize([numbers, total], instance=instance, selection=["total"]).success
    assert instance.get_latest_materialization_event(dg.AssetKey("total")).asset_materialization.metadata["read_value"].value == 1


def test_a_version_superseded_by_an_interleaved_run_is_refused_not_read_silently(instance):
    result = dg.execute_job(dg.reconstructable(_job), instance, run_config=_config(value=2, interleave_value=3), raise_on_error=False)
    assert not result.success
    assert "was superseded by" in _failure(result) and fingerprint("numbers", 3) in _failure(result)
    assert instance.get_latest_materialization_event(dg.AssetKey("total")) is None  # nothing recorded with a false input


def test_a_reexecution_from_failure_reads_the_parent_runs_version(instance):
    failed = dg.execute_job(dg.reconstructable(_job), instance, run_config=_config(value=4, fail=True), raise_on_error=False)
    assert not failed.success
    # the re-execution runs only `total`, whose upstream was materialized by the failed parent run
    retried = dg.execute_job(
        dg.reconstructable(_job), instance, run_config=_config(value=4), reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance)
    )
    assert retried.success
    steps = {event.step_key for event in retried.all_events if event.is_step_success}
    assert steps == {"total"}
    metadata = instance.get_latest_materialization_event(dg.AssetKey("total")).asset_materialization.metadata
    assert metadata["read_value"].value == 4 and _recorded_input(instance) == fingerprint("numbers", 4)


def test_a_reexecution_after_another_run_moved_on_is_refused(instance):
    failed = dg.execute_job(dg.reconstructable(_job), instance, run_config=_config(value=5, fail=True), raise_on_error=False)
    assert dg.materialize([numbers], instance=instance, run_config={"ops": {"numbers": {"config": {"value": 6}}}}).success
    retried = dg.execute_job(
        dg.reconstructable(_job), instance, run_config=_config(value=5),
        reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance), raise_on_error=False,
    )
    assert not retried.success and "was superseded by" in _failure(retried)
    assert json.dumps(fingerprint("numbers", 6))[1:-1] in _failure(retried)
