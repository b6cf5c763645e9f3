"""Regenerate the committed protobuf/gRPC code from proto/.

Usage: python scripts/gen_proto.py [OUT_DIR]

Messages (`*_pb2.py` and their `*.pyi`) go to `mesh/wire/v1/`, the pure library's wire
contract. gRPC stubs are made only for files that define a service, and go next to the
side that serves and calls it (`SERVICE_STUB_DIRS`), so `mesh` never imports grpc: a
new service needs an entry there.

With no OUT_DIR the files are written in place; tests call it with a temporary OUT_DIR
and compare the bytes, so stale, missing or extra generated code fails the suite.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# Where a .proto file's gRPC stub lives (relative to the repository), by the file's name.
SERVICE_STUB_DIRS = {
    "mesh/wire/v1/node.proto": Path("node/transport"),  # node's server and its peer client
    "mesh/wire/v1/relay.proto": Path("cloud_relay"),  # the relay server; node's link imports it
}
# The files every generated name matches (test_proto_fresh looks for them everywhere).
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _protoc(*args: str) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def _with_services(descriptor_set: Path) -> set[str]:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {f.name for f in files.file if f.service}


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    _protoc(f"--python_out={out_dir}", f"--pyi_out={out_dir}", *names)
    written = [out_dir / name.removesuffix(".proto") for name in names]
    generated = [
        p.with_name(p.name + suffix) for p in written for suffix in ("_pb2.py", "_pb2.pyi")
    ]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        descriptor_set = scratch_dir / "descriptors.pb"
        _protoc(
            f"--descriptor_set_out={descriptor_set}", f"--grpc_python_out={scratch_dir}", *names
        )
        with_services = _with_services(descriptor_set)
        unplaced = sorted(with_services - set(SERVICE_STUB_DIRS))
        if unplaced:
            raise SystemExit(
                f"no stub directory for the services of {unplaced}: add to SERVICE_STUB_DIRS"
            )
        for name in sorted(with_services):
            stub = Path(name.removesuffix(".proto") + "_pb2_grpc.py")
            target = out_dir / SERVICE_STUB_DIRS[name] / stub.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(scratch_dir / stub, target)
            generated.append(target)
    return sorted(generated)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path.relative_to(target))
