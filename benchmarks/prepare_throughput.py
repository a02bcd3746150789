"""How fast `essaim data prepare` runs, and whether its memory stays flat as the input grows.

Usage: python benchmarks/prepare_throughput.py [--megabytes 20 --scales 1,10]

For each scale, writes a synthetic multilingual corpus (model.synthetic_corpus: JSONL,
Parquet and text files, with planted duplicates and defects) of MEGABYTES x scale,
then prepares it in a fresh process and prints: input MB/s, text MB/s, tokens/s,
the time of each pass, and peak resident memory (with the interpreter's own, after
imports, for reference). Run it on an idle machine: it uses every core it finds.
--without-dedup switches exact and near-duplicate removal off, to show what their
indexes (the only state that grows with the number of documents) cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.synthetic_corpus import write_synthetic_corpus  # noqa: E402

# Runs in a child process so that its peak RSS is prepare's alone.
_CHILD = r"""
import json, sys, time
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config

def rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

baseline = rss_mb()
marks = [("start", time.perf_counter())]
corpus = load_corpus_config(sys.argv[1])
if sys.argv[3] == "without-dedup":
    corpus.dedup.exact, corpus.dedup.near_threshold = False, 0.0
manifest, report = prepare_corpus(corpus, sys.argv[2], log=lambda step: marks.append((step, time.perf_counter())))
marks.append(("done", time.perf_counter()))
phases = {}
for (step, at), (_, until) in zip(marks, marks[1:]):
    phase = "read, filter, dedup" if step.startswith(("start", "reading")) else step
    phases[phase] = phases.get(phase, 0.0) + until - at
print(json.dumps({
    "seconds": marks[-1][1] - marks[0][1], "phases": phases, "baseline_mb": baseline, "peak_mb": rss_mb(),
    "tokens": sum(s.tokens for s in manifest.shards), "shards": len(manifest.shards),
    "text_chars": sum(c.kept_chars + sum(r["chars"] for r in c.removed.values()) for c in report.sources.values()),
    "documents": sum(c.records for c in report.sources.values()),
    "kept": sum(c.kept_documents for c in report.sources.values()),
}))
"""


def input_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run(megabytes: float, scratch: Path, dedup: bool) -> dict:
    source = scratch / f"in-{megabytes:g}"
    config = write_synthetic_corpus(source, megabytes)
    mode = "with-dedup" if dedup else "without-dedup"
    result = subprocess.run([sys.executable, "-c", _CHILD, str(config), str(scratch / f"out-{megabytes:g}"), mode],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"prepare failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["input_bytes"] = input_bytes(source)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0, help="input size at scale 1")
    parser.add_argument("--scales", default="1,10", help="comma-separated multiples of --megabytes")
    parser.add_argument("--without-dedup", action="store_true", help="switch deduplication off, to see its share")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="essaim-prepare-bench-") as scratch:
        for scale in (float(s) for s in args.scales.split(",")):
            figures = run(args.megabytes * scale, Path(scratch), dedup=not args.without_dedup)
            figures["scale"] = scale
            rows.append(figures)
            seconds = figures["seconds"]
            print(f"\nscale {scale:g}x: {figures['input_bytes'] / 1e6:.1f} MB of input, {figures['documents']:,} documents "
                  f"({figures['kept']:,} kept), {figures['tokens']:,} tokens in {figures['shards']} shards")
            print(f"  {seconds:.1f} s: {figures['input_bytes'] / 1e6 / seconds:.2f} input MB/s, "
                  f"{figures['text_chars'] / 1e6 / seconds:.2f} text MB/s (million chars), "
                  f"{figures['tokens'] / seconds:,.0f} tokens/s")
            print("  passes: " + ", ".join(f"{name} {t:.1f} s" for name, t in figures["phases"].items()))
            print(f"  peak memory {figures['peak_mb']:.0f} MB (interpreter and libraries alone: {figures['baseline_mb']:.0f} MB)")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last["peak_mb"] - first["peak_mb"]) / max(last["kept"] - first["kept"], 1) * 1024
        print(f"\npeak memory {first['peak_mb']:.0f} MB at {first['scale']:g}x, {last['peak_mb']:.0f} MB at "
              f"{last['scale']:g}x: {growth:.1f} KB more per extra kept document")


if __name__ == "__main__":
    main()
