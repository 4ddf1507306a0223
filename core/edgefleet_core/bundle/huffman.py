"""Canonical Huffman coding of clustered/quantized weight indices, and fixed-width packing.

This codec is ours on purpose. The bundle format needs a simple, fully specified stream for
weight indices whose decoder is a security boundary: it must bound every length and count before
allocating, decode in bounded time, and trust nothing the encoder wrote. General-purpose codecs
(zstd, which the bundle also uses and compares against) give no such per-field guarantees for a
Huffman layer, and the format here is small enough to specify in full below.

Stream layout (all integers little-endian)::

    offset  size  field
    0       1     format version (1)
    1       1     maximum code length L, 0..24 (0 only for an empty stream)
    2       1     log2 of the sync block size S, 8..16 (symbols per block)
    3       4     alphabet size A, 1..65536
    7       8     symbol count n
    15      ...   code-length table: A lengths, run-length coded (see below)
    ...     ...   sync index: ceil(n / S) - 1 block sizes in bits, u16 if S * L < 65536 else u32
    ...     ...   bit stream: the codes of the n symbols, MSB first, zero-padded to a byte

Code-length table: a sequence of entries, each either one byte ``0..24`` (the length of the next
symbol, 0 = unused) or ``0xFF, length (u8), run - 1 (u16)`` (``run`` symbols of that length). The
entries describe exactly A symbols. Codes are canonical: symbols sorted by (length, symbol value)
get consecutive codes, so the lengths alone define the code. With two or more used symbols the
code must be complete (Kraft sum exactly 1); a single used symbol has length 1 and transmits no
bits at all; an empty stream has no used symbols.

Sync index: block *k* holds symbols ``[k*S, (k+1)*S)``; its size in bits is recorded for every
block but the last. It is what lets the decoder run all blocks side by side as numpy lanes. The
decoder does not trust it: each block must decode to exactly the recorded end, the last block must
end in the final byte, and the padding bits must be zero.

Code lengths are limited to 24 bits, which keeps decode tables small: optimal Huffman lengths are
clamped and the Kraft sum rebalanced (the heuristic zstd and brotli use; see ``_limit_lengths``).
"""

from __future__ import annotations

import bisect
import heapq
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet_core.errors import BundleError

FORMAT_VERSION = 1
"""The version byte this module writes and the only one it reads."""
MAX_ALPHABET = 65536
"""Largest alphabet (number of distinct symbol values) a stream may declare."""
MAX_CODE_LENGTH = 24
"""Longest code a stream may use, in bits."""
MIN_BLOCK_LOG2 = 8
MAX_BLOCK_LOG2 = 16

_HEADER = struct.Struct("<BBBIQ")
_RUN_MARKER = 0xFF
_RUN = struct.Struct("<BH")
_LUT_BITS = 16
"""Codes up to this length decode with one table lookup; longer ones take a searchsorted path."""
_PACK_CHUNK = 1 << 20
"""Symbols packed per numpy pass in the encoder, to bound its temporary memory."""


# ----------------------------------------------------------------------------- code construction


