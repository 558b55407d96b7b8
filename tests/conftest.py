"""Shared fixtures: a real private redis-server, tiny random checkpoints built on disk, a test
PKI (CA, certificate, key, token), and the marker plumbing (`slow` needs --run-slow; `gpu` needs
CUDA)."""

from __future__ import annotations

import dataclasses
import pathlib
import uuid

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    has_gpu = _cuda_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real redis-server started for this test session (skips when none is installed)."""
    import shutil

    from epdserve.redis_server import PrivateRedis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = PrivateRedis().start()
    yield server.url
    server.stop()


@pytest.fixture
def namespace() -> str:
    """A Redis key namespace unique to one test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def open_cache(redis_url, namespace, tmp_path):
    """`await open_cache(name, **CacheConfig fields)`: an mmcache owner on this test's Redis
    namespace, its pool in its own directory; closed after the test."""
    from epdserve.config import CacheConfig
    from mmcache.client import CacheIdentity, MMCache

    opened = []

    async def open_one(name: str = "owner", **config) -> MMCache:
        settings = {"redis_url": redis_url, "namespace": namespace, "shm_dir": str(tmp_path / name),
                    "heartbeat_interval_s": 0.2, **config}
        opened.append(await MMCache.open(CacheConfig(**settings), CacheIdentity(name, "")))
        return opened[-1]

    yield open_one
    for cache in opened:
        await cache.close()


_CHECKPOINTS: dict[tuple, pathlib.Path] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """build(backbone="llama", vision="clip", seed=0) -> path of a tiny random LLaVA checkpoint
    (built once per session per argument set)."""
    from epdserve.models.tiny import TinySpec, build_tiny_checkpoint

    def build(backbone: str = "llama", vision: str = "clip", seed: int = 0, **options) -> pathlib.Path:
        key = (backbone, vision, seed, tuple(sorted(options.items())))
        if key not in _CHECKPOINTS:
            out = tmp_path_factory.mktemp(f"tiny-{backbone}-{vision}-{seed}")
            spec = TinySpec(backbone=backbone, vision=vision, seed=seed, **options)
            _CHECKPOINTS[key] = build_tiny_checkpoint(out, spec)
        return _CHECKPOINTS[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_factory) -> pathlib.Path:
    return tiny_checkpoint_factory()


@pytest.fixture(scope="session")
def random_png():
    """`random_png(seed, size=(w, h))`: PNG bytes of seeded random pixels."""
    import io

    import numpy as np
    from PIL import Image

    def make(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
        pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    return make


@pytest.fixture(scope="session")
def hf_greedy():
    """`hf_greedy(model_dir, prompt, images, new_tokens)`: the greedy tokens HF transformers'
    LlavaForConditionalGeneration generates for the chat prompt (the correctness anchor)."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    def generate(model_dir, prompt: str, images: list[bytes], new_tokens: int) -> list[int]:
        processor = AutoProcessor.from_pretrained(model_dir)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images] or None
        inputs = processor(images=pil, text=text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return generate


@dataclasses.dataclass(frozen=True)
class PKI:
    """PEM files of a test deployment: its CA and one certificate + key (server and client auth,
    SANs localhost / 127.0.0.1 / epdserve.test), and a token file."""

    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path
    token_file: pathlib.Path
    token: str


def write_pki(directory: pathlib.Path, name: str = "epdserve") -> PKI:
    """A fresh CA and a certificate it signed, written under `directory` (needs `cryptography`)."""
    import datetime
    import ipaddress
    import secrets

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("epdserve.test"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = PKI(directory / "ca.crt", directory / "tls.crt", directory / "tls.key", directory / "token",
              secrets.token_urlsafe(32))
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pki.token_file.write_text(pki.token + "\n")
    for path in (pki.key, pki.token_file):
        path.chmod(0o600)
    return pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """The test deployment's CA, certificate, key and token (skips without `cryptography`)."""
    pytest.importorskip("cryptography", reason="test extra: cryptography")
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A second, unrelated CA with its own certificate and token: what an outsider holds."""
    pytest.importorskip("cryptography", reason="test extra: cryptography")
    return write_pki(tmp_path_factory.mktemp("other-pki"), "outsider")
