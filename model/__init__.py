"""What Essaim trains: model presets, the tokenizer, and the token shards of a corpus.

Submodules are imported explicitly (``from model.presets import build_model``) so that
importing the package stays cheap: torch and transformers load only where they are used.
This package knows nothing about the network (see docs/ARCHITECTURE.md).
"""
