"""How fast `essaim data prepare` runs per task, whether its memory stays flat as the input grows, and what a
full-size corpus would take on a cluster.

Usage: python benchmarks/prepare_throughput.py [--megabytes 20 --scales 1,10,30 --tasks 1,2]

For each scale, writes a synthetic multilingual corpus (model.synthetic_corpus: JSONL and
Parquet in 10 MB parts, a directory of text files, with planted duplicates and defects) of
MEGABYTES x scale, then prepares it with each number of tasks (datatrove's local executor),
in a fresh process, and prints: seconds, input MB/s in all and per task, the CPU time of the
whole process tree and input MB per CPU second, the time of each stage, and peak resident
memory of the whole process tree (sampled every 0.1 s) and of its largest process, in all
and in each stage. Run it on an idle machine.

Then a projection for 3 trillion tokens on 100 nodes, from the one-task runs: the stages that
run one task per input share (filter, signatures, dedup, encode) scale with the nodes; of the
single-task stages, MinHash clusters and the manifest are extrapolated by their marginal cost
per token between the smallest and largest runs, and the tokenizer stage, which trains on a
sample of at most [corpus] tokenizer_chars, by its time at the largest run scaled up to that
sample (training time taken as linear in its text).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.synthetic_corpus import write_synthetic_corpus  # noqa: E402

SERIAL_STAGES = ("minhash-clusters", "tokenizer", "manifest")  # one task, whatever the cluster
LINEAR_STAGES = ("minhash-clusters", "manifest")  # single-task stages whose work grows with the corpus
TARGET_TOKENS = 3e12
NODES, TASKS_PER_NODE = 100, 64  # the projection's cluster: 100 nodes of 64 cores, a task per core

# Runs in a child process so that its memory is prepare's alone.
_CHILD = r"""
import json, sys, time
from model.corpus import ExecutorSettings, prepare_corpus
from model.corpus_config import load_corpus_config

marks = [("start", time.perf_counter())]
corpus = load_corpus_config(sys.argv[1])
if sys.argv[3] == "without-dedup":
    corpus.dedup.exact, corpus.dedup.near_threshold = False, 0.0
def log(step):
    marks.append((step.split(":")[0], time.perf_counter()))
    with open(sys.argv[5], "w") as stage:  # the parent attributes its memory samples to this stage
        stage.write(marks[-1][0])
manifest, report = prepare_corpus(corpus, sys.argv[2], executor=ExecutorSettings(tasks=int(sys.argv[4])), log=log)
marks.append(("done", time.perf_counter()))
stages = {step: until - at for (step, at), (_, until) in zip(marks[1:], marks[2:])}
print(json.dumps({
    "seconds": marks[-1][1] - marks[0][1], "stages": stages,
    "tokens": sum(s.tokens for s in manifest.shards) + sum(s.tokens for s in manifest.heldout),
    "shards": len(manifest.shards),
    "documents": sum(c.records for c in report.sources.values()),
    "kept": sum(c.kept_documents for c in report.sources.values()),
    "kept_chars": sum(c.kept_chars for c in report.sources.values()),
    "tokenizer_chars": corpus.settings.tokenizer_chars,
}))
"""


def tree_rss_mb(root: int) -> tuple[float, float]:
    """(sum, largest) resident MB of a process and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"]), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    sizes = [rss.get(pid, 0.0) for pid in tree]
    return sum(sizes), max(sizes)


def input_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run(config: Path, out: Path, tasks: int, dedup: bool) -> dict:
    mode = "with-dedup" if dedup else "without-dedup"
    stage_file = out.with_name(out.name + ".stage")
    cpu_before = children_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(config), str(out), mode, str(tasks), str(stage_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak_sum = peak_one = 0.0
    stage_peaks: dict[str, float] = {}
    while child.poll() is None:
        total, largest = tree_rss_mb(child.pid)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        stage = stage_file.read_text() if stage_file.exists() else "start"
        stage_peaks[stage] = max(stage_peaks.get(stage, 0.0), largest)
        time.sleep(0.1)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"prepare failed:\n{stderr[-3000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures.update(tasks=tasks, peak_tree_mb=peak_sum, peak_process_mb=peak_one, stage_peak_mb=stage_peaks,
                   cpu_seconds=children_cpu_seconds() - cpu_before)
    return figures


