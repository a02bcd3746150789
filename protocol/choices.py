"""Values a field of the wire may take, named once for the coordinator that checks them and the worker that sends them."""

PRECISIONS = ("fp32", "bf16")  # RegisterRequest.precision: what a worker's matmuls compute in (weights stay fp32)
