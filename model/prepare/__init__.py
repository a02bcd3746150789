"""Corpus preparation's stages as datatrove pipeline steps (model/corpus.py orders and runs them)."""
