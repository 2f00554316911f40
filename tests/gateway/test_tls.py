"""T3 is https-only: the gateway's own HTTP/1.1 client against a real TLS upstream on loopback (a test CA made
by openssl), trusted through SSL_CERT_FILE, refused when untrusted, and reached through an HTTPS_PROXY
CONNECT tunnel while the local http tier still connects directly."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.connect_proxy import ConnectProxy
from tests.fakes.upstream import FakeUpstream
from tests.gateway.test_proxy import MSG

PROXY_VARS = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, Path]]:
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=qlp test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    up = FakeUpstream("tls", tls=ctx).start()
    yield up, d / "ca.pem"
    up.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fleet(tls: FakeUpstream, local: FakeUpstream) -> dict[str, Any]:
    return {
        "default_tier": "T0",
        "health_interval": 60,
        "tiers": {
            "T0": {"model": "m0", "aliases": ["qlp-t0"], "backends": [{"name": "a", "base_url": local.base_url}]},
            "T3": {
                "kind": "openai",
                "model": "gpt-4",
                "aliases": ["qlp-t3"],
                "backends": [{"name": "ext", "base_url": tls.base_url}],
            },
        },
    }


def ask(gw: Any, model: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json={"model": model, "messages": MSG}, timeout=20)


def test_https_upstream_trusted_through_ssl_cert_file(tls_upstream, upstreams, gateway_factory, clean_env) -> None:  # type: ignore[no-untyped-def]
    up, ca = tls_upstream
    up.reset()
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    gw = gateway_factory(fleet(up, upstreams["a"]))
    r = ask(gw, "qlp-t3")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello" and len(up.requests) == 1
    assert ask(gw, "qlp-t3").status_code == 200 and len(up.requests) == 2  # the kept-alive TLS connection


def test_untrusted_certificate_is_a_clear_502_never_retried(
    tls_upstream, upstreams, gateway_factory, clean_env
) -> None:  # type: ignore[no-untyped-def]
    up, _ = tls_upstream
    up.reset()
    gw = gateway_factory(fleet(up, upstreams["a"]))
    r = ask(gw, "qlp-t3")
    assert r.status_code == 502 and r.json()["error"]["code"] == "tls", r.text
    assert "certificate" in r.json()["error"]["message"] and r.headers["x-should-retry"] == "false"
    assert not up.requests


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    """A CONNECT proxy that wants the credentials qlp:s3cret."""
    p = ConnectProxy(credentials="qlp:s3cret").start()
    yield p
    p.stop()


def test_https_proxy_tunnels_t3_and_the_local_tier_goes_direct(
    tls_upstream,
    upstreams,
    gateway_factory,  # type: ignore[no-untyped-def]
    clean_env,
    proxy,
) -> None:
    up, ca = tls_upstream
    up.reset()
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://qlp:s3cret@"))
    gw = gateway_factory(fleet(up, upstreams["a"]))
    assert ask(gw, "qlp-t3").status_code == 200
    assert ask(gw, "qlp-t0").status_code == 200 and len(upstreams["a"].requests) == 1
    assert proxy.connects == [(f"localhost:{up.port}", "Basic cWxwOnMzY3JldA==")]
    assert len(up.requests) == 1


def test_a_proxy_that_refuses_connect_is_a_502_naming_the_proxy(
    tls_upstream,
    upstreams,
    gateway_factory,  # type: ignore[no-untyped-def]
    clean_env,
    proxy,
) -> None:
    up, ca = tls_upstream
    up.reset()
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)  # no credentials: 407
    gw = gateway_factory(fleet(up, upstreams["a"]))
    r = ask(gw, "qlp-t3")
    assert r.status_code == 502 and r.json()["error"]["code"] == "proxy" and "407" in r.json()["error"]["message"]
    assert not up.requests


def test_no_proxy_lets_a_host_connect_directly(
    tls_upstream,
    upstreams,
    gateway_factory,
    clean_env,  # type: ignore[no-untyped-def]
    proxy,
) -> None:
    up, ca = tls_upstream
    up.reset()
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "localhost")
    gw = gateway_factory(fleet(up, upstreams["a"]))
    assert ask(gw, "qlp-t3").status_code == 200 and not proxy.connects
