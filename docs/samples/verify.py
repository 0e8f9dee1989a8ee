"""Verify OpsIQ webhooks (signature scheme "opsiq-v1") with the Python standard library.

Usage in a receiver:

    from verify import verify, VerificationError

    try:
        verify(secrets, request.headers, request_target, raw_body, seen_nonces=nonce_cache)
    except VerificationError as err:
        return 400, err.reason

Run as a script to check this module against the published test vectors:

    python3 docs/samples/verify.py tests/fixtures/signing-vectors.json
"""

import hashlib
import hmac
import time

TOLERANCE_SECONDS = 300
REQUIRED_HEADERS = ("X-OpsIQ-Signature", "X-OpsIQ-Timestamp", "X-OpsIQ-Nonce", "Idempotency-Key")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class VerificationError(Exception):
    """A webhook was rejected; ``reason`` is the machine-readable word."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _header(headers, name):
    """Case-insensitive lookup in a mapping or a list of (name, value) pairs."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    wanted = name.lower()
    for key, value in pairs:
        if key.lower() == wanted:
            return value
    return None


def _parse_timestamp(value):
    text = value.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise VerificationError("malformed_header")
    return int(text)


def _decode_signature(value):
    """The 32 bytes of one ``sha256=<hex>`` value, or None when it is malformed."""
    if not value.startswith("sha256="):
        return None
    hex_part = value[len("sha256="):]
    if len(hex_part) != 64 or not set(hex_part) <= _HEX_DIGITS:
        return None
    return bytes.fromhex(hex_part)


def verify(secrets, headers, request_target, body: bytes, now=None, seen_nonces=None) -> None:
    """Verify one received webhook; return None when it is genuine, raise VerificationError otherwise.

    secrets:        the endpoint secrets you accept (several during a rotation), e.g. ["whsec_..."].
    headers:        the received headers (a mapping or (name, value) pairs; names are case-insensitive).
    request_target: the URL path plus "?query" if any, exactly as received (e.g. "/hooks/opsiq?tenant=acme").
    body:           the raw request body bytes, exactly as received; never re-serialised JSON.
    now:            unix seconds; defaults to the current time.
    seen_nonces:    a set of nonces already accepted within the window; the nonce of a verified
                    request is added to it. Pass None to skip replay protection.
    """
    values = {name: _header(headers, name) for name in REQUIRED_HEADERS}
    if any(value is None for value in values.values()):
        raise VerificationError("missing_header")
    timestamp = values["X-OpsIQ-Timestamp"]
    nonce = values["X-OpsIQ-Nonce"]
    idempotency_key = values["Idempotency-Key"]

    ts = _parse_timestamp(timestamp)
    if now is None:
        now = int(time.time())
    if abs(now - ts) > TOLERANCE_SECONDS:
        raise VerificationError("timestamp_out_of_window")

    signed = b".".join(
        [timestamp.encode(), nonce.encode(), idempotency_key.encode(), request_target.encode(), body]
    )
    expected = [hmac.new(secret.encode(), signed, hashlib.sha256).digest() for secret in secrets]
    candidates = [_decode_signature(v.strip()) for v in values["X-OpsIQ-Signature"].split(",")]
    matched = False
    for candidate in candidates:
        if candidate is None:
            continue
        for digest in expected:
            # Check every pair (no early exit) so timing reveals nothing about which one matched.
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise VerificationError("signature_mismatch")

    if seen_nonces is not None:
        if nonce in seen_nonces:
            raise VerificationError("duplicate_nonce")
        # Recorded only now, after the signature held, so forged requests cannot fill the cache.
        seen_nonces.add(nonce)


def _run_vectors(path):
    import base64
    import json

    with open(path, encoding="utf-8") as f:
        cases = json.load(f)["cases"]

    failures = 0

    def report(name, expected, got):
        nonlocal failures
        ok = expected == got
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: expected {expected}, got {got}")

    def outcome(case, headers=None, seen_nonces=None):
        try:
            verify(
                case["secrets"],
                case["headers"] if headers is None else headers,
                case["request_target"],
                base64.b64decode(case["body_base64"]),
                now=case["now"],
                seen_nonces=set() if seen_nonces is None else seen_nonces,
            )
            return "valid"
        except VerificationError as err:
            return err.reason

    for case in cases:
        report(case["name"], "valid" if case["valid"] else case["reason"], outcome(case))

    first_valid = next(case for case in cases if case["valid"])
    cache = set()
    outcome(first_valid, seen_nonces=cache)
    report(f"replay of {first_valid['name']!r} with the same nonce", "duplicate_nonce",
           outcome(first_valid, seen_nonces=cache))
    lowercased = {k.lower(): v for k, v in first_valid["headers"].items()}
    report(f"{first_valid['name']!r} with lower-case header names", "valid",
           outcome(first_valid, headers=lowercased))

    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} signing-vectors.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(_run_vectors(sys.argv[1]))
