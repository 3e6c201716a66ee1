"""The page's local server (`python -m demo.web.build --serve`) serves the regular files under its folder and
nothing else, as raw HTTP sees it: no dotfiles (the folder of a Space is a git clone), no listings, no link out of the
folder, a 404 for a NUL byte, and a connection that sends nothing is closed."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time

import pytest

from demo.web.build import server

IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served folder as a Space's clone holds it, and a file outside it; yields (port, folder, server)."""
    root = tmp_path_factory.mktemp("page_server")
    folder = root / "site"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "config").write_text("[remote \"origin\"]\n\turl = https://token@example/space\n")
    (folder / ".env").write_text("SECRET=1\n")
    (folder / "index.html").write_text("<!doctype html><title>page</title>")
    (folder / "model" / "onnx").mkdir(parents=True)
    (folder / "model" / "onnx" / "graph.onnx").write_bytes(b"\x08\x07")
    (folder / "vendor").mkdir()
    (root / "outside.txt").write_text("not to be served\n")
    (folder / "vendor" / "escape.txt").symlink_to(root / "outside.txt")
    (folder / "inside.html").symlink_to(folder / "index.html")  # a link within the folder is fine
    httpd = server(folder, timeout=IDLE_TIMEOUT_S)
    count_live_connections(httpd)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], folder, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def test_the_page_and_its_files_are_served(site):
    port, *_ = site
    assert get(port, "/") == (200, b"<!doctype html><title>page</title>")
    assert get(port, "/index.html")[0] == 200
    assert get(port, "/inside.html")[0] == 200
    assert get(port, "/model/onnx/graph.onnx") == (200, b"\x08\x07")


@pytest.mark.parametrize("path", ["/.git/config", "/.git/", "/.env", "/model/../.env", "/%2egit/config",
                                  "/model/%2e%2e/.env"])
def test_dotfiles_are_not_served(site, path):
    port, *_ = site
    status, body = get(port, path)
    assert status == 404 and b"token" not in body and b"SECRET" not in body


@pytest.mark.parametrize("path", ["/model/", "/model", "/model/onnx/", "/vendor/"])
def test_folders_are_not_listed(site, path):
    port, *_ = site
    status, body = get(port, path)
    assert status == 404 and b"graph.onnx" not in body and b"escape" not in body


def test_a_link_out_of_the_folder_is_not_followed(site):
    port, *_ = site
    status, body = get(port, "/vendor/escape.txt")
    assert status == 404 and b"not to be served" not in body
    assert get(port, "/../outside.txt")[0] == 404


def test_a_nul_byte_gets_a_404_not_a_traceback(site, caplog):
    port, *_ = site
    with caplog.at_level(logging.DEBUG):
        for path in ("/index.html%00", "/%00/x", "/model%00/onnx/graph.onnx"):
            assert get(port, path)[0] == 404
    assert "Traceback" not in caplog.text
    assert get(port, "/")[0] == 200


def count_live_connections(httpd) -> None:
    """Counts the connections `httpd` is serving in `httpd.live` (ThreadingHTTPServer runs process_request_thread
    once per connection, on its own thread); other threads of the test process must not count."""
    httpd.live, lock = 0, threading.Lock()
    serve = httpd.process_request_thread

    def counted(request, client_address):
        with lock:
            httpd.live += 1
        try:
            serve(request, client_address)
        finally:
            with lock:
                httpd.live -= 1

    httpd.process_request_thread = counted


def wait_until(condition, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_idle_connections_are_closed(site):
    port, _, httpd = site
    assert wait_until(lambda: httpd.live == 0)  # the earlier tests' connections are done
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a request that never ends
    assert wait_until(lambda: httpd.live == 6)  # a thread for each connection, for now
    time.sleep(IDLE_TIMEOUT_S + 1)
    for connection in [*idle, half]:
        connection.settimeout(5)
        assert connection.recv(1024) == b""  # closed by the server
        connection.close()
    assert wait_until(lambda: httpd.live == 0)
    assert get(port, "/")[0] == 200