def children_cpu_seconds() -> float:
    """CPU time (user and system) of this process's ended descendants: each waited for its own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def projection(small: dict, large: dict) -> dict:
    """Hours for TARGET_TOKENS on NODES x TASKS_PER_NODE tasks, from one-task runs at two scales.

    The split stages scale with the input (their rate is the large run's). Clusters and manifest
    cost what they cost at the small scale plus their marginal cost per token between the two;
    the tokenizer stage what it cost at the large scale, scaled up to a full sample if that run's
    text was less than one.
    """
    def stages(run: dict, names: tuple[str, ...]) -> float:
        return sum(run["stages"].get(stage, 0.0) for stage in names)

    parallel = large["seconds"] - stages(large, SERIAL_STAGES)
    per_token = max(stages(large, LINEAR_STAGES) - stages(small, LINEAR_STAGES), 0.0) / max(
        large["tokens"] - small["tokens"], 1)
    tokenizer = large["stages"]["tokenizer"] * max(1.0, large["tokenizer_chars"] / large["kept_chars"])
    scale = TARGET_TOKENS / large["tokens"]
    linear = stages(small, LINEAR_STAGES) + per_token * (TARGET_TOKENS - small["tokens"])
    return {"input_tb": large["input_bytes"] * scale / 1e12,
            "parallel_hours": parallel * scale / (NODES * TASKS_PER_NODE) / 3600,
            "serial_hours": (linear + tokenizer) / 3600, "tokenizer_hours": tokenizer / 3600,
            "per_task_mb_s": large["input_bytes"] / 1e6 / parallel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0, help="input size at scale 1")
    parser.add_argument("--scales", default="1,10,30", help="comma-separated multiples of --megabytes")
    parser.add_argument("--tasks", default="1,2", help="comma-separated task counts to compare")
    parser.add_argument("--without-dedup", action="store_true", help="switch deduplication off, to see its share")
    args = parser.parse_args()
    task_counts = [int(t) for t in args.tasks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="essaim-prepare-bench-") as scratch:
        for scale in (float(s) for s in args.scales.split(",")):
            source = Path(scratch) / f"in-{scale:g}"
            config = write_synthetic_corpus(source, args.megabytes * scale, part_megabytes=10)
            for tasks in task_counts:
                figures = run(config, Path(scratch) / f"out-{scale:g}-{tasks}", tasks, not args.without_dedup)
                figures.update(scale=scale, input_bytes=input_bytes(source))
                rows.append(figures)
                print(f"scale {scale:g}x, {tasks} task(s): {figures['seconds']:.1f} s; stage seconds / largest "
                      "process MB: " + ", ".join(f"{name} {t:.1f}/{figures['stage_peak_mb'].get(name, 0):.0f}"
                                                 for name, t in figures["stages"].items()), flush=True)

    print(f"\n{'scale':>5} {'input MB':>9} {'tasks':>5} {'seconds':>8} {'MB/s':>6} {'MB/s/task':>9} {'CPU s':>7} "
          f"{'MB/CPU s':>8} {'peak tree MB':>12} {'peak process MB':>15} {'documents':>10} {'tokens':>12}")
    for r in rows:
        rate = r["input_bytes"] / 1e6 / r["seconds"]
        print(f"{r['scale']:>5g} {r['input_bytes'] / 1e6:>9.1f} {r['tasks']:>5} {r['seconds']:>8.1f} {rate:>6.2f} "
              f"{rate / r['tasks']:>9.2f} {r['cpu_seconds']:>7.0f} {r['input_bytes'] / 1e6 / r['cpu_seconds']:>8.2f} "
              f"{r['peak_tree_mb']:>12.0f} {r['peak_process_mb']:>15.0f} {r['documents']:>10,} {r['tokens']:>12,}")

    headline: dict[str, object] = {}
    scales = sorted({r["scale"] for r in rows})
    for tasks in task_counts:
        runs = [r for r in rows if r["tasks"] == tasks]
        first, last = runs[0], runs[-1]
        growth = last["peak_process_mb"] / first["peak_process_mb"] - 1
        print(f"{tasks} task(s): largest process {first['peak_process_mb']:.0f} MB at {first['scale']:g}x, "
              f"{last['peak_process_mb']:.0f} MB at {last['scale']:g}x ({growth:+.0%}); whole tree "
              f"{first['peak_tree_mb']:.0f} -> {last['peak_tree_mb']:.0f} MB")
        headline[f"peak_process_growth_{tasks}_tasks"] = round(growth, 3)
        headline[f"mb_per_s_per_task_{tasks}_tasks"] = round(last["input_bytes"] / 1e6 / last["seconds"] / tasks, 2)
        headline[f"mb_per_cpu_second_{tasks}_tasks"] = round(last["input_bytes"] / 1e6 / last["cpu_seconds"], 2)
    if len(task_counts) > 1:
        for scale in scales:
            one, many = (next(r for r in rows if r["scale"] == scale and r["tasks"] == t)
                         for t in (task_counts[0], task_counts[-1]))
            speedup = one["seconds"] / many["seconds"]
            print(f"{scale:g}x: {task_counts[-1]} tasks {speedup:.2f}x as fast as {task_counts[0]}")
            headline[f"speedup_{scale:g}x"] = round(speedup, 2)
    largest = max(scales)
    one_task = [r for r in rows if r["tasks"] == min(task_counts)]
    plan = projection(one_task[0], one_task[-1])
    print(f"\nprojection for {TARGET_TOKENS:.0e} tokens ({plan['input_tb']:.1f} TB of input like this one) on {NODES} "
          f"nodes x {TASKS_PER_NODE} tasks: {plan['parallel_hours']:.1f} h in the stages split across tasks "
          f"({plan['per_task_mb_s']:.2f} MB/s a task), {plan['serial_hours']:.2f} h in the single-task stages "
          f"({', '.join(SERIAL_STAGES)}; the tokenizer's {plan['tokenizer_hours']:.2f} h for a full sample, the "
          f"others by their cost per token from {min(scales):g}x to {largest:g}x)")
    headline.update(projection_parallel_hours=round(plan["parallel_hours"], 2),
                    projection_serial_hours=round(plan["serial_hours"], 2))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
