"""Membership and sealing between real node processes: invites, revocation, and a
recording proxy that must never see a prompt or an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import PROTOCOL_VERSION
from mesh.clock import SYSTEM
from mesh.errors import (
    BadSignature,
    InvalidRequest,
    InviteError,
    NotAMember,
    PermissionDenied,
    QuotaExceeded,
)
from mesh.inference import ChatMessage, Finished, InferenceRequest, Sampling, TextDelta
from mesh.trust.cards import PeerCard
from mesh.trust.sealing import seal_request
from mesh.wire import codec
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from node.store.trust_store import TrustStore
from node.transport.peer_client import PeerClient, join_mesh
from tests.members import invite_code, join_as_member, new_trust
from tests.nodeproc import NodeProcess, run_cli


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path / "admin").start()
    try:
        yield proc
    finally:
        proc.kill()


def start_member(admin: NodeProcess, home: Path) -> NodeProcess:
    proc = NodeProcess(home).start()
    code = run_cli(admin.home, "mesh", "invite")
    assert code.returncode == 0, code.stderr
    joined = run_cli(home, "mesh", "join", code.stdout.strip())
    assert joined.returncode == 0, joined.stderr
    assert admin.info["mesh_id"] in joined.stdout
    return proc


def trust_of(node: NodeProcess) -> TrustStore:
    """The node's own identity and membership, read from its home (as the node sees them)."""
    home = Home.resolve(node.home)
    identity, _ = load_or_create_identity(home.identity_key)
    return TrustStore.open(home, identity)


def grpc_address(node: NodeProcess) -> str:
    return str(json.loads((node.home / "run" / "node.json").read_text())["grpc_address"])


