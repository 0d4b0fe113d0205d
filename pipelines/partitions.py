import dagster as dg

# One partition per data drop; drops are registered as they arrive (sensor, `vlmtune ingest`, `vlmtune demo`).
drops_partitions = dg.DynamicPartitionsDefinition(name="drops")
