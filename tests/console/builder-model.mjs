// The rule builder's model (src/console/assets/rule-builder.js) against the real server:
// forms become the rules the contract describes, stored rules come back as the same forms,
// and the server agrees with what the builder makes.
// Usage: node builder-model.mjs <base-url> <admin-key> <endpoint-id>; prints {"rule_id": …}.

import assert from "node:assert/strict";
import {
  emptyForm,
  fieldsOf,
  formFromGuards,
  formFromRule,
  formatValue,
  guardFieldsOf,
  guardsFromForm,
  kindsFrom,
  kindsOf,
  newCondition,
  newGroup,
  newGuard,
  newOutput,
  parseValue,
  ruleFromForm,
  sampleOf,
} from "../../src/console/assets/rule-builder.js";

const [base, key, endpointId] = process.argv.slice(2);

async function call(method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

// Values are typed the way a person reads them, and as the event's schema types the field.
const values = [
  ["eq", "42", undefined, 42],
  ["eq", '"42"', undefined, "42"],
  ["eq", "42", "string", "42"],
  ["contains", "500", "string", "500"],
  ["eq", "42", "number", 42],
  ["eq", " enterprise ", undefined, "enterprise"],
  ["eq", "true", undefined, true],
  ["gt", "1e3", undefined, 1000],
  ["eq", "-2.5", undefined, -2.5],
  ["eq", "null", undefined, null],
  ["eq", '""', undefined, ""],
  ["eq", '{"a": 1}', undefined, { a: 1 }],
  ["contains", "outage", undefined, "outage"],
  ["in", "high, urgent", undefined, ["high", "urgent"]],
  ["in", "1, two, 3", undefined, [1, "two", 3]],
  ["in", "1, 2", "string", ["1", "2"]],
  ["in", '"a,b", c', undefined, ["a,b", "c"]],
  ["not_in", '["a,b", "c"]', undefined, ["a,b", "c"]],
  ["in", "[[1, 2]]", undefined, [[1, 2]]],
  ["matches", "^\\d{3} +$", undefined, "^\\d{3} +$"],
  ["starts_with", " lead", undefined, " lead"],
  ["exists", "true", undefined, undefined],
  ["exists", "false", undefined, false],
];
for (const [op, text, kind, expected] of values) {
  const value = parseValue(op, text, kind);
  assert.deepEqual(value, expected, `${op} ${JSON.stringify(text)} (${kind})`);
  // What the builder shows for a stored value reads back as that value.
  assert.deepEqual(parseValue(op, formatValue(op, value, kind), kind), value, `round trip of ${op} ${JSON.stringify(text)}`);
}
// Stored lists of any shape edit back as themselves.
for (const list of [[[1, 2]], [{ a: 1, b: 2 }], [[1, 2], [3, 4]], ["[draft]", "final"], ["a,b", "c"], ["", "x"], [' "q"', "{x}"]]) {
  assert.deepEqual(parseValue("in", formatValue("in", list)), list, JSON.stringify(list));
}
// What cannot be a value is said, not guessed.
for (const [op, text, kind, message] of [
  ["in", "[1, 2", undefined, /JSON array/],
  ["in", "a,,b", undefined, /empty item/],
  ["in", "", undefined, /one or more values/],
  ["in", '"a, b', undefined, /quote/],
  ["eq", "", undefined, /enter a value/],
  ["eq", '"open', undefined, /quote/],
  ["matches", "", undefined, /pattern/],
  ["eq", "9007199254740993", undefined, /too large/],
  ["gt", "lots", "number", /holds numbers/],
]) {
  assert.throws(() => parseValue(op, text, kind), message, `${op} ${JSON.stringify(text)}`);
}

// The contract's example, composed the way the page composes it.
const form = emptyForm();
form.name = "Escalate enterprise outages";
form.eventType = "ticket.*";
form.conditions.items.push(newCondition("data.customer.tier", "eq", "enterprise"));
form.conditions.items.push(newCondition("data.priority", "in", "high, urgent"));
const either = newGroup("any");
either.items.push(newCondition("data.subject", "contains", "outage"));
const notTest = newCondition("data.tags", "contains", "test");
notTest.negate = true;
either.items.push(notTest);
form.conditions.items.push(either);
form.outputs.push({ ...newOutput("deliver"), endpointId });
form.outputs.push({ ...newOutput("invoke"), action: "extend_license", arguments: '{"license_id": "{{data.license_id}}", "days": 7}' });
form.outputs.push({ ...newOutput("emit"), type: "escalation.opened", data: '{"ticket": "{{data.ticket_id}}"}' });

const expected = {
  name: "Escalate enterprise outages",
  enabled: true,
  when: { event_type: "ticket.*" },
  if: {
    all: [
      { field: "data.customer.tier", op: "eq", value: "enterprise" },
      { field: "data.priority", op: "in", value: ["high", "urgent"] },
      {
        any: [
          { field: "data.subject", op: "contains", value: "outage" },
          { not: { field: "data.tags", op: "contains", value: "test" } },
        ],
      },
    ],
  },
  then: [
    { deliver: { endpoint_id: endpointId } },
    { invoke: { action: "extend_license", arguments: { license_id: "{{data.license_id}}", days: 7 } } },
    { emit: { type: "escalation.opened", data: { ticket: "{{data.ticket_id}}" } } },
  ],
};
const built = ruleFromForm(form);
assert.deepEqual(built.errors, []);
assert.deepEqual(built.rule, expected);

// The server stores it as built, and the stored rule edits as the same form.
const created = await call("POST", "/v1/rules", built.rule);
assert.equal(created.status, 201, JSON.stringify(created.body));
const stored = await call("GET", `/v1/rules/${created.body.id}`);
assert.equal(stored.status, 200);
assert.deepEqual(ruleFromForm(formFromRule(stored.body)).rule, expected);
assert.deepEqual(formFromRule(stored.body).conditions, form.conditions);

// A single condition needs no group, and edits back as one row.
const single = emptyForm();
single.name = "Big invoices";
single.eventType = "invoice.paid";
single.conditions.items.push(newCondition("data.amount", "gte", "100000"));
single.outputs.push({ ...newOutput("deliver"), endpointId });
const singleRule = ruleFromForm(single).rule;
assert.deepEqual(singleRule.if, { field: "data.amount", op: "gte", value: 100000 });
assert.deepEqual(formFromRule(singleRule).conditions.items, single.conditions.items);
const dry = async (event) => (await call("POST", "/v1/rules/test", { rule: singleRule, event })).body;
const big = await dry({ type: "invoice.paid", data: { invoice_id: "in_1", amount: 250000, currency: "eur" } });
assert.equal(big.matched, true, JSON.stringify(big));
const small = await dry({ type: "invoice.paid", data: { invoice_id: "in_2", amount: 999, currency: "eur" } });
assert.equal(small.matched, false, JSON.stringify(small));
assert.equal(small.conditions[0].held, false);

// Rules written through the API in shapes the builder would not make itself edit back to rules
// that decide every event the same way.
const shapes = [
  { not: { any: [{ field: "data.priority", op: "eq", value: "low" }, { field: "data.customer.tier", op: "eq", value: "free" }] } },
  { not: { not: { field: "data.priority", op: "in", value: ["high", "urgent"] } } },
  { any: [{ field: "data.customer.tier", op: "eq", value: "enterprise" }] },
  { field: "data.tags", op: "in", value: [["a", "b"], ["c"]] },
  { field: "data.subject", op: "in", value: ["[draft]", "final, really"] },
  { all: [{ field: "data.priority", op: "exists", value: true }, { not: { field: "data.body", op: "exists" } }] },
  // A number on a text field (written before a schema change, say) stays a number.
  { field: "data.subject", op: "eq", value: 123 },
];
const tickets = [
  { ticket_id: "t1", subject: "final, really", priority: "urgent", customer: { id: "c", tier: "enterprise" }, tags: [] },
  { ticket_id: "t2", subject: "[draft]", priority: "low", customer: { id: "c", tier: "free" }, tags: ["a", "b"], body: "x" },
  { ticket_id: "t3", subject: "other", priority: "high", customer: { id: "c", tier: "free" }, tags: ["c"] },
];
const ticketKinds = kindsOf((await call("GET", "/v1/event-types/ticket.created")).body.schema);
for (const shape of shapes) {
  const original = { name: "shape", enabled: true, when: { event_type: "ticket.created" }, if: shape, then: [{ deliver: { endpoint_id: endpointId } }] };
  const made = await call("POST", "/v1/rules", original);
  assert.equal(made.status, 201, JSON.stringify(made.body));
  const stored = (await call("GET", `/v1/rules/${made.body.id}`)).body;
  const rebuilt = ruleFromForm(formFromRule(stored, ticketKinds), ticketKinds);
  assert.deepEqual(rebuilt.errors, [], JSON.stringify(shape));
  for (const data of tickets) {
    const event = { type: "ticket.created", data };
    const before = (await call("POST", "/v1/rules/test", { rule: original, event })).body.matched;
    const after = (await call("POST", "/v1/rules/test", { rule: rebuilt.rule, event })).body.matched;
    assert.equal(after, before, `${JSON.stringify(shape)} on ${data.ticket_id}`);
  }
  assert.equal((await call("DELETE", `/v1/rules/${made.body.id}`)).status, 204);
}
// Lists and "not" around a group come back exactly as written.
for (const shape of [shapes[0], shapes[3], shapes[4], shapes[6]]) {
  const form = formFromRule({ name: "x", when: { event_type: "ticket.created" }, if: shape, then: [] }, ticketKinds);
  assert.deepEqual(ruleFromForm(form, ticketKinds).rule.if, shape);
}

// What is incomplete is said before anything is sent, at the path the server would name.
const blank = ruleFromForm(emptyForm()).errors.map((e) => e.path);
assert.deepEqual(blank, ["/name", "/when/event_type", "/then"]);
const broken = emptyForm();
broken.name = "x";
broken.eventType = "ticket.created";
broken.conditions.items.push(newGroup("any"));
broken.outputs.push({ ...newOutput("invoke"), action: "extend_license", arguments: "{days: 7}" });
broken.outputs.push({ ...newOutput("emit"), type: "x.y", data: "[1]" });
assert.deepEqual(
  ruleFromForm(broken).errors.map((e) => e.path),
  ["/if", "/then/0/invoke/arguments", "/then/1/emit/data"],
);
// A whole number JavaScript would round is refused, not silently changed.
broken.conditions.items = [];
broken.outputs = [{ ...newOutput("emit"), type: "x.y", data: '{"n": 9007199254740993, "s": "9007199254740993", "f": 1.5e300}' }];
const rounded = ruleFromForm(broken).errors;
assert.deepEqual(rounded.map((e) => e.path), ["/then/0/emit/data"]);
assert.match(rounded[0].message, /9007199254740993, a whole number beyond 2\^53/);
broken.outputs = [{ ...newOutput("emit"), type: "x.y", data: '{"n": 9007199254740991, "s": "1 \\" 9007199254740993"}' }];
assert.deepEqual(ruleFromForm(broken).errors, []);
for (const text of ["[9007199254740993]", '{"n": -9007199254740993}']) {
  assert.throws(() => parseValue("eq", text, undefined), /too large to compare exactly/, text);
}
assert.throws(() => parseValue("in", "[1, 9007199254740993]", undefined), /too large to compare exactly/);
assert.deepEqual(parseValue("in", '[1, "9007199254740993"]', undefined), [1, "9007199254740993"]);
const negatedBlank = newCondition("data.priority", "eq", "");
negatedBlank.negate = true;
broken.conditions.items = [newCondition("data.subject", "contains", "x"), { ...newGroup("any"), items: [negatedBlank] }];
assert.deepEqual(ruleFromForm(broken).errors.map((e) => e.path).slice(0, 1), ["/if/all/1/any/0/not/value"]);
const negatedEmpty = emptyForm();
Object.assign(negatedEmpty, { name: "x", eventType: "*", outputs: [{ ...newOutput("deliver"), endpointId }] });
negatedEmpty.conditions.negate = true;
assert.deepEqual(ruleFromForm(negatedEmpty).errors.map((e) => e.path), ["/if"]);
// What only the server knows comes back as a 422 with details the page lists.
const missing = { ...singleRule, then: [{ deliver: { endpoint_id: "ep_missing" } }] };
const refused = await call("POST", "/v1/rules", missing);
assert.equal(refused.status, 422);
assert.equal(refused.body.error.details[0].path, "/then/0/deliver/endpoint_id");

// The catalog's schemas give the field list and a sample event that the schema accepts.
const catalog = await call("GET", "/v1/event-types/ticket.created");
assert.equal(catalog.status, 200);
const paths = fieldsOf(catalog.body.schema).map((f) => f.path);
for (const p of ["data.ticket_id", "data.priority", "data.customer.tier"]) assert.ok(paths.includes(p), `${p} in ${paths}`);
assert.deepEqual(fieldsOf(catalog.body.schema).find((f) => f.path === "data.priority").enum, ["low", "normal", "high", "urgent"]);
const sample = sampleOf(catalog.body.schema);
const ingested = await fetch(`${base}/v1/events`, {
  method: "POST",
  headers: { authorization: `Bearer ${key}`, "content-type": "application/json", "idempotency-key": "console-sample" },
  body: JSON.stringify({ type: "ticket.created", data: sample }),
});
assert.equal(ingested.status, 202, await ingested.text());

// A sample meets the schema's lengths, bounds, multiples and item counts too, so a dry run of a
// custom type with such constraints starts from an event the server accepts.
const constrained = {
  type: "object",
  properties: {
    code: { type: "string", minLength: 12 },
    short: { type: "string", maxLength: 3 },
    day: { type: "string", format: "date" },
    seats: { type: "integer", minimum: 500 },
    debt: { type: "integer", exclusiveMaximum: 0 },
    ratio: { type: "number", minimum: 2, maximum: 3 },
    lot: { type: "integer", multipleOf: 7, minimum: 10, maximum: 20 },
    narrow: { type: "integer", exclusiveMinimum: 1.5, maximum: 2 },
    share: { type: "number", exclusiveMinimum: 0, exclusiveMaximum: 0.5 },
    tags: { type: "array", items: { type: "string" }, minItems: 3, uniqueItems: true },
    counts: { type: "array", items: { type: "integer", maximum: 101 }, minItems: 3, uniqueItems: true },
    codes: { type: "array", items: { type: "string", maxLength: 3 }, minItems: 2, maxItems: 2, uniqueItems: true },
    none: { type: "array", items: { type: "string" }, maxItems: 0 },
    picks: { type: "array", items: { enum: ["x", "y", "z"] }, minItems: 3, uniqueItems: true },
  },
  required: ["code", "short", "seats", "debt", "ratio", "lot", "narrow", "share", "tags", "counts", "codes", "picks", "none"],
  additionalProperties: false,
};
const declaredType = await call("POST", "/v1/event-types", { name: "order.constrained", schema: constrained });
assert.equal(declaredType.status, 201, JSON.stringify(declaredType.body));
const constrainedSample = sampleOf((await call("GET", "/v1/event-types/order.constrained")).body.schema);
const accepted = await fetch(`${base}/v1/events`, {
  method: "POST",
  headers: { authorization: `Bearer ${key}`, "content-type": "application/json", "idempotency-key": "console-constrained" },
  body: JSON.stringify({ type: "order.constrained", data: constrainedSample }),
});
assert.equal(accepted.status, 202, `${JSON.stringify(constrainedSample)}: ${await accepted.text()}`);

// So does a schema built of parts: references, allOf, anyOf, prefixItems, and a required field
// with no properties of its own.
const composed = {
  $defs: { customer: { type: "object", properties: { tier: { enum: ["pro", "enterprise"] } }, required: ["tier"] } },
  type: "object",
  allOf: [{ properties: { customer: { $ref: "#/$defs/customer" } }, required: ["customer"] }, { required: ["ticket"] }],
  properties: {
    priority: { anyOf: [{ type: "integer", minimum: 3 }, { type: "string" }] },
    pair: { type: "array", prefixItems: [{ type: "string" }, { type: "integer", minimum: 5 }], items: false, minItems: 2 },
  },
  required: ["priority", "pair"],
  additionalProperties: true,
};
assert.equal((await call("POST", "/v1/event-types", { name: "order.composed", schema: composed })).status, 201);
const composedSample = sampleOf((await call("GET", "/v1/event-types/order.composed")).body.schema);
const composedAccepted = await fetch(`${base}/v1/events`, {
  method: "POST",
  headers: { authorization: `Bearer ${key}`, "content-type": "application/json", "idempotency-key": "console-composed" },
  body: JSON.stringify({ type: "order.composed", data: composedSample }),
});
assert.equal(composedAccepted.status, 202, `${JSON.stringify(composedSample)}: ${await composedAccepted.text()}`);

// Guards: composed like rule conditions over the call, typed by the action's input schema,
// accepted by the server as built, and edited back as the same forms.
const inputSchema = { type: "object", properties: { amount: { type: "integer" }, note: { type: "string" } }, required: ["amount"] };
const guardKinds = kindsFrom(guardFieldsOf(inputSchema));
assert.ok(guardFieldsOf(inputSchema).some((f) => f.path === "arguments.amount"));
const bigRefund = newGuard();
bigRefund.conditions.items.push(newCondition("arguments.amount", "gt", "50000"));
const juniors = newCondition("agent.roles", "contains", "senior");
juniors.negate = true;
bigRefund.conditions.items.push(juniors);
bigRefund.reason = "large refunds by juniors";
const noted = newGuard();
noted.conditions.items.push(newCondition("arguments.note", "eq", "123"));
noted.then = "deny";
const built2 = guardsFromForm([bigRefund, noted], guardKinds);
assert.deepEqual(built2.errors, []);
assert.deepEqual(built2.guards, [
  {
    if: { all: [{ field: "arguments.amount", op: "gt", value: 50000 }, { not: { field: "agent.roles", op: "contains", value: "senior" } }] },
    then: "require_approval",
    reason: "large refunds by juniors",
  },
  // A text argument keeps 123 as text.
  { if: { field: "arguments.note", op: "eq", value: "123" }, then: "deny" },
]);
const declared = await call("POST", "/v1/actions", { name: "guarded_refund", description: "x", input_schema: inputSchema, endpoint_id: endpointId, guards: built2.guards });
assert.equal(declared.status, 201, JSON.stringify(declared.body));
const reread = (await call("GET", "/v1/actions/guarded_refund")).body;
assert.deepEqual(guardsFromForm(formFromGuards(reread.guards, guardKinds), guardKinds).guards, built2.guards);
const unfinished = newGuard();
unfinished.conditions.items.push(newCondition("arguments.amount", "gt", "lots"));
assert.deepEqual(guardsFromForm([unfinished], guardKinds).errors.map((e) => e.path), ["/guards/0/if/value"]);

console.log(JSON.stringify({ rule_id: created.body.id }));
