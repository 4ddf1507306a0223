"""The canonical Huffman codec: round trips, compression, length limits, and decoding as a boundary."""

from __future__ import annotations

import math
import os
import struct
from datetime import timedelta

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_core.bundle import huffman
from edgefleet_core.errors import BundleError

# Named profiles, used per test rather than loaded globally. No example database: nothing is
# written into the repository. The fuzz budget is raisable for long runs, e.g.
# EDGEFLEET_FUZZ_EXAMPLES=100000 pytest tests/unit/bundle/test_huffman.py -k fuzz
settings.register_profile(
    "edgefleet-huffman",
    database=None,
    max_examples=60,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "edgefleet-huffman-fuzz",
    parent=settings.get_profile("edgefleet-huffman"),
    max_examples=int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "200")),
)
PROFILE = settings.get_profile("edgefleet-huffman")
FUZZ_PROFILE = settings.get_profile("edgefleet-huffman-fuzz")
FUZZ_MAX_SYMBOLS = 4096


@st.composite
def symbol_arrays(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], int]:
    """Arrays over assorted alphabets: uniform, skewed (power law), a single value, or empty."""
    alphabet = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 256, 1000, 65536]))
    size = draw(st.sampled_from([0, 1, 2, 7, 255, 1023, 1024, 1025, 3000, 70_000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["uniform", "skewed", "single"]))
    if shape == "uniform":
        values = rng.integers(0, alphabet, size)
    elif shape == "skewed":
        weights = 1.0 / np.arange(1, alphabet + 1) ** draw(st.floats(0.5, 3.0))
        values = rng.permutation(alphabet)[rng.choice(alphabet, size, p=weights / weights.sum())]
    else:
        values = np.full(size, draw(st.integers(0, alphabet - 1)))
    return values.astype(np.int64), alphabet


@PROFILE
@given(symbol_arrays(), st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]))
def test_round_trip(case: tuple[npt.NDArray[np.int64], int], dtype: type[np.integer]) -> None:
    values, alphabet = case
    if alphabet > np.iinfo(dtype).max + 1:
        values, alphabet = values % (np.iinfo(dtype).max + 1), int(np.iinfo(dtype).max) + 1
    data = huffman.encode(values.astype(dtype), alphabet)
    decoded = huffman.decode(data, max_symbols=values.size)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, values)


def test_empty_and_single_symbol_carry_no_bits() -> None:
    empty = huffman.encode(np.array([], dtype=np.uint8), 4)
    assert huffman.decode(empty, max_symbols=0).size == 0
    single = huffman.encode(np.full(10_000, 3), 4)
    assert len(single) < 32
    np.testing.assert_array_equal(huffman.decode(single, max_symbols=10_000), np.full(10_000, 3))


def test_multidimensional_input_is_flattened() -> None:
    values = np.arange(24).reshape(2, 3, 4) % 5
    np.testing.assert_array_equal(huffman.decode(huffman.encode(values, 5), max_symbols=24), values.ravel())


def _entropy_bits(values: npt.NDArray[np.integer]) -> float:
    counts = np.bincount(values)
    p = counts[counts > 0] / values.size
    return float(-(p * np.log2(p)).sum() * values.size)


