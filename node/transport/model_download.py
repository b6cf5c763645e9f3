"""Downloading a model file over HTTP(S) into the node's `models/` directory
(`allerac models pull URL`).

How it works:
- The bytes go to `NAME.part` beside the final file (0600, in a 0700 directory). When a
  `.part` is already there (an earlier pull was interrupted), the download asks for the
  rest with `Range: bytes=N-` (RFC 9110 section 14.2) and appends what a `206` brings,
  after checking that its `Content-Range` starts at N (section 14.4); a server that
  ignores ranges (`200`) is downloaded again from the start. A `416` whose
  `Content-Range: bytes */LENGTH` equals what is held means the file was complete.
- Before a byte is written, the free space in the directory must hold the rest of the
  file (its length from `Content-Length`, or from `Content-Range` when resuming) plus a
  margin; otherwise nothing starts.
- The first bytes must be GGUF's magic: a server answering with a web page is refused at
  once instead of after gigabytes.
- The SHA-256 is computed as the bytes arrive (over the resumed part first). A file that
  does not match `--sha256` is deleted (resuming from wrong bytes could never match); a
  matching or unchecked one is renamed into place.
- An interrupted transfer (connection lost, server silent past `READ_TIMEOUT_S`) keeps the
  `.part` and says to run the same command again.
aiohttp is already the node's HTTP library (server and upstream client); it does ranges,
redirects and timeouts, which is all a download needs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp

from mesh.errors import InvalidRequest, MeshError
from node.store.model_files import GGUF_MAGIC

CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 60.0
FREE_SPACE_MARGIN_BYTES = 64 << 20  # left free after the download, for the node's own files
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_FILE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE_RE = re.compile(r"^bytes \*/(\d+)$")


class DownloadFailed(MeshError):
    """A download that did not end with a usable file (the message says what to do)."""

    code = "download_failed"


@dataclass(frozen=True, kw_only=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes that were already there from an earlier, interrupted pull
    already_there: bool = False


# Told the total (None: unknown) and what is already held, then each new chunk's size.
Progress = Callable[[int | None, int], Callable[[int], None]]


def _no_progress(total: int | None, held: int) -> Callable[[int], None]:
    return lambda n: None


def check_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"not an http:// or https:// URL: {url[:200]!r}", param="url")
    return parts


def file_name(url: str, name: str | None) -> str:
    """Where in `models/` the file goes: NAME.gguf, or the URL's last path segment."""
    stem = (
        name if name is not None else urllib.parse.unquote(check_url(url).path.rsplit("/", 1)[-1])
    )
    cleaned = _FILE_NAME_RE.sub("-", stem).strip(".-")[:120]
    if not cleaned:
        raise InvalidRequest(
            f"cannot take a file name from {url[:200]!r}; give one with --name", param="name"
        )
    return cleaned if cleaned.lower().endswith(".gguf") else f"{cleaned}.gguf"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed + FREE_SPACE_MARGIN_BYTES > free:
        raise DownloadFailed(
            f"not enough disk space in {directory}: the download needs {needed:,} bytes "
            f"(and {FREE_SPACE_MARGIN_BYTES >> 20} MiB to spare), {free:,} are free"
        )


class PartFile:
    """The `.part` file a download writes (0600), and what it holds so far. Its calls are
    small blocking file operations, made between network reads."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.path = final.with_name(final.name + ".part")
        self._out: BinaryIO | None = None

    def held(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def open(self, *, append: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._out = os.fdopen(os.open(self.path, flags, 0o600), "ab" if append else "wb")

    def write(self, chunk: bytes) -> None:
        assert self._out is not None
        self._out.write(chunk)

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            out.flush()
            os.fsync(out.fileno())
            out.close()

    def held_final(self) -> int:
        return self.final.stat().st_size

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def finish(self, expected_sha256: str | None, url: str) -> str:
        """Check the whole file's SHA-256 and rename it into place; returns the digest."""
        self.close()
        digest = _sha256_of(self.path)
        if expected_sha256 is not None and digest != expected_sha256:
            self.discard()
            raise DownloadFailed(
                f"checksum mismatch for {url}: expected SHA-256 {expected_sha256}, got "
                f"{digest}; the downloaded file was deleted"
            )
        os.replace(self.path, self.final)
        return digest


