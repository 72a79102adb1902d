"""Fetches X.509 SVIDs and bundles from a Workload API socket with py-spiffe
(an independent client) and prints them as JSON on stdout.

Usage: py_spiffe_fetch.py /path/to/agent.sock
Exit 3 when py-spiffe cannot be imported, 4 on a Workload API error.
"""

import json
import sys

try:
    from spiffe import WorkloadApiClient
except Exception as exc:  # noqa: BLE001 - report any import failure
    print(f"py_spiffe_fetch: cannot import py-spiffe (`spiffe` package): {exc!r}", file=sys.stderr)
    sys.exit(3)


def main() -> int:
    sock = sys.argv[1]
    client = WorkloadApiClient(socket_path=f"unix://{sock}", default_timeout=10)
    try:
        ctx = client.fetch_x509_context()
        bundles = client.fetch_x509_bundles()
    except Exception as exc:  # noqa: BLE001
        print(f"py_spiffe_fetch: Workload API error: {exc!r}", file=sys.stderr)
        return 4
    finally:
        client.close()
    out = {
        "svids": [
            {
                "spiffe_id": str(s.spiffe_id),
                "serial": format(s.leaf.serial_number, "x"),
                "chain_len": len(s.cert_chain),
                "not_after": int(s.leaf.not_valid_after_utc.timestamp()),
                "key_curve": getattr(getattr(s.private_key, "curve", None), "name", None),
            }
            for s in ctx.x509_svids
        ],
        "bundles": {
            str(b.trust_domain): sorted(format(c.serial_number, "x") for c in b.x509_authorities)
            for b in bundles.bundles
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
