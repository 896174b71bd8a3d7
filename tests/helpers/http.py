"""A real HTTP server on 127.0.0.1 whose answers the test writes, for mirrors and Prefect servers
that misbehave.

`serve(answer)` runs `answer(handler, stop)` for each request, in a thread per connection:
`handler` is the http.server request handler (its command, path, headers and raw `wfile`; a
request's body is read already), `stop` an Event set when the server is stopping, which long
answers wait on. The server stops when the `with` block ends, or by itself after `lifetime_s`,
so that a client that never gives up still ends.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Answer = Callable[[http.server.BaseHTTPRequestHandler, threading.Event], None]


@contextmanager
def serve(
    answer: Answer, lifetime_s: float = 15.0, tls: tuple[Path, Path] | None = None
) -> Iterator[str]:
    """Yields the server's base URL, http://127.0.0.1:<port>/, or https:// with tls, a
    (certificate, key) pair such as self_signed() makes."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):  # the client hung up, as it does on bad mirrors
                # Read first, so that the next request on this connection starts where it should.
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer(self, stop)

        do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        # The handshake happens in the connection's thread, on its first read.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )

    def stop_all() -> None:
        stop.set()
        server.shutdown()

    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    timer = threading.Timer(lifetime_s, stop_all)
    timer.daemon = True
    timer.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/"
    finally:
        timer.cancel()
        stop_all()
        server.server_close()
        thread.join(5)


def send_head(handler: http.server.BaseHTTPRequestHandler, length: int | None = None) -> None:
    """A 200 status line and headers, Content-Length only if length is given."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    handler.wfile.flush()


def send_body(
    handler: http.server.BaseHTTPRequestHandler,
    body: bytes,
    content_type: str = "application/json",
) -> None:
    """A whole 200 answer: status line, headers and body."""
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, in folder: trusted by a client whose
    SSL_CERT_FILE names the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
