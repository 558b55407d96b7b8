"""Decoding untrusted image bytes safely.

Caps are checked before pixels are decoded: encoded size, then width x height from the header
(decompression bombs never reach `load()`); only PNG, JPEG, WEBP and GIF decoders are reachable;
truncated files fail instead of being padded; EXIF rotation is applied; every image comes out RGB.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from epdserve.config import EncodeConfig
from epdserve.errors import InvalidArgumentError, ResourceExhaustedError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


def decode_image(data: bytes, index: int, limits: EncodeConfig) -> Image.Image:
    """Bytes of one image -> a loaded RGB PIL image. Raises InvalidArgumentError (undecodable)
    or ResourceExhaustedError (over a cap), each naming `images[index]` and the limit."""
    field = f"images[{index}]"
    if not data:
        raise InvalidArgumentError(f"{field}: image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise ResourceExhaustedError(
            f"{field}: {len(data)} bytes exceeds max_image_bytes ({limits.max_image_bytes})"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, field)
        _check_pixels(image, field, limits.max_image_pixels)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, EOFError) as exc:
            raise InvalidArgumentError(f"{field}: corrupt or truncated {image.format} image ({exc})") from None


def _open(data: bytes, field: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ResourceExhaustedError(f"{field}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidArgumentError(
            f"{field}: not a decodable image (accepted formats: {', '.join(ALLOWED_FORMATS)})"
        ) from None


def _check_pixels(image: Image.Image, field: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidArgumentError(f"{field}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ResourceExhaustedError(
            f"{field}: {width}x{height} = {width * height} pixels exceeds max_image_pixels ({max_pixels})"
        )
