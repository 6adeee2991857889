"""The audit chain's cost, measured: CPU per appended record, per verified record (streaming
and whole-chain), per signed head and per verified head, for 100k records.

Prints JSON (microseconds of process CPU time, one core). Heads are signed every ``--every``
records (default 100), as a gateway would between flushes.

    python benchmarks/audit.py [--records 100000] [--every 100]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.core import audit
from gateway.identity.auditkeys import Signer

KINDS = ["admission", "quarantine", "command-refused", "config-loaded", "tamper"]


def cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def measure(signer: Signer, n: int, every: int) -> dict[str, Any]:
    public = signer.public()

    def build() -> list[audit.AuditRecord]:
        out: list[audit.AuditRecord] = []
        last = None
        for i in range(n):
            last = audit.append(
                last,
                1_795_900_000.0 + i / 1000,
                KINDS[i % 5],
                f"plc-{i % 100}",
                {"point": "setpoint", "value": i * 0.5, "rule": "range"},
                "gw-1",
            )
            out.append(last)
        return out

    append_s, records = cpu(build)
    targets = records[every - 1 :: every]
    sign_s, heads = cpu(lambda: [audit.sign_head(r, signer) for r in targets])
    check_s, _ = cpu(lambda: [audit.verify_head(x, public) for x in heads])
    by_seq = {h.seq: h for h in heads}

    def streaming() -> audit.Verdict:
        v = audit.ChainVerifier(public, "gw-1")
        for r in records:
            v.add(r)
            head = by_seq.get(r.seq)
            if head is not None:
                v.add_head(head)
        return v.verdict()

    stream_s, verdict = cpu(streaming)
    whole_s, whole = cpu(lambda: audit.verify(records, heads, public, "gw-1"))
    assert verdict.ok and whole.ok
    return {
        "append_us_per_record": round(append_s / n * 1e6, 2),
        "sign_us_per_head": round(sign_s / len(heads) * 1e6, 1),
        "verify_head_us": round(check_s / len(heads) * 1e6, 1),
        "stream_verify_us_per_record": round(stream_s / n * 1e6, 2),
        "verify_us_per_record": round(whole_s / n * 1e6, 2),
        "heads": len(heads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    n = args.records
    result: dict[str, Any] = {"records": n, "head_every": args.every}
    for name, signer in (
        ("ecdsa-p256-sha256", Signer.of(ec.generate_private_key(ec.SECP256R1()))),
        ("ed25519", Signer.of(ed25519.Ed25519PrivateKey.generate())),
    ):
        result[name] = measure(signer, n, args.every)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
