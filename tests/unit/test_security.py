"""Security settings, in-process: where the token comes from (flag, then environment), what a bad
one says (never the token), constant-time comparison, secrets kept out of reprs, TLS files that
must come together and match, the HTTP front door's 401."""

from __future__ import annotations

import hmac

import pytest

from epdserve import security
from epdserve.config import SecurityConfig, ServerConfig
from epdserve.env import read_env
from epdserve.errors import FailedPreconditionError
from epdserve.security import Credentials, TLSFiles, load_credentials, token_matches
from epdserve.transport.auth import TokenAuthInterceptor

pytestmark = pytest.mark.unit
TOKEN = "s3cr3t-token-0123456789abcdef"


def _env(**values):
    return read_env({"HOME": "/tmp", **values})


def test_token_comes_from_the_flag_then_the_environment(tmp_path):
    flag, env_file = tmp_path / "flag", tmp_path / "env"
    flag.write_text(TOKEN + "\n")
    env_file.write_text("B" * 20)
    assert load_credentials(SecurityConfig(auth_token_file=str(flag)), _env()).token == TOKEN
    assert load_credentials(SecurityConfig(auth_token_file=str(flag)),
                            _env(EPDSERVE_AUTH_TOKEN_FILE=str(env_file))).token == TOKEN
    assert load_credentials(SecurityConfig(), _env(EPDSERVE_AUTH_TOKEN_FILE=str(env_file))).token == "B" * 20
    assert load_credentials(SecurityConfig(), _env(EPDSERVE_AUTH_TOKEN="C" * 16)).token == "C" * 16
    assert load_credentials(SecurityConfig(), _env()) == Credentials()
    with pytest.raises(FailedPreconditionError, match="set one of"):
        load_credentials(SecurityConfig(), _env(EPDSERVE_AUTH_TOKEN_FILE=str(env_file), EPDSERVE_AUTH_TOKEN=TOKEN))


@pytest.mark.parametrize("token", ["short-token", "has a space inside it", "ünïcode-token-0123456789"])
def test_a_bad_token_is_refused_without_being_echoed(tmp_path, token):
    path = tmp_path / "token"
    path.write_text(token)
    with pytest.raises(FailedPreconditionError, match="auth_token_file: the token must be") as error:
        load_credentials(SecurityConfig(auth_token_file=str(path)), _env())
    assert token not in str(error.value)
    with pytest.raises(FailedPreconditionError, match="cannot read"):
        load_credentials(SecurityConfig(auth_token_file=str(tmp_path / "missing")), _env())


def test_secrets_stay_out_of_reprs():
    assert TOKEN not in repr(Credentials(TOKEN)) and TOKEN not in repr(_env(EPDSERVE_AUTH_TOKEN=TOKEN))


def test_bearer_comparison_is_constant_time(monkeypatch):
    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"bearer  {TOKEN} ", TOKEN)
    assert not token_matches(f"Bearer {TOKEN}x", TOKEN) and not token_matches(f"Basic {TOKEN}", TOKEN)
    assert not token_matches("", TOKEN) and not token_matches(TOKEN, TOKEN)
    assert len(calls) == 6 and all(b == TOKEN.encode() for _, b in calls)
    interceptor = TokenAuthInterceptor(TOKEN)
    assert interceptor.authorized((("authorization", f"Bearer {TOKEN}"),))
    assert not interceptor.authorized((("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x")))
    assert not interceptor.authorized((("x-token", TOKEN),)) and not interceptor.authorized(None)


def test_tls_files_go_together_and_must_match(tmp_path, pki, other_pki):
    with pytest.raises(ValueError, match="set all three or none"):
        SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key))
    with pytest.raises(ValueError, match="tls_server_name goes with"):
        SecurityConfig(tls_server_name="epdserve.test")
    good = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key), tls_ca=str(pki.ca),
                          tls_server_name="epdserve.test")
    assert load_credentials(good, _env()).tls == TLSFiles(str(pki.cert), str(pki.key), str(pki.ca), "epdserve.test")
    mismatched = SecurityConfig(tls_cert=str(pki.cert), tls_key=str(other_pki.key), tls_ca=str(pki.ca))
    with pytest.raises(FailedPreconditionError, match="cannot use them"):
        load_credentials(mismatched, _env())
    with pytest.raises(FailedPreconditionError, match="tls_ca: cannot read"):
        load_credentials(SecurityConfig(tls_cert=str(pki.cert), tls_key=str(pki.key), tls_ca=str(tmp_path / "no")),
                         _env())


def test_health_port_settings():
    assert ServerConfig(health_port=0).health_port == 0
    for bad in (-2, 70000):
        with pytest.raises(ValueError, match="health_port must be"):
            ServerConfig(health_port=bad)
    with pytest.raises(ValueError, match="must differ from port"):
        ServerConfig(port=5000, health_port=5000)


async def test_http_front_door_needs_the_token_except_on_health():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from services.router.openai_http import _bearer_auth, _openai_errors

    async def ok(request):
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[_openai_errors, _bearer_auth(TOKEN)])
    app.router.add_get("/health", ok)
    app.router.add_get("/v1/models", ok)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/health")).status == 200
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            response = await client.get("/v1/models", headers=headers)
            body = await response.json()
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "unauthenticated"
            assert "wrong-token" not in body["error"]["message"] and TOKEN not in body["error"]["message"]
