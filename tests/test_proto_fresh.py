"""The committed generated code must match proto/: regenerate and compare bytes.

Every generated file (messages and their stubs in mesh/wire/v1, the gRPC service stubs
next to node's transport and in cloud_relay) must be committed, fresh, and the only ones:
a stub left where it used to be generated fails too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "node", "cloud_relay")


def _gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def _generated_files(root: Path, patterns: tuple[str, ...]) -> set[Path]:
    return {
        path.relative_to(root)
        for package in PACKAGES
        for pattern in patterns
        for path in (root / package).rglob(pattern)
    }


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _gen_proto()


def test_generated_code_is_fresh(gen: ModuleType, tmp_path: Path) -> None:
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{relative} is stale: run python scripts/gen_proto.py and commit"
        )
    assert {p.relative_to(tmp_path) for p in fresh} == _generated_files(
        tmp_path, gen.GENERATED_PATTERNS
    )
    committed_all = _generated_files(ROOT, gen.GENERATED_PATTERNS)
    extra = sorted(str(p) for p in committed_all - {p.relative_to(tmp_path) for p in fresh})
    assert extra == [], "not generated from proto/ (any more): delete them"


def test_only_services_get_stubs_and_none_in_mesh(gen: ModuleType, tmp_path: Path) -> None:
    stubs = {p.relative_to(tmp_path) for p in gen.generate(tmp_path) if p.name.endswith("_grpc.py")}
    assert stubs == {Path("node/transport/node_pb2_grpc.py"), Path("cloud_relay/relay_pb2_grpc.py")}
