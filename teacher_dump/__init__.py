"""teacher-dump: run a teacher in vLLM once and store its top-k logprobs as Parquet shards (the
expensive half; the only writer of the shard contract in schemas/)."""
