"""`essaim eval CHECKPOINT --data DIR`: a model's loss and bits per byte on a corpus's held-out split.

The checkpoint is an Essaim checkpoint (its weights checked against the digest saved with
them) or any Hugging Face causal LM directory (a merged fine-tune); it must use the corpus's
tokenizer, since the held-out text is read as that tokenizer's tokens. The held-out shards
are checked against the manifest before they are read (model/evaluate.py does the rest).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from essaim.cli_support import fail
from model.eval_figures import DEFAULT_MAX_TOKENS_PER_SOURCE


def evaluate_checkpoint(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory (round-NNNNNN, or the DIR holding 'latest'), "
                                      "or a Hugging Face model directory trained with the corpus's tokenizer."),
    data: Path = typer.Option(..., "--data", help="The prepared corpus directory (essaim data prepare)."),
    max_tokens_per_source: int = typer.Option(DEFAULT_MAX_TOKENS_PER_SOURCE, min=1,
                                              help="Most held-out tokens evaluated per source (whole rows)."),
    seq_len: int | None = typer.Option(None, min=2, help="Row length (default: the run's, from the checkpoint)."),
    device: str = typer.Option("cpu", help="cpu, auto (the first CUDA device, else the CPU), cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or auto (bf16 autocast where the GPU has it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Measure loss (nats per token) and bits per byte on the held-out split, per language, per source and overall."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from tokenizers import Tokenizer
    from transformers.utils import logging as transformers_logging

    from model.evaluate import evaluate_heldout, heldout_rows
    from model.shards import MANIFEST_FILE, Manifest, ShardIntegrityError, read_tokens, verify_shard
    from model.text_bytes import token_byte_lengths
    from worker.device import plan_device

    transformers_logging.disable_progress_bar()
    try:
        manifest = Manifest.load(data / MANIFEST_FILE)
        plan = plan_device(device, precision)  # DeviceError is a ValueError
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    model, path, info = _load_model(checkpoint)
    _check_tokenizer(path, data, manifest, model)
    seq_len = seq_len or info.get("seq_len")
    if not seq_len:
        fail(f"{path} does not say its run's sequence length (not an Essaim checkpoint): give --seq-len")

    def read(shard, start: int, end: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
        verify_shard(data / shard.file, shard.sha256, shard.tokens, shard.dtype)
        return torch.from_numpy(read_tokens(data / shard.file, shard.dtype, start, end))

    try:
        rows = heldout_rows(manifest, read, seq_len, max_tokens_per_source)
    except (ValueError, ShardIntegrityError) as error:
        fail(str(error))
    if not rows:
        fail(f"every source's held-out split is shorter than one row of {seq_len} tokens: give a smaller --seq-len")
    lengths = token_byte_lengths(Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json")))
    figures = evaluate_heldout(model.to(plan.device), rows, lengths, seq_len, plan)
    if as_json:
        typer.echo(json.dumps({"checkpoint": str(path), **info, "corpus_root_hash": manifest.root_hash(),
                               "seq_len": seq_len, "figures": [asdict(figure) for figure in figures]}, indent=2))
        return
    table = Table(title=f"Held-out evaluation of {path}", title_justify="left")
    for column in ("group", "name", "tokens", "bytes", "loss (nats/token)", "bits per byte"):
        table.add_column(column, justify="left" if column in ("group", "name") else "right")
    for figure in figures:
        table.add_row(figure.group, figure.name, f"{figure.tokens:,}", f"{figure.bytes:,}", f"{figure.loss:.4f}",
                      f"{figure.bits_per_byte:.4f}")
    Console().print(table)


def _load_model(given: Path):  # type: ignore[no-untyped-def]
    """The model, its directory, and what its checkpoint.json says (round, digest, seq_len; {} for a plain one)."""
    from transformers import AutoModelForCausalLM

    from model.checkpoints import CheckpointError, latest_checkpoint, load_model, read_checkpoint

    if not given.is_dir():
        fail(f"{given} is not a directory: give a checkpoint directory (round-NNNNNN, or the one holding 'latest') "
             "or a Hugging Face model directory")
    try:
        path = latest_checkpoint(given) or given
        if (path / "checkpoint.json").is_file():
            checkpoint = read_checkpoint(path)
            info = {"round": checkpoint.completed_round, "params_digest": checkpoint.params_digest,
                    "run_id": checkpoint.run_id, "seq_len": int(checkpoint.run_config.get("seq_len", 0))}
            return load_model(checkpoint), path, info
        if not (path / "config.json").is_file():
            fail(f"{path} is not a checkpoint: it has neither checkpoint.json (an Essaim checkpoint) nor config.json "
                 "(a Hugging Face model)")
        return AutoModelForCausalLM.from_pretrained(path), path, {}
    except (CheckpointError, OSError, ValueError, KeyError) as error:
        fail(f"cannot load a model from {given}: {error}")


def _check_tokenizer(path: Path, data: Path, manifest, model) -> None:  # type: ignore[no-untyped-def]
    """The model reads the corpus's tokens: the same tokenizer, and an embedding row for every token id."""
    mine, corpus = path / "tokenizer.json", data / "tokenizer" / "tokenizer.json"
    if not corpus.is_file():
        fail(f"{data} has no tokenizer/tokenizer.json: re-run `essaim data prepare` to write it")
    if not mine.is_file():
        fail(f"{path} has no tokenizer.json, so nothing shows it reads the corpus's tokens: save the tokenizer "
             "it was trained with beside it")
    if _token_ids(mine.read_bytes()) != _token_ids(corpus.read_bytes()):
        fail(f"{path} was trained with another tokenizer than the corpus in {data} was prepared with "
             f"(sha256 {manifest.tokenizer_sha256[:16]}): evaluate it on the corpus its run trained on")
    rows = model.get_input_embeddings().num_embeddings
    if rows < manifest.vocab_size:
        fail(f"{path} has {rows} token embeddings, fewer than the corpus's vocabulary of {manifest.vocab_size}: "
             "it was not trained on this corpus's tokens")


def _token_ids(tokenizer_json: bytes) -> tuple:
    """What decides a tokenizer's ids: its model (vocabulary, merges), pre-tokenizer and added tokens."""
    document = json.loads(tokenizer_json)
    return tuple(json.dumps(document.get(key), sort_keys=True) for key in ("model", "pre_tokenizer", "added_tokens"))
