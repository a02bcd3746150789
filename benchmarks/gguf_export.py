"""How long `essaim export gguf` takes on the `1b` preset (target: under a minute on 2 cores), and the files' sizes.

Usage: python benchmarks/gguf_export.py [--types f16,q8_0,f32] [--preset 1b] [--keep DIR]

Builds the preset with random weights (model.presets.build_model, the 65,024-token
Lucie vocabulary) and saves it as an Essaim checkpoint (model.checkpoints, float32
safetensors), in a child process so its memory is returned before any export. The
tokenizer is a small byte-level BPE trained here: ids past it are written as unused
"[PADn]" tokens, and the tensors, which are what the export's time goes into, are the
full preset's. Then each type is exported in a fresh process: the table gives the
export's own seconds, the process's wall time (Python start-up and imports included),
the file's size, its write rate, and the process's peak resident memory (which counts the
checkpoint's pages that safetensors maps from the page cache, not only the export's own). The
checkpoint was just written, so its 4.4 GB are read from the page cache: on a cold
disk, add its read time. Each .gguf and its Modelfile are removed once measured (disk space).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 60.0

_BUILD = r"""
import sys
from pathlib import Path
from model.checkpoints import write_checkpoint_files
from model.presets import LUCIE_VOCAB_SIZE, build_model
from model.tokenizer import train_tokenizer

out, preset = Path(sys.argv[1]), sys.argv[2]
texts = ["Bonjour à tous, le modèle apprend le français et l'anglais.", "Hello everyone, the model learns.",
         "def add(x, y):\n    return x + y"] * 50
tokenizer = train_tokenizer(iter(texts), vocab_size=512, out_dir=out.parent / "tokenizer")
model = build_model(preset, LUCIE_VOCAB_SIZE, seed=0)
out.mkdir(parents=True)
write_checkpoint_files(out, model, tokenizer, {"run_id": "benchmark", "completed_round": 0, "next_round": 1,
                       "lineage_head": 0, "config_version": "v0", "run_config": {"model_preset": preset}, "saved_at": 0.0})
print(sum(p.numel() for p in model.parameters()))
"""

# Runs in a child process so that its peak RSS is the export's alone.
_EXPORT = r"""
import json, sys, time
from pathlib import Path
from model.gguf_export import export_gguf

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

start = time.perf_counter()
result = export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": result.bytes, "tensors": result.tensors,
                  "peak_mb": rss_mb()}))
"""


def run_export(checkpoint: Path, out: Path, type_name: str) -> dict:
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _EXPORT, str(checkpoint), str(out), type_name],
                           cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"export {type_name} failed:\n{child.stderr}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    figures["wall_seconds"] = time.perf_counter() - started
    shutil.rmtree(out.parent)  # the .gguf and its Modelfile
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="f16,q8_0,f32", help="comma-separated --type values, in order")
    parser.add_argument("--preset", default="1b", help="model preset (model.presets)")
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="essaim-gguf-bench-") as scratch:
        root = args.keep or Path(scratch)
        checkpoint = root / "checkpoint" / "round-000000"
        started = time.perf_counter()
        build = subprocess.run([sys.executable, "-c", _BUILD, str(checkpoint), args.preset], cwd=ROOT,
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(f"building the {args.preset} checkpoint failed:\n{build.stderr}")
        parameters = int(build.stdout.strip().splitlines()[-1])
        print(f"{args.preset}: {parameters / 1e9:.2f} G parameters, checkpoint built and saved in "
              f"{time.perf_counter() - started:.0f} s ({(checkpoint / 'model.safetensors').stat().st_size / 1e9:.2f} GB)")
        rows = {name: run_export(checkpoint, root / name / "model.gguf", name) for name in args.types.split(",")}
    print(f"\n{'type':<6} {'export s':>9} {'wall s':>7} {'file GB':>8} {'write MB/s':>11} {'peak RSS MB':>12}")
    for name, row in rows.items():
        print(f"{name:<6} {row['seconds']:>9.1f} {row['wall_seconds']:>7.1f} {row['bytes'] / 1e9:>8.2f} "
              f"{row['bytes'] / 1e6 / row['seconds']:>11.0f} {row['peak_mb']:>12.0f}")
    slowest = max(row["wall_seconds"] for row in rows.values())
    print(f"\ntarget: under {TARGET_SECONDS:.0f} s per export (wall, start-up included); slowest {slowest:.1f} s")
    print(json.dumps({
        "benchmark": "gguf_export", "preset": args.preset, "parameters": parameters,
        **{f"{name}_seconds": round(row["seconds"], 2) for name, row in rows.items()},
        **{f"{name}_wall_seconds": round(row["wall_seconds"], 2) for name, row in rows.items()},
        **{f"{name}_bytes": row["bytes"] for name, row in rows.items()},
        **{f"{name}_peak_rss_mb": round(row["peak_mb"]) for name, row in rows.items()},
        "target_seconds": TARGET_SECONDS, "meets_target": slowest < TARGET_SECONDS,
    }))


if __name__ == "__main__":
    main()
