"""The sealed backup file: a passphrase-encrypted, authenticated stream, versioned.

How it works. The passphrase goes through scrypt (RFC 7914) with a random 16-byte salt;
the 64 bytes it yields are a ChaCha20-Poly1305 key (RFC 8439) and a key that checks the
passphrase. The file is:

    header  "ALLERAC-BACKUP" | format (1) | kdf (1 = scrypt) | log2 N | r | p | salt (16)
            | nonce prefix (7) | chunk size (4, big-endian)
    check   HMAC-SHA256(check key, header)          -> "wrong passphrase" before anything
    chunks  ChaCha20-Poly1305(key, nonce = prefix | chunk number (4) | last (1),
                              chunk, associated data = header)

The plaintext is cut into chunks of `chunk size` bytes, each sealed on its own (the STREAM
construction of Hoang, Reyhanitabar, Rogaway and Vizár, as in age and Tink): the chunk
number in the nonce detects reordered or dropped chunks, the last-chunk flag detects a file
cut short, and the header is authenticated with every chunk, so no byte of the file can
change unnoticed. A file that is not a backup, comes from a newer format, was made with
another passphrase, or was damaged is a `BackupError` saying which; nothing is returned
from a chunk that does not authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mesh.errors import BackupError

MAGIC = b"ALLERAC-BACKUP"
FORMAT = 1
KDF_SCRYPT = 1
SALT_BYTES = 16
PREFIX_BYTES = 7
TAG_BYTES = 16
CHECK_BYTES = 32
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20
_HEADER = struct.Struct(f">{len(MAGIC)}sBBBBB{SALT_BYTES}s{PREFIX_BYTES}sI")
MIN_PASSPHRASE_CHARS = 8


@dataclass(frozen=True, kw_only=True)
class ScryptCost:
    """scrypt's cost: N = 2**log2_n, r, p. The default takes about 0.3 s and 128 MiB
    (OWASP's recommendation for scrypt is N=2**17, r=8, p=1); what a file may ask for is
    bounded, so a crafted header cannot make a restore take gigabytes."""

    log2_n: int = 17
    r: int = 8
    p: int = 1

    def check(self) -> None:
        if not (10 <= self.log2_n <= 20 and 1 <= self.r <= 16 and 1 <= self.p <= 4):
            raise BackupError(
                f"the backup asks for a key derivation cost out of bounds "
                f"(N=2**{self.log2_n}, r={self.r}, p={self.p}); it is damaged"
            )


def _keys(passphrase: str, salt: bytes, cost: ScryptCost) -> tuple[bytes, bytes]:
    derived = Scrypt(salt=salt, length=64, n=1 << cost.log2_n, r=cost.r, p=cost.p).derive(
        passphrase.encode("utf-8")
    )
    return derived[:32], derived[32:]


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise BackupError(
            f"the passphrase must be at least {MIN_PASSPHRASE_CHARS} characters: the backup "
            "holds the node's keys and the mesh key"
        )


def _nonce(prefix: bytes, number: int, *, last: bool) -> bytes:
    return prefix + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class SealingWriter:
    """A write-only binary stream that seals what is written into `sink`. `close()`
    seals the last chunk; without it the file is incomplete (and reads as damaged)."""

    def __init__(
        self,
        sink: BinaryIO,
        passphrase: str,
        *,
        cost: ScryptCost | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        check_passphrase(passphrase)
        cost = cost or ScryptCost()
        cost.check()
        salt = os.urandom(SALT_BYTES)
        self._prefix = os.urandom(PREFIX_BYTES)
        self._header = _HEADER.pack(
            MAGIC, FORMAT, KDF_SCRYPT, cost.log2_n, cost.r, cost.p, salt, self._prefix, chunk_bytes
        )
        key, check_key = _keys(passphrase, salt, cost)
        self._aead = ChaCha20Poly1305(key)
        self._sink = sink
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        self._number = 0
        self._closed = False
        sink.write(self._header + hmac.new(check_key, self._header, hashlib.sha256).digest())

    def write(self, data: bytes) -> int:
        if self._closed:
            raise ValueError("write to a closed backup")
        self._buffer += data
        while len(self._buffer) > self._chunk_bytes:  # keep one chunk back: it may be last
            self._seal(bytes(self._buffer[: self._chunk_bytes]), last=False)
            del self._buffer[: self._chunk_bytes]
        return len(data)

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        nonce = _nonce(self._prefix, self._number, last=last)
        self._sink.write(self._aead.encrypt(nonce, chunk, self._header))
        self._number += 1

    def close(self) -> None:
        if not self._closed:
            self._seal(bytes(self._buffer), last=True)
            self._buffer.clear()
            self._closed = True


@dataclass(frozen=True)
class OpenedHeader:
    """A backup's header whose passphrase checked: what opens its chunks."""

    header: bytes
    aead: ChaCha20Poly1305
    prefix: bytes
    chunk_bytes: int


def read_header(source: BinaryIO, passphrase: str) -> OpenedHeader:
    """Check the header and the passphrase (the one slow step: scrypt)."""
    header = source.read(_HEADER.size)
    if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
        raise BackupError("this is not an Allerac backup file")
    if len(header) < _HEADER.size:
        raise BackupError("the backup is cut short (its header is incomplete)")
    _, version, kdf, log2_n, r, p, salt, prefix, chunk_bytes = _HEADER.unpack(header)
    if version != FORMAT or kdf != KDF_SCRYPT:
        raise BackupError(
            f"the backup is format {version} (key derivation {kdf}); this version of Allerac "
            f"reads format {FORMAT}: restore it with a newer allerac"
        )
    cost = ScryptCost(log2_n=log2_n, r=r, p=p)
    cost.check()
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise BackupError("the backup's header is damaged (chunk size out of bounds)")
    check = source.read(CHECK_BYTES)
    key, check_key = _keys(passphrase, salt, cost)
    if not hmac.compare_digest(check, hmac.new(check_key, header, hashlib.sha256).digest()):
        raise BackupError("wrong passphrase (or the backup's header is damaged)")
    return OpenedHeader(header, ChaCha20Poly1305(key), prefix, chunk_bytes)


def unseal(source: BinaryIO, sink: BinaryIO | None, passphrase: str | OpenedHeader) -> int:
    """Authenticate the whole of `source`, writing the plaintext to `sink` (None: only
    check it). Returns the plaintext's size; raises BackupError at the first bad chunk.
    Given the `OpenedHeader` of an earlier read of the same file, no key is derived again."""
    if isinstance(passphrase, OpenedHeader):
        opened = passphrase
        if source.read(_HEADER.size + CHECK_BYTES)[: _HEADER.size] != opened.header:
            raise BackupError("the backup changed while it was read; nothing was restored")
    else:
        opened = read_header(source, passphrase)
    sealed_bytes = opened.chunk_bytes + TAG_BYTES
    offset = _HEADER.size + CHECK_BYTES
    number, total = 0, 0
    current = source.read(sealed_bytes)
    while True:
        following = source.read(sealed_bytes) if len(current) == sealed_bytes else b""
        last = not following
        if len(current) < TAG_BYTES:
            raise BackupError(f"the backup is cut short at byte {offset}; nothing was restored")
        nonce = _nonce(opened.prefix, number, last=last)
        try:
            chunk = opened.aead.decrypt(nonce, current, opened.header)
        except InvalidTag as exc:
            where = "is damaged or cut short" if last else "is damaged"
            raise BackupError(
                f"the backup {where} (chunk {number}, at byte {offset} does not authenticate); "
                "nothing was restored"
            ) from exc
        if sink is not None:
            sink.write(chunk)
        total += len(chunk)
        if last:
            return total
        offset += len(current)
        number += 1
        current = following
