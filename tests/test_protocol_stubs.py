from pathlib import Path

from protocol.generate import STUB_NAMES, generate

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "protocol"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    for path in fresh:
        committed = PROTOCOL_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run `python -m protocol.generate` and commit the result"
        )
    assert sorted(p.name for p in fresh) == sorted(STUB_NAMES)