@pytest.mark.parametrize(("alphabet", "exponent"), [(16, 1.2), (32, 1.5), (256, 1.1), (4096, 1.05)])
def test_skewed_indices_compress_to_near_entropy(alphabet: int, exponent: float) -> None:
    rng = np.random.default_rng(alphabet)
    weights = 1.0 / np.arange(1, alphabet + 1) ** exponent
    values = rng.choice(alphabet, 200_000, p=weights / weights.sum())
    data = huffman.encode(values, alphabet)
    fixed = huffman.fixed_width_bytes(values.size, math.ceil(math.log2(alphabet)))
    assert len(data) < 0.9 * fixed
    entropy = _entropy_bits(values)
    # Huffman is within 1 bit per symbol of entropy in theory; on these tails within a few %.
    table_and_header = 15 + 4 * alphabet
    sync_index = 4 * (values.size // 1024 + 1)
    assert 8 * len(data) <= 1.03 * entropy + 8 * (table_and_header + sync_index)


def _fibonacci(count: int) -> list[int]:
    out = [1, 1]
    while len(out) < count:
        out.append(out[-1] + out[-2])
    return out


def test_code_lengths_are_limited_for_fibonacci_frequencies() -> None:
    frequencies = np.array(_fibonacci(60), dtype=np.int64)
    lengths = huffman.code_lengths(frequencies)
    assert int(lengths.max()) == huffman.MAX_CODE_LENGTH
    kraft = sum(2.0 ** -int(length) for length in lengths)
    assert kraft == 1.0


def test_round_trip_through_long_codes() -> None:
    # Fibonacci counts of 27 symbols build a 26-deep tree: the limiter and codes over 16 bits run.
    counts = _fibonacci(27)
    values = np.repeat(np.arange(27), counts)
    np.random.default_rng(0).shuffle(values)
    data = huffman.encode(values, 27)
    assert data[1] == huffman.MAX_CODE_LENGTH
    np.testing.assert_array_equal(huffman.decode(data, max_symbols=values.size), values)


@PROFILE
@given(st.integers(1, 16), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_fixed_width_round_trip(bits: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, count)
    data = huffman.pack_fixed(values, bits)
    assert len(data) == huffman.fixed_width_bytes(count, bits)
    np.testing.assert_array_equal(huffman.unpack_fixed(data, count, bits), values)


def test_fixed_width_refuses_bad_input() -> None:
    with pytest.raises(BundleError, match="need"):
        huffman.unpack_fixed(b"\x00" * 3, 5, 8)
    with pytest.raises(BundleError, match="padding"):
        huffman.unpack_fixed(b"\x01", 1, 4)
    with pytest.raises(BundleError, match="bits"):
        huffman.unpack_fixed(b"", 0, 17)
    with pytest.raises(BundleError, match="lie in"):
        huffman.pack_fixed(np.array([16]), 4)


@pytest.mark.parametrize(
    ("values", "alphabet", "match"),
    [
        (np.array([0, 5]), 5, "lie in"),
        (np.array([-1, 0]), 5, "lie in"),
        (np.array([0.5]), 5, "integers"),
        (np.array([0]), 0, "alphabet size"),
        (np.array([0]), 65537, "alphabet size"),
    ],
)
def test_encode_refuses_bad_input(values: npt.NDArray[np.generic], alphabet: int, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        huffman.encode(values, alphabet)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- decoding as a boundary

VALID = huffman.encode(np.random.default_rng(7).choice(6, 3000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]), 6)


def _with_header(**fields: int) -> bytes:
    names = ["version", "max_length", "block_log2", "alphabet", "count"]
    header = dict(zip(names, struct.unpack_from("<BBBIQ", VALID), strict=True))
    header.update(fields)
    return struct.pack("<BBBIQ", *(header[n] for n in names)) + VALID[15:]


def _stream(
    table: list[int], *, alphabet: int = 4, max_length: int = 3, count: int = 8, body: bytes = b"\x00" * 4
) -> bytes:
    return struct.pack("<BBBIQ", 1, max_length, 10, alphabet, count) + bytes(table) + body


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (VALID[:10], "truncated"),
        (_with_header(version=2), "version"),
        (_with_header(alphabet=0), "alphabet size"),
        (_with_header(alphabet=65537), "alphabet size"),
        (_with_header(count=2**64 - 1), "more than the allowed"),
        (_with_header(max_length=25), "exceeds"),
        (_with_header(block_log2=30), "sync block"),
        (_with_header(max_length=20), "table has"),
        (_stream([2, 2], body=b""), "table truncated after 2 of 4"),
        (_stream([1, 1, 2], max_length=2), "over-subscribed"),
        (_stream([2, 2, 2, 3]), "incomplete"),
        (_stream([1, 30, 30]), "exceeds"),
        (_stream([2], alphabet=1, max_length=2, count=5, body=b""), "single used symbol"),
        (_stream([1], alphabet=1, max_length=1, count=5, body=b"\x00"), "trailing"),
        (_stream([0, 0], alphabet=2, max_length=0, count=5, body=b""), "empty stream"),
        (_stream([1, 1], alphabet=2, max_length=1, count=0, body=b""), "empty stream"),
        (_stream([1, 1], alphabet=2, max_length=1, count=9, body=b"\xff\xc0"), "padding"),
        (_stream([0xFF, 1], alphabet=3, body=b""), "inside a run"),
        (_stream([0xFF, 1, 0xFF, 0xFF], alphabet=3), "more than 3 symbols"),
        (VALID[:-1], "truncated|too short|sync index"),
        (VALID + b"\x00" * 2, "trailing|sync index|too long"),
        (VALID + b"\x00" * 4000, "too long"),
        (_with_header(count=100), "too long"),
    ],
)
def test_decode_names_the_problem(data: bytes, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        huffman.decode(data, max_symbols=10_000)


def test_decode_refuses_more_than_the_callers_bound() -> None:
    with pytest.raises(BundleError, match="more than the allowed 2999"):
        huffman.decode(VALID, max_symbols=2999)
    assert huffman.decode(VALID, max_symbols=3000).size == 3000


def test_decode_checks_counts_before_allocating() -> None:
    # A 4-billion-symbol claim in a few bytes is refused by arithmetic, not by running out of memory.
    single = huffman.encode(np.zeros(3, dtype=np.uint8), 1)
    block_log2 = huffman._block_log2(2**32)  # the block size an encoder would use: the index check runs
    huge = struct.pack("<BBBIQ", 1, 2, block_log2, 4, 2**32) + bytes([2, 2, 2, 2]) + b"\x00" * 8
    with pytest.raises(BundleError, match="sync index truncated"):
        huffman.decode(huge, max_symbols=2**40)
    with pytest.raises(BundleError, match="more than the allowed"):
        huffman.decode(single[:7] + struct.pack("<Q", 2**40) + single[15:], max_symbols=2**20)


def test_a_block_size_other_than_the_encoders_is_refused() -> None:
    # Few huge blocks would make the lane decoder crawl; the block size follows from the count.
    data = bytearray(huffman.encode(np.arange(70000) % 2, 2))
    data[2] = 16 if data[2] != 16 else 8
    with pytest.raises(BundleError, match="sync block size"):
        huffman.decode(bytes(data), max_symbols=70000)


def _declared_count(data: bytes) -> int:
    return int(struct.unpack_from("<Q", data, 7)[0])


def _decode_or_refuse(data: bytes) -> None:
    try:
        decoded = huffman.decode(data, max_symbols=FUZZ_MAX_SYMBOLS)
    except BundleError:
        return
    assert decoded.dtype == np.uint16
    assert decoded.size == _declared_count(data) <= FUZZ_MAX_SYMBOLS


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    values, alphabet = draw(symbol_arrays())
    values = values[:FUZZ_MAX_SYMBOLS]
    data = bytearray(huffman.encode(values, alphabet))
    for _ in range(draw(st.integers(1, 4))):
        mutation = draw(st.sampled_from(["flip", "truncate", "extend", "header", "splice"]))
        if mutation == "flip" and data:
            bit = draw(st.integers(0, 8 * len(data) - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        elif mutation == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif mutation == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif mutation == "header" and len(data) >= 15:
            offset, size = draw(st.sampled_from([(0, 1), (1, 1), (2, 1), (3, 4), (7, 8)]))
            data[offset : offset + size] = draw(st.integers(0, 256**size - 1)).to_bytes(size, "little")
        elif mutation == "splice" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at : at + 4] = draw(st.binary(min_size=0, max_size=8))
    return bytes(data)


@FUZZ_PROFILE
@given(st.binary(max_size=512))
def test_fuzz_decode_arbitrary_bytes(data: bytes) -> None:
    _decode_or_refuse(data)


@FUZZ_PROFILE
@given(st.binary(min_size=15, max_size=15), st.binary(max_size=256))
def test_fuzz_decode_plausible_headers(header: bytes, body: bytes) -> None:
    # Arbitrary headers rarely pass the version byte; force it so the later checks are reached.
    _decode_or_refuse(b"\x01" + header[1:] + body)


@FUZZ_PROFILE
@given(mutated_encodings())
def test_fuzz_decode_mutated_encodings(data: bytes) -> None:
    _decode_or_refuse(data)