def prepare(url: str, *, directory: Path, name: str | None, sha256: str | None) -> PartFile:
    """Check the arguments and make the directory; the file the download will write."""
    check_url(url)
    if sha256 is not None and not SHA256_RE.match(sha256):
        raise InvalidRequest("--sha256 must be 64 hexadecimal digits", param="sha256")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return PartFile(directory / file_name(url, name))


def already_there(part: PartFile, sha256: str | None) -> Downloaded | None:
    """The final file, when an earlier pull completed it (and it has the right digest)."""
    if not part.final.exists():
        return None
    digest = _sha256_of(part.final)
    if sha256 is not None and digest != sha256.lower():
        raise DownloadFailed(
            f"{part.final} already exists with another SHA-256 ({digest}); remove it or "
            "choose another --name"
        )
    size = part.final.stat().st_size
    return Downloaded(path=part.final, size=size, sha256=digest, resumed_from=0, already_there=True)


async def download_model(
    url: str,
    *,
    directory: Path,
    name: str | None = None,
    sha256: str | None = None,
    progress: Progress = _no_progress,
) -> Downloaded:
    """Download `url` into `directory` (resuming an interrupted download); see the module
    docstring for every check."""
    part = prepare(url, directory=directory, name=name, sha256=sha256)
    done = already_there(part, sha256)
    if done is not None:
        return done
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            resumed_from = await _fetch(session, url, part, progress)
    except (aiohttp.ClientError, TimeoutError) as exc:
        part.close()
        raise DownloadFailed(
            f"the download from {url} was interrupted after {part.held():,} bytes "
            f"({type(exc).__name__}: {exc}); run the same command again to resume"
        ) from exc
    except BaseException:
        part.close()
        raise
    digest = part.finish(sha256.lower() if sha256 is not None else None, url)
    return Downloaded(
        path=part.final, size=part.held_final(), sha256=digest, resumed_from=resumed_from
    )


async def _fetch(
    session: aiohttp.ClientSession, url: str, part: PartFile, progress: Progress
) -> int:
    """Bring the part file to the whole file; returns how many bytes were there before."""
    held = part.held()
    headers = {"Range": f"bytes={held}-"} if held else {}
    async with session.get(url, headers=headers) as response:
        if response.status == 416 and held:
            match = _UNSATISFIED_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if match is not None and int(match.group(1)) == held:
                return held  # it was all there: the earlier pull ended just before renaming
            part.discard()  # longer than the file: start again
            return await _fetch(session, url, part, progress)
        if response.status == 206 and held:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != held:
                raise DownloadFailed(
                    f"{url} answered a range request with Content-Range "
                    f"{response.headers.get('Content-Range')!r}, not from byte {held}"
                )
            total = None if match.group(3) == "*" else int(match.group(3))
        elif response.status == 200:
            held = 0  # no range support (or nothing held): from the start
            total = response.content_length
        else:
            raise DownloadFailed(f"{url} answered {response.status} {response.reason or ''}")
        if total is not None:
            _check_space(part.path.parent, total - held)
        advance = progress(total, held)
        part.open(append=held > 0)
        written = held
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            if written == 0 and not chunk.startswith(GGUF_MAGIC[: len(chunk)]):
                part.discard()
                raise DownloadFailed(
                    f"{url} is not a GGUF model file (it starts with {chunk[:16]!r}; "
                    f"Content-Type {response.headers.get('Content-Type', 'none')!r})"
                )
            part.write(chunk)
            written += len(chunk)
            advance(len(chunk))
        part.close()
        if total is not None and written != total:
            raise DownloadFailed(
                f"the download from {url} ended after {written:,} of {total:,} bytes; run the "
                "same command again to resume"
            )
        return held
