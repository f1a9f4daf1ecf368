"""kd-eval: teacher, baselines and distilled students scored side by side on one task."""
