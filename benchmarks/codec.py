"""The sealer's choices, measured: JSON encoder, compressor, float32 rendering, AES-GCM.

Prints JSON: microseconds per batch of about 4 KB sealed and the sealed size, for each
combination, on batches of float32 readings like the e2e benchmark's (60 points per scan).

    python benchmarks/codec.py
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters.modbus.registers import float32_decimals, shortest_float32

NAMES = [f"float32_{i}" for i in range(60)]
BLOCK = struct.Struct(">60f")


def scans(raw_float32: bool, count: int = 14) -> dict[str, Any]:
    rng = random.Random(1)
    rows = []
    for t in range(count):
        values = [20 + 5 * math.sin(t / 10 + i) + rng.random() - 0.5 for i in range(60)]
        widened = [struct.unpack(">f", struct.pack(">f", v))[0] for v in values]
        shown = widened if raw_float32 else float32_decimals(widened, BLOCK)
        rows.append([1_795_900_000_000 + t * 100, 0, shown, "good"])
    return {"p": [NAMES], "s": rows}


def timed(fn: Callable[[], bytes], repeat: int = 2000) -> tuple[float, int]:
    out = fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6, len(out)


def main() -> None:
    aead = AESGCM(os.urandom(32))
    zstd1 = zstandard.ZstdCompressor(level=1)
    zstd3 = zstandard.ZstdCompressor(level=3)
    encoders: dict[str, Callable[[Any], bytes]] = {
        "orjson": orjson.dumps,
        "json": lambda d: json.dumps(d, separators=(",", ":")).encode(),
    }
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "zstd1": zstd1.compress,
        "zstd3": zstd3.compress,
        "zlib6": lambda b: zlib.compress(b, 6),
        "none": lambda b: b,
    }
    results = []
    for floats in ("shortest", "widened"):
        doc = scans(raw_float32=floats == "widened")
        readings = sum(len(r[2]) for r in doc["s"])
        for enc_name, enc in encoders.items():
            for comp_name, comp in compressors.items():

                def seal(
                    enc: Callable[[Any], bytes] = enc,
                    comp: Callable[[bytes], bytes] = comp,
                    doc: dict[str, Any] = doc,
                ) -> bytes:
                    nonce = os.urandom(12)
                    return nonce + aead.encrypt(nonce, comp(enc(doc)), b"aad")

                us, size = timed(seal, 300 if enc_name == "json" else 2000)
                results.append(
                    {
                        "floats": floats,
                        "encoder": enc_name,
                        "compressor": comp_name,
                        "readings": readings,
                        "us_per_batch": round(us, 1),
                        "sealed_bytes": size,
                        "bytes_per_reading": round(size / readings, 2),
                    }
                )
    plain = zstd1.compress(orjson.dumps(scans(False)))
    nonce = os.urandom(12)
    aes_us, _ = timed(lambda: aead.encrypt(nonce, plain.ljust(4000, b"x"), b"aad"), 20000)
    widened = scans(True)["s"][0][2]
    rounding_us, _ = timed(lambda: bytes(len([shortest_float32(v) for v in widened])), 5000)
    block_us, _ = timed(lambda: bytes(len(float32_decimals(widened, BLOCK))), 5000)
    print(
        json.dumps(
            {
                "aes_gcm_4kb_us": round(aes_us, 2),
                "shortest_float32_us_per_value": round(rounding_us / 60, 3),
                "float32_decimals_us_per_value_used": round(block_us / 60, 3),
                "combinations": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
