"""`make bench` (work in progress, issue 6): ratios measured side by side in one run.

Implemented so far, each measured in fresh subprocesses so peak RSS is per configuration:
- training overhead: KD step time / CE step time on the same student and batch, and their peak
  RSS; chunked vs unchunked loss peak RSS at a long sequence;
- loader headroom: target tokens/s the shard loader delivers alone / tokens/s a KD step consumes;
  loader peak RSS on the dump and on a 10x copy of it.
Still to do: storage at k=20/64, dump overhead against a bare vLLM loop, offline vs online KD.

Every figure is the median of `repeats` measurements with their spread (min-max); nothing is
copied from an earlier run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_megabytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_steps(shards: str, student: str, loss: str, steps: int, micro_batch: int) -> dict:
    """Time `steps` optimizer steps (after one warm-up) on one fixed batch; report peak RSS."""
    import torch

    from student_train.batches import collate, take_micro_batch
    from student_train.shard_stream import ShardStream, open_dump
    from student_train.student import load_student, output_logits_function
    from student_train.train import batch_loss_sums

    dump = open_dump(shards)
    student_model = load_student(student, manifest=dump.manifest, trust_remote_code=False)
    stream = ShardStream(dump, seed=0, shuffle=False)
    batch = collate(
        take_micro_batch(stream, rows=micro_batch, batch_tokens=None, max_length=1 << 30)
    )
    model = student_model.model
    output_logits = output_logits_function(model, student_model.vocabulary)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    class Settings:  # the fields batch_loss_sums reads
        bf16 = False
        chunk_tokens = 512

    class Context:
        device = torch.device("cpu")

    options = {"loss": loss, "alpha": 0.0, "beta": 0.5, "temperature": 1.0, "tail": "bucket"}
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        sums = batch_loss_sums(model, batch, output_logits, Settings, options, Context)
        (sums[0] / batch.target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:
            times.append(time.perf_counter() - started)
    return {
        "seconds_per_step": statistics.median(times),
        "tokens_per_step": batch.target_tokens,
        "peak_rss_mb": peak_rss_megabytes(),
    }


def measure_loss_memory(positions: int, vocabulary: int, chunk_tokens: int) -> dict:
    """Peak RSS of one forward+backward of the KD loss over `positions` x `vocabulary` logits."""
    import torch

    from student_train.losses import chunked_loss_sums

    torch.manual_seed(0)
    hidden = torch.randn(positions, 64, requires_grad=True)
    head = torch.nn.Linear(64, vocabulary, bias=False)
    ids = torch.randint(0, vocabulary, (positions, 20))
    logprobs = torch.log_softmax(torch.randn(positions, 20), -1).sort(-1, descending=True).values
    baseline = peak_rss_megabytes()
    sums = chunked_loss_sums(
        hidden, head, ids[:, 0], ids, logprobs, chunk_tokens=chunk_tokens,
        loss="fkl", alpha=0.0, beta=0.5, temperature=1.0, tail="bucket",
    )  # fmt: skip
    sums[0].backward()
    return {"peak_rss_mb": peak_rss_megabytes(), "baseline_rss_mb": baseline}


def measure_loader(shards: str, micro_batch: int) -> dict:
    """Target tokens/s the loader (read, shuffle, collate) delivers over one epoch; peak RSS."""
    from student_train.batches import collate, take_micro_batch
    from student_train.shard_stream import ShardStream, open_dump

    dump = open_dump(shards)
    stream = ShardStream(dump, seed=0, epochs=1)
    tokens = 0
    started = time.perf_counter()
    while rows := take_micro_batch(stream, rows=micro_batch, batch_tokens=None, max_length=1 << 30):
        tokens += collate(rows).target_tokens
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "peak_rss_mb": peak_rss_megabytes(),
    }


def replicate_dump(source: Path, copies: int, out: Path) -> Path:
    """A dump holding `copies` hard-linked copies of every shard of `source` (a bigger dataset
    with the same content, to check that loader memory does not grow with the data)."""
    manifest = json.loads((source / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for copy in range(copies):
        for entry in manifest["shards"]:
            name = f"copy{copy:03d}-{entry['name']}"
            target = out / name
            if not target.exists():
                try:
                    os.link(source / entry["name"], target)
                except OSError:
                    shutil.copy2(source / entry["name"], target)
            entries.append({**entry, "name": name})
    manifest["shards"] = entries
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


WORKERS = {"steps": measure_steps, "loss-memory": measure_loss_memory, "loader": measure_loader}


def in_subprocess(worker: str, **arguments) -> dict:
    """Run one measurement in a fresh Python process (its own peak RSS); return its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "shared.benchmarks", "--worker", worker, json.dumps(arguments)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {worker} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_and_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](**json.loads(sys.argv[3]))))
    else:
        print(
            "make bench: the full benchmark table is not implemented yet (issue 6)", file=sys.stderr
        )
        sys.exit(1)
