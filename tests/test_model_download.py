"""`allerac models pull`'s download, against a local server: resume after an interruption
(HTTP Range), checksum, non-GGUF answers, disk space."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mesh.errors import InvalidRequest
from node.transport import model_download
from node.transport.model_download import DownloadFailed, download_model, file_name
from tests.model_server import model_server

MODEL = b"GGUF" + bytes(range(256)) * 4096  # a megabyte that starts like a GGUF file
SHA = hashlib.sha256(MODEL).hexdigest()


async def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    with model_server({"/m.gguf": MODEL}, cut_after={"/m.gguf": 300_000}) as server:
        with pytest.raises(DownloadFailed, match="run the same command again to resume"):
            await download_model(f"{server.url}/m.gguf", directory=tmp_path, sha256=SHA)
        part = tmp_path / "m.gguf.part"
        assert part.stat().st_size == 300_000
        assert not (tmp_path / "m.gguf").exists()
        done = await download_model(f"{server.url}/m.gguf", directory=tmp_path, sha256=SHA)
    assert server.ranges == [None, "bytes=300000-"]
    assert done.resumed_from == 300_000
    assert done.path.read_bytes() == MODEL
    assert done.sha256 == SHA
    assert not part.exists()
    assert os.stat(done.path).st_mode & 0o777 == 0o600


async def test_a_wrong_checksum_deletes_the_file_and_says_both_digests(tmp_path: Path) -> None:
    wrong = "0" * 64
    with model_server({"/m.gguf": MODEL}) as server:
        with pytest.raises(DownloadFailed, match=f"expected SHA-256 {wrong}, got {SHA}"):
            await download_model(f"{server.url}/m.gguf", directory=tmp_path, sha256=wrong)
    assert os.listdir(tmp_path) == []


async def test_a_web_page_is_refused_at_its_first_bytes(tmp_path: Path) -> None:
    with model_server({"/m.gguf": b"<html>not found</html>" * 1000}) as server:
        with pytest.raises(DownloadFailed, match="not a GGUF model file"):
            await download_model(f"{server.url}/m.gguf", directory=tmp_path)
    assert os.listdir(tmp_path) == []


async def test_a_missing_file_is_the_servers_status(tmp_path: Path) -> None:
    with model_server({}) as server:
        with pytest.raises(DownloadFailed, match="answered 404"):
            await download_model(f"{server.url}/nothing.gguf", directory=tmp_path)


async def test_too_little_disk_space_stops_before_a_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_download, "FREE_SPACE_MARGIN_BYTES", 1 << 62)
    with model_server({"/m.gguf": MODEL}) as server:
        with pytest.raises(DownloadFailed, match="not enough disk space"):
            await download_model(f"{server.url}/m.gguf", directory=tmp_path)
    assert os.listdir(tmp_path) == []


async def test_a_complete_part_is_renamed_without_downloading_again(tmp_path: Path) -> None:
    (tmp_path / "m.gguf.part").write_bytes(MODEL)
    with model_server({"/m.gguf": MODEL}) as server:
        done = await download_model(f"{server.url}/m.gguf", directory=tmp_path, sha256=SHA)
    assert server.ranges == [f"bytes={len(MODEL)}-"]
    assert done.path.read_bytes() == MODEL


async def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="http:// or https://"):
        await download_model("ftp://example.net/m.gguf", directory=tmp_path)
    with pytest.raises(InvalidRequest, match="64 hexadecimal digits"):
        await download_model("http://127.0.0.1:1/m.gguf", directory=tmp_path, sha256="abc")
    assert file_name("http://h/x/My Model.Q4.gguf?x=1", None) == "My-Model.Q4.gguf"
    assert file_name("http://h/x/y", "tiny") == "tiny.gguf"
    with pytest.raises(InvalidRequest, match="--name"):
        file_name("http://h/", None)
