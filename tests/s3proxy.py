"""A real HTTP gateway in front of radosgw that behaves like a worse S3 endpoint.

Some S3-compatible servers ignore ``If-None-Match`` / ``If-Match`` on PUT; Ceph 16 does
not, so to show the store refusing such an endpoint the tests put this gateway in front of
the real radosgw: it drops the conditional headers (``drop``), as such a server in effect
does, and forwards the request.  SigV4 signs those headers, so the gateway signs the
forwarded request again with botocore's own signer and the test user's keys; everything
else (status, headers, body) is radosgw's own answer.  ``hang_puts``: PUTs are accepted
and never answered, like a full Ceph cluster does.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}
_SIGNING = {"authorization", "x-amz-date", "x-amz-content-sha256", "host", "content-length"}


class S3Gateway:
    def __init__(self, upstream: str, access_key: str, secret_key: str, region: str = "us-east-1",
                 drop: tuple[str, ...] = (), hang_puts: bool = False):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.drop = {h.lower() for h in drop}
        self.hang_puts = hang_puts
        self.seen: list[tuple[str, str, dict]] = []   # (method, path, headers as received)
        self._release = threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                gateway._forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        received = {k.lower(): v for k, v in handler.headers.items()}
        self.seen.append((handler.command, handler.path, received))
        if self.hang_puts and handler.command == "PUT":
            self._release.wait()          # until close(): the client's read timeout ends it
            return
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in _HOP | _SIGNING | self.drop}
        url = f"{self.upstream.scheme}://{self.upstream.netloc}{handler.path}"
        request = AWSRequest(method=handler.command, url=url, data=body, headers=headers)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(request)
        prepared = request.prepare()
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(handler.command, handler.path, body=body or None, headers=dict(prepared.headers.items()))
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        handler.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in _HOP | {"content-length"}:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data) if handler.command != "HEAD" else
                                                  answer.getheader("Content-Length") or 0))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
