"""Where webhooks may go: http(s) URLs whose host resolves only to public addresses, checked again when each is
delivered (a real SQLite queue, a real deliverer and a real receiver on loopback)."""

from __future__ import annotations

import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from segue.serve.command import open_queue
from segue.serve.jobs import Job, new_id
from segue.serve.webhook_target import TargetError, check_target, pinned
from segue.serve.webhooks import Deliverer


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/hook", "resolves to 127.0.0.1, which is loopback"),
        ("http://localhost:8080/", "which is loopback"),
        ("http://10.1.2.3/", "resolves to 10.1.2.3, which is private"),
        ("http://192.168.0.4/", "which is private"),
        ("http://169.254.169.254/latest/meta-data", "which is link-local"),
        ("http://[::1]:8000/", "resolves to ::1, which is loopback"),
        ("http://[::ffff:10.0.0.1]/", "which is private"),
        ("http://[fe80::1]/", "which is link-local"),
        ("http://224.0.0.1/", "which is multicast"),
        ("http://0.0.0.0:80/", "which is unspecified"),
        ("http://240.0.0.1/", "which is reserved"),
        ("https://no-such-host.invalid/", "does not resolve"),
        ("ftp://example.com/", "webhook_url must be an http:// or https:// URL"),
        ("http://[::1/", "webhook_url must be an http:// or https:// URL"),
    ],
)
def test_private_and_odd_targets_are_refused(url: str, words: str) -> None:
    with pytest.raises(TargetError, match="webhook_url") as e:
        check_target(url)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_public_addresses_pass_and_the_flag_lifts_the_rule() -> None:
    assert check_target("https://93.184.215.14:8443/x") == [ipaddress.ip_address("93.184.215.14")]
    assert check_target("http://[2606:4700::1111]/") == [ipaddress.ip_address("2606:4700::1111")]
    assert check_target("http://127.0.0.1:9/hook", allow_private=True) == []
    with pytest.raises(TargetError, match="http:// or https://"):
        check_target("file:///etc/passwd", allow_private=True)  # the scheme rule stays


def test_pinned_keeps_the_name_for_host_and_tls() -> None:
    url, headers, ext = pinned("https://u:p@hooks.example.com:8443/a?b=1", ipaddress.ip_address("93.184.215.14"))
    assert url == "https://u:p@93.184.215.14:8443/a?b=1"
    assert headers == {"Host": "hooks.example.com:8443"} and ext == {"sni_hostname": "hooks.example.com"}
    url, headers, ext = pinned("http://hooks.example.com/a", ipaddress.ip_address("2606:4700::1111"))
    assert url == "http://[2606:4700::1111]/a" and headers == {"Host": "hooks.example.com"} and ext == {}


class Receiver(BaseHTTPRequestHandler):
    got: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append(self.headers["Host"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("allow_private", [False, True])
def test_delivery_checks_the_address_again(tmp_path: Path, allow_private: bool) -> None:
    """A job whose URL was accepted (say DNS answered a public address then) is not delivered to a loopback
    address now, unless private webhooks are allowed; then it is, with the URL's own Host header."""
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    Receiver.got = []
    queue = open_queue(None, tmp_path)
    queue.create_schema()
    url = f"http://localhost:{hook.server_address[1]}/done"
    job = Job(id=new_id(), seq=0, kind="clip", status="queued", spec={}, created_at=time.time(), webhook_url=url)
    queue.submit(job)
    queue.cancel(job.id)  # ended: its webhook is due
    try:
        deliverer = Deliverer(queue, "secret", retries=1, allow_private=allow_private)
        with httpx.Client(timeout=5) as client:
            assert deliverer.deliver_one(client)
    finally:
        hook.shutdown()
    saved = queue.get(job.id)
    if allow_private:
        assert saved.webhook_state == "delivered" and Receiver.got == [f"localhost:{hook.server_address[1]}"]
    else:
        assert saved.webhook_state == "failed" and Receiver.got == []
        assert "resolves to" in saved.webhook_error and "which is loopback" in saved.webhook_error
