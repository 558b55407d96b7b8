"""Flags generated from the config dataclasses: byte sizes with units, booleans with --no-,
and a stage's flags together with those of a stage it can serve alongside."""

from __future__ import annotations

import argparse

import pytest

from epdserve.config import CacheConfig, EncodeConfig, PrefillConfig, config_from_args, parse_size
from services.runtime import service_arg_parser

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, expected", [
    ("1073741824", 1 << 30), ("24Gi", 24 << 30), ("24GiB", 24 << 30), ("512MiB", 512 << 20), ("2G", 2 * 10**9),
    ("1.5GB", 1_500_000_000), ("64ki", 64 << 10), (" 3 m ", 3 * 10**6),
])
def test_sizes_take_kubernetes_style_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "3x", "-1Gi", "1Gib2", "Gi"])
def test_a_bad_size_names_the_accepted_forms(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected bytes, optionally with a unit"):
        parse_size(text)


def test_byte_flags_accept_units_and_prefill_takes_the_encode_flags():
    parser = service_arg_parser("prefill", PrefillConfig, also=(EncodeConfig,))
    args = parser.parse_args(["--capacity-bytes", "24Gi", "--preallocate-pool", "--with-encode",
                              "--max-batch-size", "8", "--max-image-bytes", "5MiB"])
    cache, prefill, encode = (config_from_args(c, args) for c in (CacheConfig, PrefillConfig, EncodeConfig))
    assert cache.capacity_bytes == 24 << 30 and cache.preallocate_pool
    assert prefill.with_encode and encode.max_batch_size == 8 and encode.max_image_bytes == 5 << 20
    with pytest.raises(SystemExit):
        parser.parse_args(["--capacity-bytes", "lots"])
