"""Client channels between services (and from the SDK): explicit message caps and keepalive, and
the process's credentials (mutual TLS when it has TLS files, the bearer token on every call)."""

from __future__ import annotations

import grpc

from epdserve.config import MiB
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.auth import SyncTokenInterceptor, async_token_interceptors

DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    credentials: Credentials = NO_CREDENTIALS) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if credentials.tls is not None and credentials.tls.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.tls.server_name))
    return options


def channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    """TLS presenting this process's certificate and trusting only the deployment's CA."""
    assert credentials.tls is not None
    cert, key, ca = credentials.tls.pem
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def aio_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                credentials: Credentials = NO_CREDENTIALS) -> grpc.aio.Channel:
    options = channel_options(max_message_bytes, credentials)
    interceptors = async_token_interceptors(credentials.token) if credentials.token else None
    if credentials.tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(credentials), options=options,
                                   interceptors=interceptors)


def sync_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: Credentials = NO_CREDENTIALS) -> grpc.Channel:
    options = channel_options(max_message_bytes, credentials)
    if credentials.tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, channel_credentials(credentials), options=options)
    return grpc.intercept_channel(channel, SyncTokenInterceptor(credentials.token)) if credentials.token else channel
