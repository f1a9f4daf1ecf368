"""The contract between teacher-dump and its readers: the shard schema (shard.py) and the
manifest (manifest.py). Nothing else lives here."""
