"""Governance: maintainers change a run only through signed proposals and votes, kept in a hash-chained ledger."""
