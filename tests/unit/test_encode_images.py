"""Untrusted image bytes: every bad image is a clear error naming images[i]; odd-but-valid images decode."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from epdserve.config import EncodeConfig
from epdserve.errors import InvalidArgumentError, ResourceExhaustedError
from services.encode.images import decode_image

pytestmark = pytest.mark.unit
LIMITS = EncodeConfig()


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png(size=(16, 12), mode="RGB") -> bytes:
    return _encode(Image.new(mode, size, color=0 if mode in ("L", "1", "P", "I;16") else None))


def test_zero_bytes():
    with pytest.raises(InvalidArgumentError, match=r"images\[2\]: image is empty"):
        decode_image(b"", 2, LIMITS)


def test_not_an_image():
    with pytest.raises(InvalidArgumentError, match=r"images\[0\]: not a decodable image"):
        decode_image(b"this is text, not a picture", 0, LIMITS)


def test_truncated_png():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(InvalidArgumentError, match=r"images\[1\]: corrupt or truncated PNG"):
        decode_image(data[: len(data) // 2], 1, LIMITS)


def test_truncated_jpeg():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidArgumentError, match="corrupt or truncated JPEG"):
        decode_image(data[: len(data) // 2], 0, LIMITS)


def test_disallowed_format_is_not_decoded():
    data = _encode(Image.new("RGB", (8, 8)), "BMP")
    with pytest.raises(InvalidArgumentError, match="accepted formats: PNG, JPEG, WEBP, GIF"):
        decode_image(data, 0, LIMITS)


def test_too_many_bytes():
    with pytest.raises(ResourceExhaustedError, match=r"exceeds max_image_bytes \(100\)"):
        decode_image(_encode(Image.effect_noise((64, 64), 50)), 0, EncodeConfig(max_image_bytes=100))


def test_pixel_cap_checked_before_decoding():
    """A small file declaring a huge canvas (decompression bomb) is refused from its header."""
    data = _encode(Image.new("L", (5000, 5000)))  # compresses to a few KB
    assert len(data) < 100_000
    with pytest.raises(ResourceExhaustedError, match=r"5000x5000 = 25000000 pixels exceeds max_image_pixels"):
        decode_image(data, 0, EncodeConfig(max_image_pixels=1_000_000))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_odd_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(_encode(Image.new(mode, (9, 7)), fmt), 0, LIMITS)
    assert image.mode == "RGB" and image.size == (9, 7)


def test_one_by_one_and_extreme_aspect_ratio():
    assert decode_image(_png((1, 1)), 0, LIMITS).size == (1, 1)
    assert decode_image(_png((2000, 1)), 0, LIMITS).size == (2000, 1)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif), 0, LIMITS)
    assert decoded.size == (10, 30)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buf.getvalue(), 0, LIMITS)
    assert decoded.getpixel((0, 0))[0] > 200


def _png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_hundred_thousand_squared_bomb_is_refused_with_bounded_memory():
    import tracemalloc

    data = _png_declaring(100_000, 100_000)
    assert len(data) < 200
    tracemalloc.start()
    with pytest.raises(ResourceExhaustedError, match=r"images\[0\]"):
        decode_image(data, 0, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20, f"decoding attempt used {peak} bytes"


def test_recent_keys_is_a_bounded_lru_keyed_by_bytes_salt_and_keep():
    from services.encode.encoder import RecentKeys

    recent = RecentKeys(capacity=2)
    a, b, c = (RecentKeys.fingerprint(data, b"", 1.0) for data in (b"a", b"b", b"c"))
    assert RecentKeys.fingerprint(b"a", b"salt", 1.0) != a != RecentKeys.fingerprint(b"a", b"", 0.5)
    recent.put(a, "img:a")
    recent.put(b, "img:b")
    assert recent.get(a) == "img:a"  # a is now the most recent
    recent.put(c, "img:c")
    assert recent.get(b) is None and recent.get(a) == "img:a" and recent.get(c) == "img:c"
