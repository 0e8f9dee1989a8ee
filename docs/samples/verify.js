// Verify OpsIQ webhooks (signature scheme "opsiq-v1") in Node.js with only the built-in `crypto`.
//
// Usage in a receiver (read the body as a raw Buffer, e.g. express.raw({ type: "*/*" })):
//
//   const { verify, VerificationError } = require("./verify");
//   try {
//     verify(secrets, req.headers, req.originalUrl, req.body, { seenNonces: nonceCache });
//   } catch (err) {
//     if (err instanceof VerificationError) return res.status(400).send(err.reason);
//     throw err;
//   }
//
// Run as a script to check this module against the published test vectors:
//
//   node docs/samples/verify.js tests/fixtures/signing-vectors.json
"use strict";

const crypto = require("crypto");

const TOLERANCE_SECONDS = 300;
const REQUIRED_HEADERS = ["X-OpsIQ-Signature", "X-OpsIQ-Timestamp", "X-OpsIQ-Nonce", "Idempotency-Key"];

class VerificationError extends Error {
  constructor(reason) {
    super(reason);
    this.name = "VerificationError";
    this.reason = reason;
  }
}

// Case-insensitive lookup in a plain object (such as Node's req.headers) or a Headers/Map instance.
function header(headers, name) {
  const wanted = name.toLowerCase();
  const entries = typeof headers.entries === "function" ? headers.entries() : Object.entries(headers);
  for (const [key, value] of entries) {
    if (key.toLowerCase() === wanted) {
      return Array.isArray(value) ? value.join(", ") : value;
    }
  }
  return undefined;
}

// The 32 bytes of one `sha256=<hex>` value, or null when it is malformed.
// (Buffer.from(s, "hex") silently stops at the first bad character, so validate first.)
function decodeSignature(value) {
  const match = /^sha256=([0-9a-fA-F]{64})$/.exec(value);
  return match ? Buffer.from(match[1], "hex") : null;
}

/**
 * Verify one received webhook; returns when it is genuine, throws VerificationError otherwise.
 *
 * @param {string[]} secrets        the endpoint secrets you accept (several during a rotation)
 * @param {object} headers          the received headers (names are case-insensitive)
 * @param {string} requestTarget    the URL path plus "?query" if any, exactly as received
 * @param {Buffer} body             the raw request body, exactly as received (never re-serialised JSON)
 * @param {object} [options]
 * @param {number} [options.now]    unix seconds; defaults to the current time
 * @param {Set<string>} [options.seenNonces] nonces already accepted within the window; the nonce of
 *                                  a verified request is added to it (omit to skip replay protection)
 */
function verify(secrets, headers, requestTarget, body, { now, seenNonces } = {}) {
  const values = {};
  for (const name of REQUIRED_HEADERS) {
    values[name] = header(headers, name);
    if (values[name] === undefined) throw new VerificationError("missing_header");
  }
  const timestamp = values["X-OpsIQ-Timestamp"];
  const nonce = values["X-OpsIQ-Nonce"];
  const idempotencyKey = values["Idempotency-Key"];

  if (!/^[+-]?[0-9]+$/.test(timestamp.trim())) throw new VerificationError("malformed_header");
  const ts = Number(timestamp.trim());
  const current = now === undefined ? Math.floor(Date.now() / 1000) : now;
  if (Math.abs(current - ts) > TOLERANCE_SECONDS) throw new VerificationError("timestamp_out_of_window");

  const signed = Buffer.concat([
    Buffer.from(`${timestamp}.${nonce}.${idempotencyKey}.${requestTarget}.`, "utf8"),
    Buffer.from(body),
  ]);
  const expected = secrets.map((secret) =>
    crypto.createHmac("sha256", Buffer.from(secret, "utf8")).update(signed).digest(),
  );
  const candidates = values["X-OpsIQ-Signature"].split(",").map((v) => decodeSignature(v.trim()));
  let matched = false;
  for (const candidate of candidates) {
    if (candidate === null) continue;
    for (const digest of expected) {
      // timingSafeEqual throws on a length difference; decodeSignature guarantees 32 bytes,
      // and the check below keeps that true even if the decoding changes.
      if (candidate.length === digest.length && crypto.timingSafeEqual(candidate, digest)) {
        matched = true;
      }
    }
  }
  if (!matched) throw new VerificationError("signature_mismatch");

  if (seenNonces) {
    if (seenNonces.has(nonce)) throw new VerificationError("duplicate_nonce");
    // Recorded only now, after the signature held, so forged requests cannot fill the cache.
    seenNonces.add(nonce);
  }
}

function runVectors(path) {
  const fs = require("fs");
  const { cases } = JSON.parse(fs.readFileSync(path, "utf8"));
  let failures = 0;

  const report = (name, expected, got) => {
    const ok = expected === got;
    if (!ok) failures += 1;
    console.log(`${ok ? "ok  " : "FAIL"} ${name}: expected ${expected}, got ${got}`);
  };

  const outcome = (c, headers = c.headers, seenNonces = new Set()) => {
    try {
      verify(c.secrets, headers, c.request_target, Buffer.from(c.body_base64, "base64"), {
        now: c.now,
        seenNonces,
      });
      return "valid";
    } catch (err) {
      if (err instanceof VerificationError) return err.reason;
      throw err;
    }
  };

  for (const c of cases) {
    report(c.name, c.valid ? "valid" : c.reason, outcome(c));
  }

  const firstValid = cases.find((c) => c.valid);
  const cache = new Set();
  outcome(firstValid, firstValid.headers, cache);
  report(`replay of '${firstValid.name}' with the same nonce`, "duplicate_nonce",
    outcome(firstValid, firstValid.headers, cache));
  const lowercased = Object.fromEntries(Object.entries(firstValid.headers).map(([k, v]) => [k.toLowerCase(), v]));
  report(`'${firstValid.name}' with lower-case header names`, "valid", outcome(firstValid, lowercased));

  console.log(`${failures} failure(s)`);
  return failures ? 1 : 0;
}

module.exports = { verify, VerificationError, TOLERANCE_SECONDS };

if (require.main === module) {
  if (process.argv.length !== 3) {
    console.error(`usage: node ${process.argv[1]} signing-vectors.json`);
    process.exit(2);
  }
  process.exit(runVectors(process.argv[2]));
}
