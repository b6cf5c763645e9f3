"""The v1 wire contract: protobuf <-> domain conversions and signed node cards."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import PROTOCOL_VERSION
from mesh.errors import (
    InvalidRequest,
    MeshError,
    RemoteProtocolError,
    UnsupportedProtocol,
)
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    ModelInfo,
    Route,
    Sampling,
    ServedBy,
    TextDelta,
)
from mesh.trust.cards import (
    CARD_SIGNATURE_CONTEXT,
    MAX_CARD_BYTES,
    HardwareSummary,
    open_card,
    sign_card,
)
from mesh.trust.enckeys import KeyPair
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role
from mesh.wire.codec import (
    check_protocol_version,
    event_from_pb,
    event_to_pb,
    parse_infer_request,
    request_from_pb,
    request_to_pb,
)
from mesh.wire.v1 import node_pb2 as pb

FULL_SAMPLING = Sampling(
    max_tokens=128, temperature=0.5, top_p=0.25, seed=-(1 << 62), stop=("\n\n", "END")
)
CHAT = InferenceRequest(
    model="smollm2-135m-instruct",
    messages=(
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="héllo ☃"),
        ChatMessage(role="assistant", content=""),
    ),
    user="alice",
)
COMPLETION = InferenceRequest(model="default", prompt="Once upon a time")


def with_sampling(request: InferenceRequest, sampling: Sampling) -> InferenceRequest:
    return InferenceRequest(
        model=request.model,
        messages=request.messages,
        prompt=request.prompt,
        sampling=sampling,
        request_id=request.request_id,
        user=request.user,
    )


@pytest.mark.parametrize("request_", [CHAT, COMPLETION], ids=["chat", "completion"])
@pytest.mark.parametrize(
    "sampling",
    [
        FULL_SAMPLING,
        Sampling(),
        Sampling(max_tokens=1),
        Sampling(temperature=0.0, top_p=1.0, seed=0),
    ],
    ids=["all", "none", "max-tokens-only", "zeros"],
)
def test_request_round_trip(request_: InferenceRequest, sampling: Sampling) -> None:
    original = with_sampling(request_, sampling)
    wire = request_to_pb(original).SerializeToString()
    back = parse_infer_request(wire)
    assert back == original
    assert back.request_id == original.request_id


def test_absent_sampling_fields_come_back_as_none() -> None:
    back = request_from_pb(request_to_pb(with_sampling(CHAT, Sampling(seed=7))))
    assert back.sampling.max_tokens is None
    assert back.sampling.temperature is None
    assert back.sampling.top_p is None
    assert back.sampling.seed == 7
    assert back.sampling.stop == ()


def test_a_locally_valid_top_p_survives_the_wire() -> None:
    original = with_sampling(COMPLETION, Sampling(top_p=1e-46))
    back = request_from_pb(request_to_pb(original))
    assert back.sampling.top_p is not None
    assert back.sampling.top_p > 0


def test_zero_valued_sampling_fields_are_not_mistaken_for_absent() -> None:
    back = request_from_pb(request_to_pb(with_sampling(CHAT, Sampling(temperature=0.0, seed=0))))
    assert back.sampling.temperature == 0.0
    assert back.sampling.seed == 0


def test_empty_prompt_is_still_a_completion() -> None:
    request = InferenceRequest(model="m", prompt="")
    back = parse_infer_request(request_to_pb(request).SerializeToString())
    assert back == request
    assert not back.is_chat


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32 - 1])
def test_wrong_protocol_version(version: int) -> None:
    with pytest.raises(UnsupportedProtocol) as info:
        check_protocol_version(version)
    assert info.value.grpc_status == "FAILED_PRECONDITION"
    check_protocol_version(PROTOCOL_VERSION)


def test_missing_input() -> None:
    message = request_to_pb(CHAT)
    message.ClearField("chat")
    with pytest.raises(InvalidRequest, match="neither chat messages, a prompt nor inputs") as info:
        request_from_pb(message)
    assert type(info.value) is InvalidRequest


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "model", ""),
        lambda m: setattr(m, "request_id", "not-hex"),
        lambda m: setattr(m.chat.messages[0], "role", "tool"),
        lambda m: setattr(m.sampling, "temperature", float("nan")),
        lambda m: setattr(m.sampling, "top_p", 0.0),
        lambda m: setattr(m.sampling, "max_tokens", 0),
        lambda m: m.sampling.stop.extend(["a", "b", "c"]),
        lambda m: m.chat.ClearField("messages"),
    ],
    ids=["no-model", "bad-id", "bad-role", "nan-temp", "zero-top-p", "zero-max", "stops", "empty"],
)
def test_invalid_domain_values_from_the_wire(mutate: object) -> None:
    message = request_to_pb(with_sampling(CHAT, FULL_SAMPLING))
    mutate(message)  # type: ignore[operator]
    with pytest.raises(InvalidRequest):
        parse_infer_request(message.SerializeToString())


def test_oversized_message_is_rejected_unparsed() -> None:
    with pytest.raises(InvalidRequest, match="limit"):
        parse_infer_request(b"\x00" * (4 * 1024 * 1024 + 1))


SERVED = ServedBy(node_id="N" * 63, route=Route.LAN, model="canon")


@pytest.mark.parametrize(
    "event",
    [
        TextDelta("hello ☃"),
        TextDelta(""),
        Finished(reason=FinishReason.STOP, prompt_tokens=12, completion_tokens=3),
        Finished(reason=FinishReason.LENGTH, prompt_tokens=0, completion_tokens=2048),
        Finished(reason=FinishReason.CANCELLED, prompt_tokens=5, completion_tokens=0),
    ],
)
def test_event_round_trip(event: TextDelta | Finished) -> None:
    message = event_to_pb(event, SERVED)
    back = event_from_pb(pb.InferEvent.FromString(message.SerializeToString()))
    assert back == event


def test_finish_event_carries_who_served() -> None:
    finished = Finished(reason=FinishReason.STOP, prompt_tokens=1, completion_tokens=1)
    message = event_to_pb(finished, SERVED)
    assert message.finish.served_by == SERVED.node_id
    assert message.finish.route == "lan"
    assert message.finish.model == "canon"


@pytest.mark.parametrize(
    "message",
    [
        pb.InferEvent(),
        pb.InferEvent(finish=pb.Finish(reason=pb.FINISH_REASON_UNSPECIFIED)),
        pb.InferEvent(finish=pb.Finish(reason=99)),  # type: ignore[arg-type]
    ],
    ids=["empty", "unspecified-reason", "unknown-reason"],
)
def test_bad_events_are_remote_protocol_errors(message: pb.InferEvent) -> None:
    with pytest.raises(RemoteProtocolError):
        event_from_pb(message)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=300)
    | st.builds(
        lambda prefix, tail: prefix + tail,
        st.sampled_from([b"\x08\x01\x12", b"\x08\x01", b""]),
        st.binary(max_size=200),
    )
)
def test_parse_infer_request_on_arbitrary_bytes(data: bytes) -> None:
    try:
        result = parse_infer_request(data)
    except MeshError as exc:
        error = exc
    else:
        assert isinstance(result, InferenceRequest)
        return
    assert isinstance(error, InvalidRequest)


# --- node cards -----------------------------------------------------------------------------

IDENTITY = Identity.generate()
MODELS = [
    ModelInfo(
        name="smollm2-135m-instruct",
        aliases=("default",),
        family="llama",
        parameter_count=135_000_000,
        quantization="Q4_1",
        context_length=2048,
        backend="llama_cpp",
        tokens_per_second=41.5,
    )
]
AUTHORITY = MeshAuthority.generate()
KEYS = KeyPair.generate(IDENTITY, now_ms=1_700_000_000_000, lifetime_ms=86_400_000)
SIGNED = sign_card(
    IDENTITY,
    membership=AUTHORITY.issue(
        IDENTITY.public_key_raw, role=Role.MEMBER, now_ms=1_700_000_000_000, ttl_ms=86_400_000
    ),
    encryption_keys=KEYS.signed,
    mesh_id=AUTHORITY.mesh_id,
    models=MODELS,
    grpc_addresses=["192.168.1.20:8471"],
    display_name="kitchen-box",
    now_ms=1_700_000_000_000,
    hardware=HardwareSummary(
        cpu_count=4, cpu_model="Cortex-A76", memory_bytes=8 << 30, profile="home"
    ),
)


def test_signed_card_opens_and_says_who_signed() -> None:
    card = open_card(pb.SignedCard.FromString(SIGNED.SerializeToString()))
    assert card.node_id == IDENTITY.node_id
    assert card.identity_public_key == IDENTITY.public_key_raw
    assert card.protocol_version == PROTOCOL_VERSION
    assert card.display_name == "kitchen-box"
    assert list(card.grpc_addresses) == ["192.168.1.20:8471"]
    assert card.issued_at_unix_ms == 1_700_000_000_000
    assert card.tier == pb.TIER_HOME
    assert [m.name for m in card.models] == ["smollm2-135m-instruct"]
    assert list(card.models[0].aliases) == ["default"]
    assert card.models[0].tokens_per_second == 41.5
    assert (card.hardware.cpu_count, card.hardware.cpu_model) == (4, "Cortex-A76")
    assert card.hardware.memory_bytes == 8 << 30
    assert card.hardware.profile == "home"  # since protocol 4


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]


def test_any_changed_card_byte_is_rejected() -> None:
    positions = range(0, len(SIGNED.card), 3)
    assert len(positions) > 20
    for position in positions:
        tampered = pb.SignedCard(card=_flip(SIGNED.card, position), signature=SIGNED.signature)
        with pytest.raises(RemoteProtocolError):
            open_card(tampered)


def test_any_changed_signature_byte_is_rejected() -> None:
    assert len(SIGNED.signature) == 64
    for position in range(len(SIGNED.signature)):
        for mask in (0x01, 0x80):
            signature = bytearray(SIGNED.signature)
            signature[position] ^= mask
            tampered = pb.SignedCard(card=SIGNED.card, signature=bytes(signature))
            with pytest.raises(RemoteProtocolError, match="signature"):
                open_card(tampered)


def test_truncated_or_missing_signature_is_rejected() -> None:
    for signature in (b"", SIGNED.signature[:-1], SIGNED.signature + b"\x00"):
        with pytest.raises(RemoteProtocolError):
            open_card(pb.SignedCard(card=SIGNED.card, signature=signature))


def _signed_raw(card: pb.NodeCard, identity: Identity, *, context: bytes) -> pb.SignedCard:
    data = card.SerializeToString(deterministic=True)
    return pb.SignedCard(card=data, signature=identity.sign(context + data))


def test_card_whose_node_id_does_not_match_its_key_is_rejected() -> None:
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=Identity.generate().node_id,  # someone else's ID, validly signed
        identity_public_key=IDENTITY.public_key_raw,
    )
    with pytest.raises(RemoteProtocolError, match="node ID does not match"):
        open_card(_signed_raw(card, IDENTITY, context=CARD_SIGNATURE_CONTEXT))


def test_card_signed_by_another_key_is_rejected() -> None:
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=IDENTITY.node_id,
        identity_public_key=IDENTITY.public_key_raw,
    )
    with pytest.raises(RemoteProtocolError, match="signature"):
        open_card(_signed_raw(card, Identity.generate(), context=CARD_SIGNATURE_CONTEXT))


def test_signature_without_the_card_context_is_rejected() -> None:
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=IDENTITY.node_id,
        identity_public_key=IDENTITY.public_key_raw,
    )
    # A signature over the bare bytes (e.g. made for another purpose) is not a card signature.
    with pytest.raises(RemoteProtocolError, match="signature"):
        open_card(_signed_raw(card, IDENTITY, context=b""))


def test_card_without_a_valid_key_is_rejected() -> None:
    for key in (b"", b"\x01" * 31, b"\x01" * 33):
        card = pb.NodeCard(node_id=IDENTITY.node_id, identity_public_key=key)
        with pytest.raises(RemoteProtocolError, match="identity key"):
            open_card(_signed_raw(card, IDENTITY, context=CARD_SIGNATURE_CONTEXT))


def test_oversized_card_is_rejected() -> None:
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=IDENTITY.node_id,
        identity_public_key=IDENTITY.public_key_raw,
        display_name="x" * MAX_CARD_BYTES,
    )
    with pytest.raises(RemoteProtocolError, match="limit"):
        open_card(_signed_raw(card, IDENTITY, context=CARD_SIGNATURE_CONTEXT))


@settings(max_examples=300, deadline=None)
@given(
    card=st.binary(max_size=300)
    | st.builds(
        lambda cut, tail: SIGNED.card[:cut] + tail,
        st.integers(min_value=0, max_value=len(SIGNED.card)),
        st.binary(max_size=40),
    ),
    signature=st.binary(max_size=80) | st.just(SIGNED.signature),
)
def test_open_card_on_arbitrary_bytes(card: bytes, signature: bytes) -> None:
    try:
        result = open_card(pb.SignedCard(card=card, signature=signature))
    except RemoteProtocolError:
        pass
    else:
        assert isinstance(result, pb.NodeCard)
        assert card == SIGNED.card
        assert signature == SIGNED.signature
