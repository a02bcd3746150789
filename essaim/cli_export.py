"""`essaim export`: a checkpoint in the formats people run models with locally (GGUF for llama.cpp, Ollama, LM Studio)."""

from __future__ import annotations

from pathlib import Path

import typer

from essaim.cli_support import fail as _fail

export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint to run it elsewhere (GGUF for Ollama, LM Studio).")


@export_app.command("gguf")
def export_gguf_command(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (round-NNNNNN, or the DIR holding 'latest'), "
                                      "a fine-tune's --out directory, or its merged/ or adapter/."),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write; an Ollama Modelfile goes beside it."),
    type_name: str = typer.Option("f16", "--type", help="Weights: f32, f16, bf16 or q8_0 (norms stay f32)."),
    force: bool = typer.Option(False, "--force", help="Replace --out and the Modelfile beside it if they exist."),
) -> None:
    """Write a checkpoint as one GGUF file (llama.cpp's names and tokenizer) and an Ollama Modelfile beside it."""
    from transformers.utils import logging as transformers_logging

    from model.gguf_export import export_gguf

    transformers_logging.disable_progress_bar()
    try:
        result = export_gguf(checkpoint, out, type_name, force)
    except (ValueError, OSError) as error:  # ExportError is a ValueError
        _fail(str(error))
    typer.echo(f"{result.gguf} ({result.type}, {result.tensors} tensors, {result.bytes / 2**20:,.1f} MiB) "
               f"from {result.source}; Ollama: cd {result.modelfile.parent} && ollama create {result.name} -f {result.modelfile.name}")
