"""Code common to teacher-dump, student-train and kd-eval: tasks, the engine, tokenizers."""
