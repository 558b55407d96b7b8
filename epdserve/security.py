"""Who may talk to a service: the deployment's shared bearer token and its mutual-TLS files.

`load_credentials(SecurityConfig, Env)` reads them once, at start (an unreadable file, a token
that is too short or a certificate that does not match its key is a FailedPreconditionError
then, not at the first call); the `Credentials` it returns are what a process checks as a server
and presents as a client:
* token: `authorization: Bearer <token>` on every gRPC call (checked on every method but
  grpc.health.v1: `transport/auth.py`), `Authorization: Bearer` on the HTTP front door, and an
  HMAC of a server nonce on the mmcache data channel; always compared in constant time;
* tls: one certificate and key per process, used as server and as client, and the CA that must
  have signed every peer's certificate (servers require client certificates).
Secrets never appear in reprs, logs or error messages. Files are read at start: restart the
process after rotating them.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import pathlib
import re
import ssl

from epdserve.config import SecurityConfig
from epdserve.env import Env
from epdserve.errors import FailedPreconditionError

MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: it travels in a header


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files: this side's certificate (chain) and private key, and the CA certificate(s) every
    peer's certificate must chain to. `server_name` is checked in servers' certificates instead of
    the host of the address dialled ("" = that host)."""

    cert: str
    key: str
    ca: str
    server_name: str = ""

    @functools.cached_property
    def pem(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA) bytes, read on first use."""
        return _read(self.cert, "tls_cert"), _read(self.key, "tls_key"), _read(self.ca, "tls_ca")

    def server_ssl_context(self) -> ssl.SSLContext:
        """For a TLS listener that requires a client certificate signed by the CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """For dialling a TLS listener: presents the certificate, verifies the server's name and CA."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        return context


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a process checks as a server and presents as a client ("" / None = off)."""

    token: str = dataclasses.field(default="", repr=False)
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        if self.token:
            check_token(self.token, "token")


NO_CREDENTIALS = Credentials()


def load_credentials(config: SecurityConfig, env: Env) -> Credentials:
    """The token (--auth-token-file, else $EPDSERVE_AUTH_TOKEN_FILE, else $EPDSERVE_AUTH_TOKEN) and
    the TLS files of `config`, read and checked now. Raises FailedPreconditionError."""
    tls = None
    if config.tls:
        tls = TLSFiles(config.tls_cert, config.tls_key, config.tls_ca, config.tls_server_name)
        _ = tls.pem
        try:
            tls.server_ssl_context()
        except (OSError, ssl.SSLError) as exc:
            raise FailedPreconditionError(f"tls_cert / tls_key / tls_ca: cannot use them ({_reason(exc)})") from None
    return Credentials(_token(config, env), tls)


def _token(config: SecurityConfig, env: Env) -> str:
    if env.auth_token_file and env.auth_token and not config.auth_token_file:
        raise FailedPreconditionError("set one of EPDSERVE_AUTH_TOKEN_FILE and EPDSERVE_AUTH_TOKEN, not both")
    if config.auth_token_file or env.auth_token_file:
        source = "auth_token_file" if config.auth_token_file else "EPDSERVE_AUTH_TOKEN_FILE"
        token = _read(config.auth_token_file or env.auth_token_file, source).decode("utf-8", "replace").strip()
    elif env.auth_token:
        source, token = "EPDSERVE_AUTH_TOKEN", env.auth_token.strip()
    else:
        return ""
    check_token(token, source)
    return token


def check_token(token: str, source: str) -> None:
    """Raises FailedPreconditionError (naming `source`, never the token) unless the token is at
    least MIN_TOKEN_CHARS printable ASCII characters without spaces."""
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise FailedPreconditionError(f"{source}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII "
                                      "characters without spaces")


def token_matches(authorization: str, token: str) -> bool:
    """Whether an authorization value is `Bearer <token>` (the scheme in any case), the token
    compared in constant time."""
    scheme, _, presented = authorization.strip().partition(" ")
    matches = hmac.compare_digest(presented.strip().encode(), token.encode())
    return matches and scheme.lower() == "bearer"


def _read(path: str, source: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise FailedPreconditionError(f"{source}: cannot read {path} ({exc.strerror})") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
