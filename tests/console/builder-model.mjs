// The rule builder's model (src/console/assets/rule-builder.js) against the real server:
// forms become the rules the contract describes, stored rules come back as the same forms,
// and the server agrees with what the builder makes.
// Usage: node builder-model.mjs <base-url> <admin-key> <endpoint-id>; prints {"rule_id": …}.

import assert from "node:assert/strict";
import {
  emptyForm,
  fieldsOf,
  formFromRule,
  formatValue,
  newCondition,
  newGroup,
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

// Values are typed the way a person reads them.
const values = [
  ["eq", "42", 42],
  ["eq", '"42"', "42"],
  ["eq", " enterprise ", "enterprise"],
  ["eq", "true", true],
  ["gt", "1e3", 1000],
  ["eq", "-2.5", -2.5],
  ["eq", "null", null],
  ["contains", "outage", "outage"],
  ["in", "high, urgent", ["high", "urgent"]],
  ["in", "1, two, 3", [1, "two", 3]],
  ["not_in", '["a,b", "c"]', ["a,b", "c"]],
  ["matches", "^\\d{3} +$", "^\\d{3} +$"],
  ["starts_with", " lead", " lead"],
  ["exists", "true", undefined],
  ["exists", "false", false],
];
for (const [op, text, expected] of values) {
  const value = parseValue(op, text);
  assert.deepEqual(value, expected, `${op} ${JSON.stringify(text)}`);
  // What the builder shows for a stored value reads back as that value.
  assert.deepEqual(parseValue(op, formatValue(op, value)), value, `round trip of ${op} ${JSON.stringify(text)}`);
}
assert.throws(() => parseValue("in", "[1, 2"), /JSON array/);

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

console.log(JSON.stringify({ rule_id: created.body.id }));
