"""The one place environment variables are read.

Everything else receives values through config dataclasses. `read_env()` is called
by entry points (CLI, service mains, tests), never at import time.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib


@dataclasses.dataclass(frozen=True)
class Env:
    cache_dir: pathlib.Path        # where built demo checkpoints and other caches live
    log_level: str                 # default logging level for services and CLI
    log_format: str                # default log line format for services: text | json
    redis_server_bin: str          # redis-server binary used for a private Redis
    otlp_endpoint: str             # OpenTelemetry's standard OTLP endpoint (traces-specific one first); "" = unset
    otel_service_name: str         # OpenTelemetry's standard service name; "" = epdserve-<stage>
    auth_token_file: str = ""      # file holding the bearer token when --auth-token-file is not given
    auth_token: str = dataclasses.field(default="", repr=False)  # the token itself (second choice)


def read_env(environ: os._Environ[str] | dict[str, str] | None = None) -> Env:
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    cache_dir = pathlib.Path(env.get("EPDSERVE_CACHE_DIR") or pathlib.Path(xdg) / "epdserve")
    return Env(
        cache_dir=cache_dir,
        log_level=env.get("EPDSERVE_LOG_LEVEL", "INFO").upper(),
        log_format=env.get("EPDSERVE_LOG_FORMAT", "text").lower(),
        redis_server_bin=env.get("EPDSERVE_REDIS_SERVER", "redis-server"),
        otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        otel_service_name=env.get("OTEL_SERVICE_NAME", ""),
        auth_token_file=env.get("EPDSERVE_AUTH_TOKEN_FILE", ""),
        auth_token=env.get("EPDSERVE_AUTH_TOKEN", ""),
    )
