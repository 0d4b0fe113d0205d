import dagster as dg

from pipelines.partitions import drops_partitions

INGEST_ASSETS = ("raw_samples", "clean_samples")
TRAIN_ASSETS = ("base_model", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model")
# LoRA against full fine-tuning: train the full reference for the current adapter, then re-report and re-merge.
LORA_VS_FULL_ASSETS = ("full_finetune_reference", "evaluation_report", "merged_model")


def build_jobs(retries: int) -> tuple:
    """Per drop: ingest and clean. Then, over all drops: tokenize, train, evaluate, merge. And LoRA against full."""
    # Transient failures (a preempted GPU, a flaky filesystem) retry; a killed trainer resumes from its checkpoint.
    retry = dg.RetryPolicy(max_retries=retries, delay=5, backoff=dg.Backoff.EXPONENTIAL) if retries else None
    ingest = dg.define_asset_job(
        "ingest_drop", selection=dg.AssetSelection.assets(*INGEST_ASSETS), partitions_def=drops_partitions,
        executor_def=dg.in_process_executor, op_retry_policy=retry,
    )
    train = dg.define_asset_job(
        "train_and_ship", selection=dg.AssetSelection.assets(*TRAIN_ASSETS),
        executor_def=dg.in_process_executor, op_retry_policy=retry,
    )
    lora_vs_full = dg.define_asset_job(
        "lora_vs_full", selection=dg.AssetSelection.assets(*LORA_VS_FULL_ASSETS),
        executor_def=dg.in_process_executor, op_retry_policy=retry,
    )
    return ingest, train, lora_vs_full
