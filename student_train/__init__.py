"""student-train: train a student from teacher shards, with no teacher in the loop."""
