"""The coordinator: leases shards to workers, tracks rounds, records lineage."""