class RecordingProxy:
    """A TCP proxy that keeps every byte it forwards, both ways."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.recording = bytearray()
        self.server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RecordingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    self.recording += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)


async def test_nothing_readable_crosses_the_wire(admin: NodeProcess, tmp_path: Path) -> None:
    member = await join_as_member(admin, tmp_path / "member")
    canary = "canary-" + secrets.token_hex(8)
    request = InferenceRequest(
        model="smollm2-135m-instruct",
        messages=(
            ChatMessage(role="user", content=f"Repeat this word exactly: {canary}. Then say hi."),
        ),
        sampling=Sampling(temperature=0, max_tokens=60),
    )
    async with RecordingProxy(grpc_address(admin)) as proxy:
        async with PeerClient(proxy.address, trust=member) as client:
            peer = await client.public_card()
            card = await client.full_card(peer)
            events = [event async for event in client.infer(peer, request)]
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert isinstance(events[-1], Finished)
    assert len(answer) > 10
    recording = bytes(proxy.recording)
    assert len(recording) > 2000  # the conversation really went through the proxy
    assert canary.encode() not in recording
    assert answer.encode() not in recording
    assert answer.strip()[:12].encode() not in recording
    assert b"Repeat this word" not in recording
    # The full card (models, hardware) is sealed too; only identity material is in clear.
    assert [m.name for m in card.models] == ["smollm2-135m-instruct"]
    assert b"smollm2" not in recording
    assert peer.node_id.encode() in recording  # who talks to whom is visible, by design


async def test_invites_are_single_use_and_expire(admin: NodeProcess, tmp_path: Path) -> None:
    code = invite_code(admin)
    first = new_trust(tmp_path / "first")
    await join_mesh(code, first, display_name="first", addresses=())
    assert first.mesh_id == admin.info["mesh_id"]
    second = new_trust(tmp_path / "second")
    with pytest.raises(InviteError, match="already used"):
        await join_mesh(code, second, display_name="second", addresses=())
    short = invite_code(admin, ttl_s=1)
    await asyncio.sleep(1.2)  # the invite's one-second lifetime must really pass
    with pytest.raises(InviteError, match="expired"):
        await join_mesh(short, second, display_name="second", addresses=())
    assert second.mesh_id != admin.info["mesh_id"]
    garbage = run_cli(tmp_path / "second", "mesh", "join", "allerac1-not-a-code")
    assert garbage.returncode != 0


async def test_a_revoked_node_is_refused_by_every_peer(admin: NodeProcess, tmp_path: Path) -> None:
    bob = start_member(admin, tmp_path / "bob")
    carol = start_member(admin, tmp_path / "carol")
    try:
        members = run_cli(admin.home, "mesh", "members", "--json")
        listed = {m["node_id"] for m in json.loads(members.stdout)["members"]}
        assert {bob.node_id, carol.node_id} <= listed

        hello = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))

        async def ask(sender: NodeProcess, target: NodeProcess) -> list[object]:
            async with PeerClient(grpc_address(target), trust=trust_of(sender)) as client:
                peer = await client.public_card()
                return [e async for e in client.infer(peer, hello)]

        assert isinstance((await ask(carol, bob))[-1], Finished)  # members reach each other
        result = run_cli(admin.home, "mesh", "revoke", carol.node_id)
        assert result.returncode == 0, result.stderr
        assert "told 2 member(s) at once" in result.stdout
        for target in (admin, bob):
            with pytest.raises(NotAMember, match="revoked"):
                await ask(carol, target)
        assert isinstance((await ask(bob, admin))[-1], Finished)  # the others go on
        assert "REVOKED" in run_cli(admin.home, "mesh", "members").stdout
    finally:
        bob.kill()
        carol.kill()


async def test_valid_keys_without_a_membership_certificate_are_refused(
    admin: NodeProcess, tmp_path: Path
) -> None:
    member = await join_as_member(admin, tmp_path / "member")
    member.cert = tpb.SignedCert()  # keys and identity intact, certificate gone
    hello = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    async with PeerClient(grpc_address(admin), trust=member) as client:
        peer = await client.public_card()
        for _ in range(3):
            with pytest.raises(BadSignature, match="certificate"):
                async for _ in client.infer(peer, hello):
                    pass
    # The refusal is logged once, not once per attempt, and the node goes on serving.
    assert admin.output().count("refused a request") == 1
    assert run_cli(admin.home, "chat", "--max-tokens", "3", "hi").returncode == 0


async def test_an_overflow_node_serves_but_never_sees_members_cards_or_sends_requests(
    admin: NodeProcess, tmp_path: Path
) -> None:
    cloud = await join_as_member(admin, tmp_path / "cloud", role="overflow")
    hello = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    async with PeerClient(grpc_address(admin), trust=cloud) as client:
        peer = await client.public_card()  # in clear, as for anyone
        with pytest.raises(PermissionDenied, match="cards"):
            await client.full_card(peer)  # models, hardware, addresses: members only
        with pytest.raises(PermissionDenied, match="do not send"):
            async for _ in client.infer(peer, hello):
                pass


async def _raw_call(
    client: PeerClient, member: TrustStore, peer: PeerCard, body: bytes
) -> pb.InferEvent:
    """Seal `body` as it is (not a SealedCall the client would build) and return the one
    answer event."""
    sealed = seal_request(
        body,
        identity=member.identity,
        sender_cert=member.cert,
        recipient=peer.keys,
        now_ms=SYSTEM.now_ms(),
        offer_hybrid=member.keyring.hybrid,
    )
    request = pb.InferRequest(protocol_version=PROTOCOL_VERSION, sealed=sealed.envelope)
    events = client.transport.stream("Infer", request, pb.InferEvent, 10)
    [frame] = [sealed.reader.open(message.sealed) async for message in events]
    return pb.InferEvent.FromString(frame)


async def test_ledger_sync_answers_members_only_and_refuses_bad_requests(
    admin: NodeProcess, tmp_path: Path
) -> None:
    assert run_cli(admin.home, "chat", "--max-tokens", "2", "hi").returncode == 0
    member = await join_as_member(admin, tmp_path / "member")
    cloud = await join_as_member(admin, tmp_path / "cloud", role="overflow")
    async with PeerClient(grpc_address(admin), trust=member) as client:
        peer = await client.public_card()
        frames = [f async for f in client.sync(peer, lpb.SyncRequest())]
        assert sum(len(f.records) for f in frames) >= 1  # the chat's record, sealed to us
        assert sum(len(f.receipts) for f in frames) >= 1  # with its countersignature
        # A ledger call (SealedCall field 3) whose SyncRequest bytes do not parse.
        with pytest.raises(InvalidRequest, match="SealedCall"):
            codec.event_from_pb(await _raw_call(client, member, peer, b"\x1a\x03\xff\xff\xff"))
        too_many = lpb.SyncRequest(heads=[lpb.ChainHead(node_id="x")] * 100_001)
        with pytest.raises(InvalidRequest, match="at most"):
            async for _ in client.sync(peer, too_many):
                pass
    async with PeerClient(grpc_address(admin), trust=cloud) as client:
        peer = await client.public_card()
        with pytest.raises(PermissionDenied, match="ledger"):
            async for _ in client.sync(peer, lpb.SyncRequest()):
                pass
        with pytest.raises(PermissionDenied, match="users"):
            await client.users(peer, b"")
        with pytest.raises(PermissionDenied, match="quotas"):
            await client.quota(peer, lpb.QuotaCall(release=lpb.Release(request_id="r")))
    assert run_cli(admin.home, "chat", "--max-tokens", "2", "hi").returncode == 0


async def test_quota_and_users_calls_refuse_bad_input_clearly(
    admin: NodeProcess, tmp_path: Path
) -> None:
    member = await join_as_member(admin, tmp_path / "member")
    added = run_cli(admin.home, "user", "add", "alice", "--quota", "mesh=1k/day")
    assert added.returncode == 0, added.stderr
    async with PeerClient(grpc_address(admin), trust=member) as client:
        peer = await client.public_card()
        listed = await client.users(peer, b"")
        assert [u.name for u in listed.users] == ["alice"]
        assert not (await client.users(peer, listed.digest)).users  # same list: nothing sent
        # A sealed call whose body is not a SealedCall, or one that asks for nothing.
        for garbage in (b"\xff\x01", b""):
            with pytest.raises(InvalidRequest):
                codec.event_from_pb(await _raw_call(client, member, peer, garbage))
        bad_calls = [
            (lpb.QuotaCall(), InvalidRequest, "reserve or a release"),
            (
                lpb.QuotaCall(reserve=lpb.Reserve(request_id="r", user="nobody", classes=["mesh"])),
                PermissionDenied,
                "no user named 'nobody'",
            ),
            (
                lpb.QuotaCall(reserve=lpb.Reserve(request_id="r", user="alice", classes=["gpu"])),
                InvalidRequest,
                "unknown tier class",
            ),
            (
                lpb.QuotaCall(reserve=lpb.Reserve(request_id="r", user="alice")),
                InvalidRequest,
                "one or two classes",
            ),
            (
                lpb.QuotaCall(
                    release=lpb.Release(request_id="r", records=[lpb.SignedRecord()] * 65)
                ),
                InvalidRequest,
                "at most 64 records",
            ),
        ]
        for call, error, text in bad_calls:
            with pytest.raises(error, match=text):
                await client.quota(peer, call)
        over = lpb.QuotaCall(
            reserve=lpb.Reserve(
                request_id="big", user="alice", classes=["mesh"], prompt_tokens=10, max_tokens=5000
            )
        )
        with pytest.raises(QuotaExceeded, match="mesh=1k/day") as info:
            await client.quota(peer, over)
        assert info.value.resets_at.endswith("T00:00:00Z")  # travels with the error
        # A forged record in a release is not counted; the release itself still works.
        forged = lpb.SignedRecord(record=b"\x0a\x01x", signature=bytes(64))
        await client.quota(
            peer, lpb.QuotaCall(release=lpb.Release(request_id="r", records=[forged]))
        )
    assert run_cli(admin.home, "chat", "--max-tokens", "2", "hi").returncode == 0


def _post(node: NodeProcess, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        node.url + path,
        data=body,
        headers={"Content-Type": "application/json", **node.owner},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_mesh_admin_input_gets_clear_errors(admin: NodeProcess) -> None:
    cases = [
        # not an invite code at all: a bad request (issue 17), not a refusal
        ("/allerac/mesh/join", b'{"code": "allerac1-AAAA"}', 400, "invite_malformed"),
        ("/allerac/mesh/join", b'{"code": "hello"}', 400, "invite_malformed"),
        ("/allerac/mesh/join", b"{}", 400, "invalid_request"),
        ("/allerac/mesh/invites", b'{"role": "admin"}', 403, "invite_invalid"),
        ("/allerac/mesh/invites", b'{"role": "wizard"}', 400, "invalid_request"),
        ("/allerac/mesh/invites", b'{"ttl_s": -5}', 400, "invalid_request"),
        ("/allerac/mesh/invites", b"not json", 400, "invalid_request"),
        ("/allerac/mesh/revoke", b'{"node_id": "nope"}', 400, "invalid_request"),
        ("/allerac/mesh/admins", b'{"node_id": "nope"}', 400, "invalid_request"),
        ("/allerac/mesh/admins", b"{}", 400, "invalid_request"),
    ]
    for path, body, status, code in cases:
        got, payload = _post(admin, path, body)
        error = payload["error"]
        assert (got, error["code"]) == (status, code), (path, body, payload)  # type: ignore[index]
    assert run_cli(admin.home, "mesh", "invite", "--ttl", "soon").returncode != 0
    assert run_cli(admin.home, "mesh", "members").returncode == 0  # still serving


async def test_forged_joins_and_revocations_are_refused_over_grpc(
    admin: NodeProcess, tmp_path: Path
) -> None:
    from mesh.errors import PermissionDenied
    from mesh.trust.invites import decode_invite, make_join_request
    from mesh.trust.membership import MeshAuthority

    stranger = new_trust(tmp_path / "stranger")
    code = invite_code(admin)
    invite = decode_invite(code, now_ms=int(time.time() * 1000))
    forged = make_join_request(invite, stranger.identity, now_ms=int(time.time() * 1000))
    forged.proof = bytes(32)  # does not know the secret
    async with PeerClient(grpc_address(admin), trust=stranger) as client:
        with pytest.raises(PermissionDenied, match="prove"):
            await client.join(forged)
        fake_admin = MeshAuthority.generate()
        fake = fake_admin.revocations(version=99, revoked=[admin.node_id], now_ms=1)
        with pytest.raises(BadSignature, match="another mesh"):
            await client.push_revocations(fake)
    # The real invite was not used up by the forgery.
    await join_mesh(code, stranger, display_name="late", addresses=())
    assert stranger.mesh_id == admin.info["mesh_id"]
