"""`POST /v1/embeddings`, pure (issue 15 item 5): the parser (fuzzed: a request or a 400),
the wire, OpenAI's answer shape in float and base64."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.embeddings import EncodingFormat, embeddings_body, parse_embeddings_request
from mesh.errors import InvalidRequest, MeshError, RemoteProtocolError
from mesh.inference import Feature, Finished, FinishReason, InferenceRequest
from mesh.wire import codec

MAX = 1 << 20


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def test_a_string_or_a_list_of_strings() -> None:
    one = parse_embeddings_request(body(input="hello"), max_bytes=MAX)
    assert one.request.inputs == ("hello",)
    assert one.encoding is EncodingFormat.FLOAT
    many = parse_embeddings_request(
        body(input=["a", "b"], encoding_format="base64", dimensions=8, user="u"), max_bytes=MAX
    )
    assert many.request.inputs == ("a", "b")
    assert many.request.dimensions == 8
    assert many.encoding is EncodingFormat.BASE64
    assert many.request.needs() == ((Feature.EMBEDDINGS, "input"),)
    assert codec.request_from_pb(codec.request_to_pb(many.request)) == many.request


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": [1, 2, 3]}, "input"),  # token arrays
        ({"input": [[1, 2]]}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": ["a"] * 2049}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
        ({"input": "a", "model": 3}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings_request(body(**fields), max_bytes=MAX)
    assert info.value.param == param


def test_the_answer_in_float_and_in_base64() -> None:
    request = parse_embeddings_request(body(input=["a", "b"]), max_bytes=MAX).request
    vectors = ((0.5, -0.25, 1.0), (0.0, 0.125, -1.0))
    finished = Finished(
        reason=FinishReason.STOP, prompt_tokens=4, completion_tokens=0, embeddings=vectors
    )
    # What a peer's answer looks like after the wire.
    served = codec.event_from_pb(codec.event_to_pb(finished, _served()))
    assert isinstance(served, Finished)
    assert served.embeddings == vectors
    plain = embeddings_body(request, served, model="m", encoding=EncodingFormat.FLOAT)
    assert plain["object"] == "list"
    assert [d["embedding"] for d in plain["data"]] == [list(v) for v in vectors]
    assert [d["index"] for d in plain["data"]] == [0, 1]
    assert plain["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    packed = embeddings_body(request, served, model="m", encoding=EncodingFormat.BASE64)
    for entry, vector in zip(packed["data"], vectors, strict=True):
        raw = base64.b64decode(entry["embedding"])
        assert struct.unpack(f"<{len(raw) // 4}f", raw) == vector


def test_a_wrong_number_of_vectors_is_a_protocol_error() -> None:
    request = InferenceRequest(model="m", inputs=("a", "b"))
    for vectors in [((1.0,),), ((1.0,), (1.0, 2.0)), ((), ()), ((1.0,), (float("nan"),))]:
        finished = Finished(
            reason=FinishReason.STOP, prompt_tokens=1, completion_tokens=0, embeddings=vectors
        )
        with pytest.raises(RemoteProtocolError):
            embeddings_body(request, finished, model="m", encoding=EncodingFormat.FLOAT)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 40), 1 << 40)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=6) | json_values,
        "input": st.text(max_size=8) | st.lists(st.text(max_size=5), max_size=3) | json_values,
        "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
        "dimensions": st.integers(-2, 5000) | json_values,
        "user": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(data=shaped)
def test_any_json_gives_a_request_or_a_400(data: dict[str, Any]) -> None:
    try:
        parsed = parse_embeddings_request(json.dumps(data).encode(), max_bytes=MAX)
    except MeshError as exc:
        error: MeshError = exc
    else:
        assert parsed.request.inputs
        return
    assert isinstance(error, InvalidRequest)
    assert error.http_status == 400


def _served() -> Any:
    from mesh.inference import Route, ServedBy

    return ServedBy(node_id="n", route=Route.LAN, model="m")
