"""Regenerate the gRPC stubs from protocol/essaim.proto: `python -m protocol.generate`.

The stubs are committed so that installing Essaim needs no code generation;
tests/test_protocol_stubs.py fails when they no longer match the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_NAME = "essaim.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
STUB_NAMES = ("essaim_pb2.py", "essaim_pb2.pyi", "essaim_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root/protocol/ and return their paths."""
    from grpc_tools import protoc  # a build-time tool, only needed here

    # Compiling "protocol/essaim.proto" from the repository root makes the
    # generated code import `from protocol import essaim_pb2`.
    (out_root / "protocol").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR.parent}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PACKAGE_DIR / PROTO_NAME),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PACKAGE_DIR / PROTO_NAME}")
    return [out_root / "protocol" / name for name in STUB_NAMES]


if __name__ == "__main__":
    written = generate(PACKAGE_DIR.parent)
    print("\n".join(str(path) for path in written), file=sys.stderr)
