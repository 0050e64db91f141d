"""The HTTP layer reads the process environment once per URL, and what it sends is
what ``requests`` itself would: proxies and their exclusions, the CA bundle, and
``.netrc`` credentials still apply (read from the environment, no socket opened)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from connectors.runtime import http

URLS = (
    "https://exchange.test/api/v1/ticker",  # has a .netrc entry
    "https://direct.test/api/v1/ticker",  # NO_PROXY
    "http://other.test/path?x=1",
)


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine exchange.test login someone password pw-1234\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3129")
    monkeypatch.setenv("NO_PROXY", "direct.test")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))


@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("url", URLS)
def test_a_call_carries_what_requests_would_put_on_it(url: str) -> None:
    session = http.install(requests.Session())
    for _ in range(2):  # read, then remembered
        env = http._environment(session, url)
        theirs = session.merge_environment_settings(url, {}, True, None, None)
        assert (env.proxies, env.verify, env.cert) == (
            theirs["proxies"],
            theirs["verify"],
            theirs["cert"],
        )
        ours = session.prepare_request(requests.Request("GET", url, auth=env.auth))
        plain = session.prepare_request(requests.Request("GET", url))
        assert ours.headers == plain.headers  # a .netrc entry becomes the same header
        assert ours.url == plain.url
    assert ("Authorization" in ours.headers) == ("exchange.test" in url)


@pytest.mark.usefixtures("environment")
def test_a_session_that_ignores_the_environment_still_does() -> None:
    session = http.install(requests.Session())
    session.trust_env = False
    env = http._environment(session, URLS[0])
    assert env.proxies == {} and env.verify is True and env.auth is None
    request = session.prepare_request(requests.Request("GET", URLS[0], auth=env.auth))
    assert "Authorization" not in request.headers


@pytest.mark.usefixtures("environment")
def test_a_session_with_its_own_credentials_keeps_them() -> None:
    session = http.install(requests.Session())
    session.auth = ("mine", "pw")
    env = http._environment(session, URLS[0])
    ours = session.prepare_request(requests.Request("GET", URLS[0], auth=env.auth))
    plain = session.prepare_request(requests.Request("GET", URLS[0]))
    assert ours.headers["Authorization"] == plain.headers["Authorization"]
