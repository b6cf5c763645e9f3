"""The committed generated code must match proto/: regenerate and compare bytes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{relative} is stale: run python scripts/gen_proto.py and commit"
        )
    committed_all = {p.relative_to(ROOT) for p in (ROOT / "mesh" / "wire").rglob("*_pb2*.py*")}
    assert committed_all == {p.relative_to(tmp_path) for p in fresh}
