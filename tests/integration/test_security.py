"""Authentication and TLS on real servers on loopback: every RPC of every service (and reflection)
refuses a call without the token, health answers anyone, mutual TLS turns away clients without a
certificate or with one from another CA, the plaintext health-only port serves health alone, and
the mmcache data channel serves no byte to a reader that cannot prove the token (plain or TLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epdserve.config import CacheConfig, ServerConfig
from epdserve.security import Credentials, TLSFiles
from epdserve.transport.auth import REFUSED_MESSAGE
from epdserve.transport.channels import aio_channel
from epdserve.transport.server import ServiceServer
from epdserve.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    load_pb2,
    load_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from mmcache.client import CacheIdentity, MMCache
from mmcache.codec import CorruptEntryError
from mmcache.transfer import (
    MAGIC,
    NONCE_BYTES,
    PROOF_BYTES,
    UNAUTHENTICATED,
    VERSION,
    DataChannelRefused,
    DataClient,
)
from services.load import LoadServicer, LoadTracker

pytestmark = pytest.mark.integration
SERVICES = [(router_pb2, "RouterService", router_pb2_grpc), (encode_pb2, "EncodeService", encode_pb2_grpc),
            (prefill_pb2, "PrefillService", prefill_pb2_grpc), (decode_pb2, "DecodeService", decode_pb2_grpc),
            (load_pb2, "LoadService", load_pb2_grpc), (cache_pb2, "CacheControl", cache_pb2_grpc)]
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True)


def _tls(pki, server_name: str = "") -> TLSFiles:
    return TLSFiles(str(pki.cert), str(pki.key), str(pki.ca), server_name)


def _methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method the services define."""
    return [(f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for module, name, _ in SERVICES for service in [module.DESCRIPTOR.services_by_name[name]]
            for m in service.methods]


async def _call(channel, path: str, client_streaming: bool, server_streaming: bool, metadata=()):
    """Call a method with an empty (raw) request; raises the call's AioRpcError."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (client_streaming, server_streaming)]
    call = kind(path)(iter([b""]) if client_streaming else b"", metadata=metadata, timeout=5)
    if server_streaming:
        async for _ in call:
            pass
    else:
        await call


@pytest.fixture
async def every_service(pki):
    """A ServiceServer with the token, every epdserve service (the generated base servicers: every
    method UNIMPLEMENTED) and reflection."""
    server = ServiceServer(ServerConfig(reflection=True), [f"epdserve.v1.{name}" for _, name, _ in SERVICES],
                           credentials=Credentials(pki.token))
    for _, name, stubs in SERVICES:
        getattr(stubs, f"add_{name}Servicer_to_server")(getattr(stubs, f"{name}Servicer")(), server.server)
    yield await server.start()
    await server.stop()


async def test_every_rpc_requires_the_token_except_health(every_service, pki):
    methods = [*_methods(), REFLECTION]
    assert {"/epdserve.v1.RouterService/Generate", "/epdserve.v1.LoadService/GetLoad",
            "/epdserve.v1.CacheControl/Release"} <= {path for path, _, _ in methods}
    async with grpc.aio.insecure_channel(every_service) as channel:
        for metadata in ((), (("authorization", "Bearer wrong-token-0123456789abcdef"),),
                         (("authorization", pki.token),), (("authorization", f"Basic {pki.token}"),)):
            for path, client_streaming, server_streaming in methods:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await _call(channel, path, client_streaming, server_streaming, metadata)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
                assert error.value.details() == REFUSED_MESSAGE and "wrong-token" not in error.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service="epdserve.v1.DecodeService"))).status \
            == health_pb2.HealthCheckResponse.SERVING
        good = (("authorization", f"Bearer {pki.token}"),)
        for path, client_streaming, server_streaming in methods[:-1]:  # past auth: the bare servicer answers
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await _call(channel, path, client_streaming, server_streaming, good)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


async def test_internal_channels_send_the_token_on_every_kind_of_call(every_service, pki):
    async with aio_channel(every_service, credentials=Credentials(pki.token)) as channel:
        for path, client_streaming, server_streaming in _methods():
            with pytest.raises(grpc.aio.AioRpcError) as error:  # authenticated: the bare servicer's answer
                await _call(channel, path, client_streaming, server_streaming)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED, path
        await _call(channel, *REFLECTION)  # reflection (stream-stream) answers in-band
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
async def tls_server(pki):
    """LoadService behind mutual TLS + the token, with the plaintext health-only port."""
    server = ServiceServer(ServerConfig(health_port=0), ["epdserve.v1.LoadService"],
                           credentials=Credentials(pki.token, _tls(pki)))
    load_pb2_grpc.add_LoadServiceServicer_to_server(LoadServicer(LoadTracker("decode", "d0")), server.server)
    await server.start()
    yield server
    await server.stop()


async def _get_load(address: str, credentials: Credentials) -> load_pb2.LoadReport:
    async with aio_channel(address, credentials=credentials) as channel:
        return await load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(), timeout=5)


async def test_mutual_tls_admits_only_certificates_of_the_deployments_ca(tls_server, pki, other_pki):
    address = tls_server.address
    assert (await _get_load(address, Credentials(pki.token, _tls(pki)))).stage == "decode"
    assert (await _get_load(address, Credentials(pki.token, _tls(pki, "epdserve.test")))).stage == "decode"
    refusals = {"no certificate (plaintext)": Credentials(pki.token),
                "another CA's certificate": Credentials(pki.token, _tls(other_pki)),
                "a server name the certificate lacks": Credentials(pki.token, _tls(pki, "elsewhere.test"))}
    for why, credentials in refusals.items():
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _get_load(address, credentials)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, why
    with pytest.raises(grpc.aio.AioRpcError) as error:  # a good certificate still needs the token
        await _get_load(address, Credentials("", _tls(pki)))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with aio_channel(address, credentials=Credentials("", _tls(pki))) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_health_port_is_plaintext_and_serves_health_only(tls_server):
    assert tls_server.ready_info()["health_address"] == tls_server.health_address
    async with grpc.aio.insecure_channel(tls_server.health_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "epdserve.v1.LoadService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await tls_server.health.enter_graceful_shutdown()  # draining shows on the health port too
        reply = await health.Check(health_pb2.HealthCheckRequest(service="epdserve.v1.LoadService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


# ---- the mmcache data channel --------------------------------------------------------------------

@pytest.fixture
def config(redis_url, namespace, tmp_path):
    return CacheConfig(redis_url=redis_url, namespace=namespace, shm_dir=str(tmp_path / "owner"),
                       capacity_bytes=16 << 20, prefer_shared_memory=False)


async def _owner(config, credentials):
    cache = await MMCache.open(config, CacheIdentity("owner", ""), credentials)
    ref = await cache.put("img:secret", torch.arange(1000, dtype=torch.int32), ttl_s=60)
    return cache, ref


async def test_data_channel_serves_only_readers_that_prove_the_token(config, tmp_path, pki, other_pki):
    owner, ref = await _owner(config, Credentials(pki.token))
    address = owner.owner.data_address
    try:
        header, data = await DataClient(5, Credentials(pki.token)).fetch(address, "img:secret")
        assert bytes(data) == torch.arange(1000, dtype=torch.int32).numpy().tobytes()
        for outsider in (DataClient(5), DataClient(5, Credentials(other_pki.token))):
            with pytest.raises(DataChannelRefused):
                await outsider.fetch(address, "img:secret")
            outsider.close()
        reader = await MMCache.open(dataclasses.replace(config, shm_dir=str(tmp_path / "r")), CacheIdentity("r", ""))
        assert await reader.get_many([ref]) == [None]  # a miss, not a crash
        await reader.close()
        assert await _raw_peer_asks_without_proof(address) == UNAUTHENTICATED
    finally:
        await owner.close()


async def _raw_peer_asks_without_proof(address: str) -> int:
    """A peer that skips the proof and asks for the entry: returns the status the owner sends,
    after checking nothing else follows."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    greeting = await reader.readexactly(len(MAGIC) + 2 + NONCE_BYTES)
    assert greeting[:5] == MAGIC + bytes([VERSION]) and greeting[5] == 1
    key, lease = b"img:secret", b"x" * 13
    request = MAGIC + bytes([VERSION]) + len(key).to_bytes(2, "little") + key + len(lease).to_bytes(2, "little") + lease
    assert len(request) == PROOF_BYTES  # all of it is read as the (wrong) proof: a clean hang-up, no reset
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # the owner hangs up after one status byte
    writer.close()
    assert len(answer) == 1
    return answer[0]


async def test_data_channel_over_mutual_tls(config, pki, other_pki):
    owner, _ = await _owner(config, Credentials(pki.token, _tls(pki)))
    address = owner.owner.data_address
    try:
        for name in ("", "epdserve.test"):
            client = DataClient(5, Credentials(pki.token, _tls(pki, name)))
            header, data = await client.fetch(address, "img:secret")
            assert len(data) == 4000 and header["nbytes"] == 4000
            assert (await client.fetch(address, "img:secret"))[1] == data  # the connection is reused
            client.close()
        with pytest.raises(ssl.SSLError):
            await DataClient(5, Credentials(pki.token, _tls(other_pki))).fetch(address, "img:secret")
        with pytest.raises((asyncio.TimeoutError, ConnectionError, CorruptEntryError)):
            await DataClient(1, Credentials(pki.token)).fetch(address, "img:secret")  # plaintext to TLS
    finally:
        await owner.close()
