import dagster as dg

from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource
from vlmtune.retraining import retraining_reason


def build_retraining_schedule(job, cron: str, status: dg.DefaultScheduleStatus) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule=cron, default_status=status)
    def retrain_on_new_data(context: dg.ScheduleEvaluationContext, artifacts: ArtifactStoreResource):
        """Retrains, evaluates and merges when clean data arrived since the current adapter; otherwise skips."""
        reason = retraining_reason(artifacts.store(), list(context.instance.get_dynamic_partitions(drops_partitions.name)))
        if reason is None:
            return dg.SkipReason("no new or changed clean data since the current adapter")
        return dg.RunRequest(tags={"vlmtune/retrain_reason": reason[:200]})

    return retrain_on_new_data
