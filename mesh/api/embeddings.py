"""`POST /v1/embeddings` as pure functions: request bytes in, an `InferenceRequest` with
`inputs` out; the answer's vectors in, OpenAI's JSON out. Fuzzed like the chat parser
(`tests/test_embeddings.py`): any input gives a request or a `MeshError`.

Accepted: `model`, `input` (a string or an array of strings; token arrays are refused),
`encoding_format` (`float`, the default, or `base64`: the float32 values little-endian,
as OpenAI sends them), `dimensions` (only where the model allows it: the serving backend
says), `user`. An embeddings request reserves its prompt bound and one token of quota; its
record counts its prompt tokens.
"""

from __future__ import annotations

import base64
import enum
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from mesh.api.openai_api import _json_type, _model, _opt_int, _user, decode_json_body
from mesh.errors import InvalidRequest, RemoteProtocolError
from mesh.inference import Finished, InferenceRequest, Sampling


class EncodingFormat(enum.StrEnum):
    FLOAT = "float"
    BASE64 = "base64"


class ParsedEmbeddings(NamedTuple):
    request: InferenceRequest
    encoding: EncodingFormat


def parse_embeddings_request(body: bytes, *, max_bytes: int) -> ParsedEmbeddings:
    data = decode_json_body(body, max_bytes=max_bytes)
    model = _model(data)
    raw = data.get("input")
    if raw is None:
        raise InvalidRequest("input is required", param="input")
    if isinstance(raw, str):
        inputs: tuple[str, ...] = (raw,)
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs = tuple(raw)
    elif isinstance(raw, list) and raw and all(isinstance(item, int | list) for item in raw):
        raise InvalidRequest("token arrays are not supported as input: send text", param="input")
    else:
        raise InvalidRequest(
            f"input must be a string or an array of strings, not {_json_type(raw)}", param="input"
        )
    fmt = data.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(
            f"encoding_format must be float or base64, got {str(fmt)[:40]!r}",
            param="encoding_format",
        )
    request = InferenceRequest(
        model=model,
        inputs=inputs,
        dimensions=_opt_int(data, "dimensions"),
        # One token: the quota reserves what the prompt can be, and nothing is generated.
        sampling=Sampling(max_tokens=1),
        user=_user(data),
    )
    return ParsedEmbeddings(request, EncodingFormat(fmt))


def _encoded(vector: Sequence[float], encoding: EncodingFormat) -> list[float] | str:
    if encoding is EncodingFormat.BASE64:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def embeddings_body(
    request: InferenceRequest, finished: Finished, *, model: str, encoding: EncodingFormat
) -> dict[str, Any]:
    """OpenAI's embeddings list. A serving node that sent the wrong number of vectors, or
    vectors of mixed sizes, broke the protocol."""
    vectors = finished.embeddings
    sizes = {len(v) for v in vectors}
    if not all(math.isfinite(x) for vector in vectors for x in vector):
        raise RemoteProtocolError("the answer's embeddings hold values that are not numbers")
    if len(vectors) != len(request.inputs or ()) or len(sizes) != 1 or 0 in sizes:
        raise RemoteProtocolError(
            f"the answer holds {len(vectors)} embeddings of sizes {sorted(sizes)[:4]} for "
            f"{len(request.inputs or ())} inputs"
        )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encoded(vector, encoding)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": finished.prompt_tokens, "total_tokens": finished.prompt_tokens},
    }