def code_lengths(frequencies: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """Length-limited Huffman code lengths (≤ 24 bits) for a table of symbol frequencies.

    Unused symbols (frequency 0) get length 0. With a single used symbol its length is 1. The
    result is always a complete code when two or more symbols are used.
    """
    freqs = np.asarray(frequencies)
    if freqs.ndim != 1 or freqs.size > MAX_ALPHABET:
        raise BundleError(f"frequency table must be one-dimensional with at most {MAX_ALPHABET} entries")
    if freqs.size and int(freqs.min()) < 0:
        raise BundleError("frequencies must not be negative")
    lengths = np.zeros(freqs.size, dtype=np.uint8)
    used = np.flatnonzero(freqs)
    if used.size == 1:
        lengths[used] = 1
    elif used.size > 1:
        weights = freqs[used]
        depths = sorted(_huffman_depths([int(w) for w in weights]))
        if depths[-1] > MAX_CODE_LENGTH:
            depths = _limit_lengths(depths)
        # Shortest codes to the most frequent symbols (ties by symbol value, for determinism).
        by_frequency = used[np.lexsort((used, -weights.astype(np.int64)))]
        lengths[by_frequency] = depths
    return lengths


def _limit_lengths(depths: list[int]) -> list[int]:
    """Turn non-decreasing code lengths into a complete code with no length over 24 bits.

    Clamp, then pay the Kraft debt by lengthening the least frequent codes still under the limit,
    then spend any overshoot by shortening the most frequent of the longest codes. Every sum here
    is a multiple of the longest code's unit, so the second loop lands on a complete code exactly.
    The order stays non-decreasing throughout.
    """
    limit = MAX_CODE_LENGTH
    out = [min(d, limit) for d in depths]
    budget = 1 << limit
    total = sum(1 << (limit - d) for d in out)
    last = len(out) - 1
    while total > budget:
        # Terminates: with ≤ 65536 ≤ 2**24 codes all at the limit, the sum fits the budget.
        while out[last] >= limit:
            last -= 1
        total -= 1 << (limit - out[last] - 1)
        out[last] += 1
    while total < budget:
        longest = out[-1]
        first = bisect.bisect_left(out, longest)
        out[first] -= 1
        total += 1 << (limit - longest)
    return out


def _huffman_depths(weights: list[int]) -> list[int]:
    count = len(weights)
    heap = [(w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * count - 1)
    next_node = count
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_node
        heapq.heappush(heap, (w1 + w2, next_node))
        next_node += 1
    depth = [0] * (2 * count - 1)
    # Internal nodes are numbered in creation order, so every parent has a larger number.
    for node in range(2 * count - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return depth[:count]


class _Canonical:
    """The canonical code defined by a table of code lengths (one code of ≥ 2 symbols)."""

    def __init__(self, lengths: npt.NDArray[np.uint8]) -> None:
        used = np.flatnonzero(lengths)
        order = used[np.argsort(lengths[used], kind="stable")]
        self.sorted_symbols = order.astype(np.uint16)
        self.sorted_lengths = lengths[order].astype(np.int64)
        per_length = np.bincount(self.sorted_lengths, minlength=MAX_CODE_LENGTH + 1)
        first_code = np.zeros(MAX_CODE_LENGTH + 2, dtype=np.int64)
        code = 0
        for length in range(1, MAX_CODE_LENGTH + 1):
            code = (code + int(per_length[length - 1])) << 1
            first_code[length] = code
        first_index = np.zeros(MAX_CODE_LENGTH + 2, dtype=np.int64)
        first_index[1:] = np.cumsum(per_length)
        self.first_code = first_code
        self.first_index = first_index
        # Left-justified (to 24 bits) end of each length's code range; non-decreasing in length.
        shifts = MAX_CODE_LENGTH - np.arange(1, MAX_CODE_LENGTH + 1)
        self.limits = (first_code[1:-1] + per_length[1:]) << shifts
        ranks = np.arange(order.size, dtype=np.int64) - first_index[self.sorted_lengths]
        self.sorted_codes = first_code[self.sorted_lengths] + ranks

    def lookup_table(self, bits: int) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint64]]:
        """Symbol and code length for every ``bits``-bit prefix; length 0 marks a longer code."""
        short = self.sorted_lengths <= bits
        repeats = np.left_shift(1, bits - self.sorted_lengths[short])
        symbols = np.zeros(1 << bits, dtype=np.uint16)
        lengths = np.zeros(1 << bits, dtype=np.uint64)
        # Canonical codes in (length, symbol) order cover the table left to right without gaps.
        covered = int(repeats.sum())
        symbols[:covered] = np.repeat(self.sorted_symbols[short], repeats)
        lengths[:covered] = np.repeat(self.sorted_lengths[short].astype(np.uint64), repeats)
        return symbols, lengths


# ----------------------------------------------------------------------------- bit packing


def _pack_bits(codes: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint64]) -> tuple[bytes, npt.NDArray[np.uint64]]:
    """Concatenate variable-length codes MSB first; also return the bit offset after each code."""
    ends = np.cumsum(lengths, dtype=np.uint64)
    total = int(ends[-1]) if ends.size else 0
    words = np.zeros(total // 64 + 2, dtype=np.uint64)
    for lo in range(0, codes.size, _PACK_CHUNK):
        hi = min(lo + _PACK_CHUNK, codes.size)
        code = codes[lo:hi]
        length = lengths[lo:hi]
        start = ends[lo:hi] - length
        word = (start >> np.uint64(6)).astype(np.intp)
        end_in_word = (start & np.uint64(63)).astype(np.int64) + length.astype(np.int64)  # 1..88
        fits = end_in_word <= 64
        left = np.clip(64 - end_in_word, 0, 63).astype(np.uint64)
        right = np.clip(end_in_word - 64, 0, 63).astype(np.uint64)
        part = np.where(fits, code << left, code >> right)
        # Codes sharing a word are adjacent (offsets increase), so OR-reduce each run of them.
        first = np.concatenate(([0], np.flatnonzero(np.diff(word)) + 1))
        words[word[first]] |= np.bitwise_or.reduceat(part, first)
        spills = np.flatnonzero(~fits)
        if spills.size:
            spill_shift = (128 - end_in_word[spills]).astype(np.uint64)
            # At most one code crosses into any given word, so these indices are distinct.
            words[word[spills] + 1] |= code[spills] << spill_shift
    return words.astype(">u8").tobytes()[: (total + 7) // 8], ends


def fixed_width_bytes(count: int, bits: int) -> int:
    """Size in bytes of ``count`` values packed at ``bits`` bits each (MSB first, zero-padded)."""
    return (count * bits + 7) // 8


def pack_fixed(symbols: npt.NDArray[np.integer], bits: int) -> bytes:
    """Pack values into ``bits`` bits each (1..16), MSB first; the baseline Huffman is compared to."""
    _check_fixed_bits(bits)
    values = np.asarray(symbols).reshape(-1)
    _check_integer_array(values)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise BundleError(f"values must lie in [0, {1 << bits}) to pack at {bits} bits")
    data, _ = _pack_bits(values.astype(np.uint64), np.full(values.size, bits, dtype=np.uint64))
    return data


def unpack_fixed(data: bytes, count: int, bits: int) -> npt.NDArray[np.uint16]:
    """Inverse of :func:`pack_fixed`; the data must be exactly the packed size with zero padding."""
    _check_fixed_bits(bits)
    if count < 0:
        raise BundleError(f"fixed-width count must not be negative, got {count}")
    expected = fixed_width_bytes(count, bits)
    if len(data) != expected:
        raise BundleError(f"fixed-width data is {len(data)} bytes, {count} values at {bits} bits need {expected}")
    total = count * bits
    _check_padding(data, total)
    words = _byte_windows(data, 0)
    out = np.empty(count, dtype=np.uint16)
    for lo in range(0, count, _PACK_CHUNK):
        hi = min(lo + _PACK_CHUNK, count)
        start = np.arange(lo, hi, dtype=np.uint64) * np.uint64(bits)
        window = words[start >> np.uint64(3)] << (start & np.uint64(7))
        out[lo:hi] = window >> np.uint64(64 - bits)
    return out


def _check_fixed_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise BundleError(f"fixed-width packing takes 1..16 bits per value, got {bits}")


def _check_integer_array(values: npt.NDArray[np.generic]) -> None:
    if not np.issubdtype(values.dtype, np.integer):
        raise BundleError(f"symbols must be integers, got dtype {values.dtype}")


def _byte_windows(data: bytes, extra: int) -> npt.NDArray[np.uint64]:
    """Big-endian 64-bit word starting at every byte of ``data`` (zero-padded by ``extra`` + 8)."""
    padded = np.zeros(len(data) + extra + 8, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    # An overlapping, unaligned view: no copy, one gather per lookup.
    view: npt.NDArray[np.uint64] = np.ndarray(
        shape=(len(data) + extra + 1,), dtype=">u8", buffer=padded.data, strides=(1,)
    )
    return view


def _check_padding(stream: bytes, used_bits: int) -> None:
    needed = (used_bits + 7) // 8
    if len(stream) < needed:
        raise BundleError(f"bit stream truncated: the codes end at bit {used_bits}, past its {len(stream)} bytes")
    if len(stream) > needed:
        raise BundleError(f"{len(stream) - needed} bytes of trailing data after the bit stream")
    spare = -used_bits % 8
    if spare and stream[-1] & ((1 << spare) - 1):
        raise BundleError("bit stream padding is not zero")


# ----------------------------------------------------------------------------- encode


def encode(symbols: npt.NDArray[np.integer], alphabet_size: int) -> bytes:
    """Huffman-code ``symbols`` (values in ``[0, alphabet_size)``) into a self-describing stream."""
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise BundleError(f"alphabet size must be 1..{MAX_ALPHABET}, got {alphabet_size}")
    values = np.asarray(symbols).reshape(-1)
    _check_integer_array(values)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= alphabet_size):
        raise BundleError(f"symbols must lie in [0, {alphabet_size})")
    count = values.size
    index = values.astype(np.intp)
    lengths = code_lengths(np.bincount(index, minlength=alphabet_size))
    max_length = int(lengths.max())
    block_log2 = _block_log2(count)
    parts = [_HEADER.pack(FORMAT_VERSION, max_length, block_log2, alphabet_size, count), _length_table(lengths)]
    if np.count_nonzero(lengths) >= 2:
        canonical = _Canonical(lengths)
        code_of = np.zeros(alphabet_size, dtype=np.uint64)
        code_of[canonical.sorted_symbols] = canonical.sorted_codes.astype(np.uint64)
        stream, ends = _pack_bits(code_of[index], lengths.astype(np.uint64)[index])
        block = 1 << block_log2
        boundaries = ends[block - 1 :: block][: (count - 1) // block]
        block_bits = np.diff(boundaries, prepend=np.uint64(0))
        parts += [block_bits.astype(_index_dtype(block_log2, max_length)).tobytes(), stream]
    return b"".join(parts)


def _block_log2(count: int) -> int:
    """Sync block size: ≥ 1024 symbols (small index), and about 2048 blocks for large inputs."""
    log2 = 10
    while log2 < MAX_BLOCK_LOG2 and (count >> log2) > 2048:
        log2 += 1
    return log2


def _index_dtype(block_log2: int, max_length: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype("<u2") if (max_length << block_log2) < 1 << 16 else np.dtype("<u4")


def _length_table(lengths: npt.NDArray[np.uint8]) -> bytes:
    out = bytearray()
    change = np.flatnonzero(np.diff(lengths.astype(np.int16))) + 1
    starts = np.concatenate(([0], change)).tolist()
    stops = [*starts[1:], lengths.size]
    for start, stop in zip(starts, stops, strict=True):
        value = int(lengths[start])
        run = stop - start
        while run >= 4:
            step = min(run, 1 << 16)
            out.append(_RUN_MARKER)
            out += _RUN.pack(value, step - 1)
            run -= step
        out += bytes([value]) * run
    return bytes(out)


# ----------------------------------------------------------------------------- decode


def decode(data: bytes, *, max_symbols: int) -> npt.NDArray[np.uint16]:
    """Decode a stream written by :func:`encode`, refusing more than ``max_symbols`` symbols.

    Every field is checked before the output is allocated; malformed input raises
    :class:`BundleError` naming the problem.
    """
    header = _parse_header(data, max_symbols)
    lengths, offset = _parse_length_table(data, _HEADER.size, header.alphabet_size)
    if int(lengths.max()) != header.max_length:
        raise BundleError(f"header says maximum code length {header.max_length}, the table has {int(lengths.max())}")
    used = np.flatnonzero(lengths)
    count = header.count
    if used.size == 0 or count == 0:
        if used.size or count:
            raise BundleError("an empty stream must have no used symbols, and used symbols need a non-empty stream")
        _expect_end(data, offset)
        return np.empty(0, dtype=np.uint16)
    if used.size == 1:
        if header.max_length != 1:
            raise BundleError(f"a single used symbol must have code length 1, not {header.max_length}")
        _expect_end(data, offset)
        return np.full(count, used[0], dtype=np.uint16)
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - lengths[used].astype(np.int64))))
    if kraft != 1 << MAX_CODE_LENGTH:
        problem = "over-subscribed" if kraft > 1 << MAX_CODE_LENGTH else "incomplete"
        raise BundleError(f"code lengths are {problem} (Kraft sum {kraft / (1 << MAX_CODE_LENGTH)} != 1)")
    min_length = int(lengths[used].min())
    starts, stream = _read_sync_index(data, offset, header, min_length)
    return _decode_lanes(stream, starts, count, 1 << header.block_log2, _Canonical(lengths))


@dataclass(frozen=True)
class _Header:
    max_length: int
    block_log2: int
    alphabet_size: int
    count: int


def _parse_header(data: bytes, max_symbols: int) -> _Header:
    if max_symbols < 0:
        raise BundleError(f"max_symbols must not be negative, got {max_symbols}")
    if len(data) < _HEADER.size:
        raise BundleError(f"Huffman stream truncated: {len(data)} bytes, the header alone is {_HEADER.size}")
    version, max_length, block_log2, alphabet_size, count = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BundleError(f"unsupported Huffman format version {version} (this decoder reads {FORMAT_VERSION})")
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise BundleError(f"alphabet size {alphabet_size} outside 1..{MAX_ALPHABET}")
    if count > max_symbols:
        raise BundleError(f"stream declares {count} symbols, more than the allowed {max_symbols}")
    if max_length > MAX_CODE_LENGTH:
        raise BundleError(f"maximum code length {max_length} exceeds {MAX_CODE_LENGTH}")
    if not MIN_BLOCK_LOG2 <= block_log2 <= MAX_BLOCK_LOG2:
        raise BundleError(f"sync block size 2**{block_log2} outside 2**{MIN_BLOCK_LOG2}..2**{MAX_BLOCK_LOG2}")
    if block_log2 != _block_log2(count):
        # The encoder's choice is a function of the count; any other block size only serves to make
        # decoding slow (few lanes, many steps), so it is refused.
        raise BundleError(f"sync block size 2**{block_log2} is not the one for {count} symbols")
    return _Header(max_length, block_log2, alphabet_size, count)


def _parse_length_table(data: bytes, offset: int, alphabet_size: int) -> tuple[npt.NDArray[np.uint8], int]:
    lengths = np.zeros(alphabet_size, dtype=np.uint8)
    filled = 0
    end = len(data)
    # Each entry consumes at least one byte and one symbol: bounded by min(len(data), alphabet).
    while filled < alphabet_size:
        if offset >= end:
            raise BundleError(f"code-length table truncated after {filled} of {alphabet_size} symbols")
        value = data[offset]
        if value == _RUN_MARKER:
            if offset + 1 + _RUN.size > end:
                raise BundleError("code-length table truncated inside a run")
            value, run_less_one = _RUN.unpack_from(data, offset + 1)
            run = run_less_one + 1
            offset += 1 + _RUN.size
        else:
            run = 1
            offset += 1
        if value > MAX_CODE_LENGTH:
            raise BundleError(f"code length {value} exceeds {MAX_CODE_LENGTH}")
        if filled + run > alphabet_size:
            raise BundleError(f"code-length table describes more than {alphabet_size} symbols")
        lengths[filled : filled + run] = value
        filled += run
    return lengths, offset


def _expect_end(data: bytes, offset: int) -> None:
    if offset != len(data):
        raise BundleError(f"{len(data) - offset} bytes of trailing data after a stream that carries no bits")


def _read_sync_index(
    data: bytes, offset: int, header: _Header, min_length: int
) -> tuple[npt.NDArray[np.uint64], bytes]:
    """Bit offset of every block's first code, and the bit stream; checked against each other."""
    count, max_length, block = header.count, header.max_length, 1 << header.block_log2
    blocks = -(-count // block)
    index_dtype = _index_dtype(header.block_log2, max_length)
    index_end = offset + (blocks - 1) * index_dtype.itemsize
    if index_end > len(data):
        raise BundleError(f"sync index truncated: {blocks - 1} entries need {index_end - offset} bytes")
    block_bits = np.frombuffer(data, dtype=index_dtype, count=blocks - 1, offset=offset).astype(np.int64)
    stream = data[index_end:]
    stream_bits = 8 * len(stream)
    if count * min_length > stream_bits:
        raise BundleError(f"bit stream of {stream_bits} bits is too short for {count} symbols")
    if count * max_length < stream_bits - 7:
        raise BundleError(f"bit stream of {stream_bits} bits is too long for {count} symbols")
    if block_bits.size and (block_bits.min() < block * min_length or block_bits.max() > block * max_length):
        raise BundleError("sync index has a block size impossible for the code lengths")
    starts = np.concatenate(([0], np.cumsum(block_bits))).astype(np.uint64)
    tail = count - (blocks - 1) * block
    indexed_bits = int(starts[-1])
    if indexed_bits + tail * min_length > stream_bits or indexed_bits + tail * max_length < stream_bits - 7:
        raise BundleError("sync index does not match the length of the bit stream")
    return starts, stream


def _decode_lanes(
    stream: bytes, starts: npt.NDArray[np.uint64], count: int, block: int, canonical: _Canonical
) -> npt.NDArray[np.uint16]:
    """Decode every sync block at once, one numpy lane per block, one code per lane per step."""
    max_length = int(canonical.sorted_lengths[-1])
    lut_bits = min(max_length, _LUT_BITS)
    lut_symbol, lut_length = canonical.lookup_table(lut_bits)
    # Lanes that run past their block read zeros from this padding, never outside the buffer.
    words = _byte_windows(stream, 3 * block + 8)
    out = np.empty(count, dtype=np.uint16)
    # The last block (``tail`` symbols, 1..S) is the last lane; it drops out after ``tail`` steps.
    head = starts.size - 1
    tail = count - head * block
    grid = out[: head * block].reshape(head, block)
    last = out[head * block :]
    position = starts.copy()
    last_end = -1
    lut_shift = np.uint64(64 - lut_bits)
    for step in range(block if head else tail):
        if step == tail:
            last_end = int(position[head])
            position = position[:head]
        window = words[position >> np.uint64(3)] << (position & np.uint64(7))
        key = window >> lut_shift
        symbol = lut_symbol[key]
        length = lut_length[key]
        if max_length > lut_bits:
            slow = np.flatnonzero(length == 0)
            if slow.size:
                symbol[slow], length[slow] = _decode_long(window[slow], canonical)
        if head:
            grid[:, step] = symbol[:head]
        if step < tail:
            last[step] = symbol[head]
        position += length
    if last_end < 0:  # the last lane ran to the end of the loop
        last_end = int(position[head])
    if head and not np.array_equal(position[:head], starts[1:]):
        raise BundleError("a sync block does not end where the sync index says: corrupt bit stream")
    _check_padding(stream, last_end)
    return out


def _decode_long(
    window: npt.NDArray[np.uint64], canonical: _Canonical
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint64]]:
    top = (window >> np.uint64(64 - MAX_CODE_LENGTH)).astype(np.int64)
    length = np.searchsorted(canonical.limits, top, side="right") + 1
    # A complete code covers every window, so length ≤ 24; clip guards a bug, not the input.
    length = np.minimum(length, MAX_CODE_LENGTH)
    code = top >> (MAX_CODE_LENGTH - length)
    rank = canonical.first_index[length] + code - canonical.first_code[length]
    rank = np.clip(rank, 0, canonical.sorted_symbols.size - 1)
    return canonical.sorted_symbols[rank], length.astype(np.uint64)
