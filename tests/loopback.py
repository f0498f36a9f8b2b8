"""A loopback HTTP server for the download tests: PAYLOAD at /file.bin, Range requests honoured unless told
otherwise, a 500 at /error, and a connection that can break mid-transfer. The ``server`` fixture is in conftest."""

from __future__ import annotations

import hashlib
import http.server
from pathlib import Path

import numpy as np

PAYLOAD = np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin (honouring "Range: bytes=N-" unless told not to) and a 500 at /error."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        if self.path != "/file.bin":
            self.send_error(500 if self.path == "/error" else 404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and state["honour_range"]:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state["drop_after"]:  # the connection breaks mid-transfer
            body = body[:state["drop_after"]]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")
