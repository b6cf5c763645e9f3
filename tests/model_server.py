"""A local HTTP server for model downloads in tests (never the internet): serves files from
memory, honours `Range: bytes=N-` with 206, and can cut a transfer short once."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class ModelServer:
    files: dict[str, bytes]
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, once
    ranges: list[str | None] = field(default_factory=list)  # the Range header of each GET
    url: str = ""

    def serve(self) -> Iterator[ModelServer]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                data = server.files.get(self.path)
                wanted = self.headers.get("Range")
                server.ranges.append(wanted)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = _RANGE.match(wanted or "")
                if match is not None:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(10)


@contextlib.contextmanager
def model_server(files: dict[str, bytes], **kwargs: object) -> Iterator[ModelServer]:
    yield from ModelServer(files, **kwargs).serve()  # type: ignore[arg-type]
