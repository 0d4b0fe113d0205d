import dagster as dg

from pipelines.partitions import drops_partitions

# Per drop: everything that can run before all drops are combined.
ingest_job = dg.define_asset_job(
    "ingest_drop", selection=dg.AssetSelection.assets("raw_samples", "clean_samples"), partitions_def=drops_partitions
)
# Everything downstream of the combined data: tokenize, train, evaluate, merge.
train_job = dg.define_asset_job(
    "train_and_ship",
    selection=dg.AssetSelection.assets("base_model", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model"),
)
# LoRA against full fine-tuning: train the full reference for the current adapter, then re-report and re-merge.
lora_vs_full_job = dg.define_asset_job(
    "lora_vs_full", selection=dg.AssetSelection.assets("full_finetune_reference", "evaluation_report", "merged_model")
)
