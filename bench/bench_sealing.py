"""Sealing: what end-to-end encryption costs per request and per streamed frame.

Measured in one run, against plain baselines that do the same protobuf work
without any cryptography:

  per request   seal_request + EnvelopeOpener.open of a ~2 KB body with a fresh
                request ID each time (X25519, and hybrid ML-KEM-768+X25519),
                against serializing + parsing the same body as a
                SealedRequestBody.
  per frame     FrameWriter.seal + FrameReader.open of a ~40-byte payload (a
                serialized small message), against building, serializing and
                parsing a SealedFrame with the plaintext as its ciphertext.

Each figure is the median over several batches of the per-operation mean of a
batch. Targets (DESIGN.md "Sealing"): sealing adds at most 1 ms per request
and at most 20 µs per frame.

    python bench/bench_sealing.py [--requests 2000] [--frames 20000] [--batches 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.trust.enckeys import KeyRing, verify_encryption_keys  # noqa: E402
from mesh.trust.identity import Identity  # noqa: E402
from mesh.trust.membership import DAY_MS, MeshAuthority, Role  # noqa: E402
from mesh.trust.sealing import (  # noqa: E402
    EnvelopeOpener,
    FrameReader,
    FrameWriter,
    ReplayGuard,
    seal_request,
)
from mesh.wire.v1 import trust_pb2 as tpb  # noqa: E402

REQUEST_TARGET_NS = 1_000_000
FRAME_TARGET_NS = 20_000


def median_ns_per_op(step: Callable[[], object], iterations: int, batches: int) -> float:
    """Median over `batches` of the mean cost of one call in a batch of `iterations`."""
    for _ in range(max(1, iterations // 10)):  # warm up
        step()
    means = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            step()
        means.append((time.perf_counter_ns() - start) / iterations)
    return statistics.median(means)


def fmt(ns: float) -> str:
    return f"{ns / 1000:9.2f} µs  ({ns / 1e6:.4f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="envelopes per batch")
    parser.add_argument("--frames", type=int, default=20000, help="frames per batch")
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args()

    now = 1_700_000_000_000
    authority = MeshAuthority.generate()
    sender = Identity.generate()
    recipient = Identity.generate()
    sender_cert = authority.issue(
        sender.public_key_raw, role=Role.MEMBER, now_ms=now, ttl_ms=30 * DAY_MS
    )
    keyring = KeyRing(recipient, hybrid=True)
    keyring.rotate(now)
    peer = verify_encryption_keys(
        keyring.current.signed,
        identity_public_key=recipient.public_key_raw,
        node_id=recipient.node_id,
        now_ms=now,
    )
    opener = EnvelopeOpener(
        identity=recipient,
        keyring=keyring,
        mesh_public_key=lambda: authority.public_key,
        revoked=frozenset,
        # Room for every request ID of the run: none is forgotten inside the window.
        replay=ReplayGuard(capacity=(args.requests + 1) * (args.batches + 1) * 3),
    )
    body = os.urandom(2048)

    def plain_request() -> None:
        data = tpb.SealedRequestBody(response_key=b"\x00" * 32, body=body).SerializeToString()
        parsed = tpb.SealedRequestBody()
        parsed.ParseFromString(data)

    def sealed_request(hybrid: bool) -> Callable[[], None]:
        def step() -> None:
            sealed = seal_request(
                body,
                identity=sender,
                sender_cert=sender_cert,
                recipient=peer,
                now_ms=now,
                offer_hybrid=hybrid,
            )
            opened = opener.open(sealed.envelope, now_ms=now)
            assert opened.body == body

        return step

    payload = tpb.SealedRequestBody(
        response_key=b"r" * 8, body=b"token text, " * 2
    ).SerializeToString()
    key, request_id = os.urandom(32), os.urandom(16)

    def plain_frame() -> None:
        data = tpb.SealedFrame(seq=1, final=False, ciphertext=payload).SerializeToString()
        parsed = tpb.SealedFrame()
        parsed.ParseFromString(data)

    # A fresh writer/reader pair per batch would bias nothing; one long stream is simpler.
    writer = FrameWriter(key, request_id)
    reader = FrameReader(key, request_id)

    def sealed_frame() -> None:
        data = writer.seal(payload).SerializeToString()
        parsed = tpb.SealedFrame()
        parsed.ParseFromString(data)
        assert reader.open(parsed) == payload

    print(f"machine:   {platform.platform()}; {platform.machine()}; cpus={os.cpu_count()}")
    print(f"python:    {platform.python_version()} ({platform.python_implementation()})")
    print(
        f"settings:  {args.requests} requests and {args.frames} frames per batch, "
        f"{args.batches} batches; request body {len(body)} B, frame payload {len(payload)} B"
    )
    print()

    base_req = median_ns_per_op(plain_request, args.requests, args.batches)
    x25519 = median_ns_per_op(sealed_request(False), args.requests, args.batches)
    hybrid = median_ns_per_op(sealed_request(True), args.requests, args.batches)
    base_frame = median_ns_per_op(plain_frame, args.frames, args.batches)
    frame = median_ns_per_op(sealed_frame, args.frames, args.batches)

    print("per request (seal_request + EnvelopeOpener.open)")
    print(f"  baseline (protobuf only)  {fmt(base_req)}")
    print(f"  X25519                    {fmt(x25519)}")
    print(f"  hybrid ML-KEM-768+X25519  {fmt(hybrid)}")
    added_x = x25519 - base_req
    added_h = hybrid - base_req
    print(f"  added, X25519             {fmt(added_x)}")
    print(f"  added, hybrid             {fmt(added_h)}")
    print()
    print("per frame (FrameWriter.seal + FrameReader.open)")
    print(f"  baseline (protobuf only)  {fmt(base_frame)}")
    print(f"  sealed                    {fmt(frame)}")
    added_f = frame - base_frame
    print(f"  added                     {fmt(added_f)}")
    print()
    worst = max(added_x, added_h)
    ok_req = worst <= REQUEST_TARGET_NS
    ok_frame = added_f <= FRAME_TARGET_NS
    print(
        f"target: <= 1 ms added per request   -> {'HOLDS' if ok_req else 'MISSED'} "
        f"(worst {worst / 1e6:.3f} ms)"
    )
    print(
        f"target: <= 20 µs added per frame    -> {'HOLDS' if ok_frame else 'MISSED'} "
        f"({added_f / 1000:.2f} µs)"
    )


if __name__ == "__main__":
    main()
