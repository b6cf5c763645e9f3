"""The embedded model, loaded once by the test worker's fork server (tests/launch.py) and
inherited by every node forked from it, instead of each node reading it again (~0.1 s of
CPU per node start, a hundred and more starts per run).

Imported by the fork server only (its PRELOAD). It loads the model the way a node does
(`_model_params`: the node's own parameters) and wraps llama.cpp's `load from file` so that
the first load of that same file with those same parameters in each forked process takes
the inherited model; any other load, and any second load in the same process (two
`[[models]]` entries on one file, a reload), reads the file as usual. The node's code path
is otherwise the one it runs in production: it owns the model it is handed and frees it
when it closes the model (in its own copy of the memory only).

Safe to fork because loading starts nothing: llama.cpp loads a model without threads (its
CPU work runs in OpenMP teams made only when a graph is computed, never in this server),
and the weights are a read-only mapping of the file. `ALLERAC_TEST_FORK=0` (the coverage
run) forks nothing, so every node then loads the model itself.
"""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as llama

from node.serving.backends.llama_cpp import _init_llama_backend, _model_params
from node.store.config_file import embedded_model_path

_load_from_file = llama.llama_model_load_from_file


def _preload() -> tuple[bytes, bytes, list[Any]]:
    _init_llama_backend()
    path = str(embedded_model_path()).encode()
    params = _model_params()
    model = _load_from_file(path, params)
    if not model:
        raise RuntimeError(f"the fork server could not load the embedded model {path!r}")
    return path, bytes(params), [model]


_PATH, _PARAMS, _inherited = _preload()


def _load_once(path: bytes, params: Any) -> Any:
    """llama.cpp's load, which hands out the inherited model once per process."""
    if _inherited and path == _PATH and bytes(params) == _PARAMS:
        return _inherited.pop()
    return _load_from_file(path, params)


llama.llama_model_load_from_file = _load_once
