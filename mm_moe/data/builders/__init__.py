"""Shard builders: the logic behind the runnable jobs in data_pipelines/."""
