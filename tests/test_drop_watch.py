import dagster as dg

from tests_support import write_drop
from pipelines.definitions import build_definitions
from vlmtune.drop_watch import WatchState, due_drops


def test_a_drop_is_taken_once_it_stops_changing(tmp_path):
    (tmp_path / "uploading").mkdir()  # no annotation file yet: never due
    write_drop(tmp_path, "d1")
    due, state = due_drops(tmp_path, WatchState())
    assert due == {}, "first look: it may still be uploading"
    due, state = due_drops(tmp_path, state)
    assert list(due) == ["d1"], "unchanged between two looks: complete"
    due, state = due_drops(tmp_path, state)
    assert due == {}, "already ingested and unchanged: never again"


def test_a_ready_marker_skips_the_wait_and_a_changed_drop_is_due_again(tmp_path):
    write_drop(tmp_path, "d1", ready=True)
    due, state = due_drops(tmp_path, WatchState())
    assert list(due) == ["d1"]
    first_version = due["d1"]
    write_drop(tmp_path, "d1", n=3, ready=True)
    due, state = due_drops(tmp_path, state)
    assert list(due) == ["d1"] and due["d1"] != first_version


def test_sensor_registers_the_new_drop_and_requests_only_its_partition(tmp_path):
    drops_root = tmp_path / "data" / "drops"
    write_drop(drops_root, "old", ready=True)
    defs = build_definitions(profile="smoke", home=str(tmp_path / "art"), data_dir=str(tmp_path / "data"), automation=False)
    sensor = defs.resolve_sensor_def("new_drops")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("drops", ["old"])
        context = dg.build_sensor_context(instance=instance, resources={"drops": defs.resources["drops"]})
        first = sensor(context)
        assert [request.partition_key for request in first.run_requests] == ["old"]
        assert first.dynamic_partitions_requests == [], "old is already a partition"

        write_drop(drops_root, "new", ready=True)
        context = dg.build_sensor_context(instance=instance, cursor=first.cursor, resources={"drops": defs.resources["drops"]})
        second = sensor(context)
        assert [request.partition_key for request in second.run_requests] == ["new"]
        assert second.dynamic_partitions_requests[0].partition_keys == ["new"]
        assert second.run_requests[0].run_key.startswith("new:")
