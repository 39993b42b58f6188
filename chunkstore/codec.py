"""Chunk compression: zstd, or the bytes as they are when zstd does not pay.

Compressors are not thread-safe, so each thread keeps its own (thread-local);
python-zstandard releases the GIL while it works, which is what lets the
backup pipeline compress on every core.
"""

from __future__ import annotations

import threading

import zstandard

from chunkstore.errors import IntegrityError

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}


class Codec:
    """Compresses and decompresses chunks at one store's zstd level."""

    def __init__(self, level: int):
        self.level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            # Content size in the frame lets decompress() size its output
            # exactly; no checksum, the pack record carries one already.
            c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.c = c
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = zstandard.ZstdDecompressor()
            self._local.d = d
        return d

    def encode(self, raw) -> tuple[int, bytes]:
        """(codec, payload).  Stored raw unless zstd saves at least 1/32."""
        n = len(raw)
        packed = self._compressor().compress(raw)
        if len(packed) > n - (n >> 5):
            return CODEC_RAW, bytes(raw)
        return CODEC_ZSTD, packed

    def encode_many(self, raws: list) -> list[tuple[int, object]]:
        """``encode`` for a batch, in one call that releases the GIL once.

        Per-chunk calls each drop and retake the GIL; with small chunks the
        threads then spend a measurable share of their time queueing for it.
        Compressed payloads are zstd buffer segments (bytes-like, kept alive
        by their collection); raw ones are the inputs themselves, not copies,
        so the caller must write them before it reuses the input buffers.
        """
        if not raws:
            return []
        packed = self._compressor().multi_compress_to_buffer(raws, threads=1)
        out = []
        for raw, frame in zip(raws, packed):
            n = len(raw)
            if len(frame) > n - (n >> 5):
                out.append((CODEC_RAW, raw))
            else:
                out.append((CODEC_ZSTD, frame))
        return out

    def decode(self, codec: int, payload, raw_len: int) -> bytes:
        if codec == CODEC_RAW:
            if len(payload) != raw_len:
                raise IntegrityError(f"raw chunk holds {len(payload)} bytes, header says {raw_len}")
            return bytes(payload)
        if codec == CODEC_ZSTD:
            # python-zstandard sizes its output by the frame's declared content
            # size and ignores max_output_size when there is one: a crafted
            # frame declaring 2**62 bytes raised MemoryError, one declaring 3 GB
            # of real zeros took 3 GB.  So the declared size must be the
            # record's raw length (itself at most the chunk size), and a frame
            # without one is capped at it.
            try:
                declared = zstandard.frame_content_size(payload)
                if declared not in (-1, raw_len):
                    raise IntegrityError(f"zstd frame declares {declared} bytes, the record {raw_len}")
                out = self._decompressor().decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"zstd frame does not decompress: {e}") from None
            if len(out) != raw_len:
                raise IntegrityError(f"chunk decompressed to {len(out)} bytes, header says {raw_len}")
            return out
        raise IntegrityError(f"unknown codec {codec}")
