"""One Dagster asset per pipeline stage; each is a thin wrapper over a `vlmtune` function."""
