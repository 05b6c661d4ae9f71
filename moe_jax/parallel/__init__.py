"""The shard_map train step and the pipeline schedules."""
