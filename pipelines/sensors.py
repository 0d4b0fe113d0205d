import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg

from pipelines.partitions import drops_partitions
from resources import DropsResource
from vlmtune.drop_watch import WatchState, due_drops


def build_new_drops_sensor(job, status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=30, default_status=status)
    def new_drops(context: dg.SensorEvaluationContext, drops: DropsResource) -> dg.SensorResult:
        """Registers each complete new or changed drop as a partition and ingests that partition alone."""
        state = WatchState(**json.loads(context.cursor)) if context.cursor else WatchState()
        due, state = due_drops(Path(drops.root), state)
        known = set(context.instance.get_dynamic_partitions(drops_partitions.name))
        new_partitions = sorted(set(due) - known)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=drop, run_key=f"{drop}:{version}") for drop, version in due.items()],
            dynamic_partitions_requests=[drops_partitions.build_add_request(new_partitions)] if new_partitions else [],
            cursor=json.dumps(asdict(state)),
        )

    return new_drops
