"""The wire between coordinator and workers: gRPC service, identities, signed requests."""
