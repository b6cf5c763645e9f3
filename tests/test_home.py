"""The data directory: where it is, and the run file a running node publishes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from node.store.home import HOME_ENV, Home

INFO = {"http_url": "http://127.0.0.1:8470", "grpc_address": "127.0.0.1:8471", "pid": 4242}


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home.resolve(tmp_path / "home")
    home.ensure()
    return home


def test_resolve_with_an_explicit_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "from-env"))
    home = Home.resolve(tmp_path / "explicit")
    assert home.root == tmp_path / "explicit"  # explicit beats the environment
    assert home.identity_key == tmp_path / "explicit" / "identity.key"
    assert home.config_file == tmp_path / "explicit" / "config.toml"
    assert home.run_file == tmp_path / "explicit" / "run" / "node.json"


def test_resolve_makes_relative_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Home.resolve("rel/home").root == tmp_path / "rel" / "home"


def test_resolve_expands_the_user_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Home.resolve("~/boxes/a").root == tmp_path / "boxes" / "a"


def test_resolve_with_allerac_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "from-env"))
    assert Home.resolve().root == tmp_path / "from-env"
    assert Home.resolve(None).root == tmp_path / "from-env"
    assert Home.resolve("").root == tmp_path / "from-env"


def test_resolve_without_allerac_home_uses_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Home.resolve().root == tmp_path / "xdg" / "allerac"


def test_ensure_creates_private_directories(tmp_path: Path) -> None:
    home = Home.resolve(tmp_path / "new" / "home")
    home.ensure()
    home.ensure()  # idempotent
    assert home.run_dir.is_dir()
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.run_dir.stat().st_mode) == 0o700


def test_ensure_reports_an_unusable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create data dir"):
        Home.resolve(blocker / "home").ensure()


def test_run_info_round_trip_with_0600(home: Home) -> None:
    home.write_run_info(INFO)
    assert home.read_run_info() == INFO
    assert stat.S_IMODE(home.run_file.stat().st_mode) == 0o600
    assert [p.name for p in home.run_dir.iterdir()] == ["node.json"]  # no temp file left


def test_run_info_is_replaced_not_appended(home: Home) -> None:
    home.write_run_info(INFO)
    newer = {**INFO, "pid": 5000, "http_url": "http://127.0.0.1:9000"}
    home.write_run_info(newer)
    assert home.read_run_info() == newer


def test_missing_run_info_says_to_start_a_node(home: Home) -> None:
    with pytest.raises(ConfigError, match="allerac up") as info:
        home.read_run_info()
    assert str(home.root) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'"http://x"',
        b'{"pid": 1}',
        b'{"http_url": 8470}',
    ],
    ids=["bad-json", "empty", "not-utf8", "array", "string", "no-url", "url-not-string"],
)
def test_corrupt_run_info_is_a_config_error(home: Home, data: bytes) -> None:
    home.run_file.write_bytes(data)
    with pytest.raises(ConfigError, match="corrupt"):
        home.read_run_info()


def test_deeply_nested_run_info_is_a_config_error(home: Home) -> None:
    home.run_file.write_bytes(b"[" * 50_000)
    with pytest.raises(ConfigError, match="corrupt"):
        home.read_run_info()


def test_clear_run_info_removes_our_own_file(home: Home) -> None:
    home.write_run_info(INFO)
    home.clear_run_info(4242)
    assert not home.run_file.exists()


def test_clear_run_info_keeps_a_newer_nodes_file(home: Home) -> None:
    home.write_run_info(INFO)
    home.clear_run_info(1111)
    assert home.read_run_info() == INFO


@pytest.mark.parametrize("data", [b"{broken", b'["pid", 4242]', b'{"pid": "4242"}'])
def test_clear_run_info_leaves_unrecognised_files(home: Home, data: bytes) -> None:
    home.run_file.write_bytes(data)
    home.clear_run_info(4242)
    assert home.run_file.read_bytes() == data


def test_clear_run_info_without_a_file_is_quiet(home: Home) -> None:
    home.clear_run_info(4242)
    assert not home.run_file.exists()
