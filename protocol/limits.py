"""Message limits shared by the coordinator's server and the workers' channels."""

# The largest message is RunConfig, which carries the tokenizer (about 4 MB for a
# 65k-token vocabulary); anything bigger is refused before it is parsed.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# grpcio's server sets SO_REUSEPORT by default: a second coordinator on a busy port would
# start and the kernel would split workers between two databases. Off: a bind error instead.
SERVER_OPTIONS: list[tuple[str, int]] = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
