// A person uses the web console in headless Chromium: signs in, builds a rule with the visual
// builder, dry-runs it, saves it, sends an event and follows its delivery in the log; then
// declares an action that needs approval, adds an agent, mints its token, grants its role the
// action in the policies, and approves the agent's call of it in the approval queue.
// Usage: node browser.mjs <base-url> <admin-key> <endpoint-id> <payments-endpoint-id>
// Prints {"rule_id", "rule",
// "delivery_id", "invocation_id"} on success; any failed step exits non-zero.

import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const [base, key, endpointId, paymentsId] = process.argv.slice(2);
const executablePath = process.env.OPSIQ_CHROMIUM || "/usr/bin/chromium";
const WAIT = { timeout: 30_000 };

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
const problems = [];
const page = await browser.newPage();
try {
  // Script errors and refused resources (a CSP violation shows up as a console error) fail the run.
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // The person says yes to every "are you sure?", unless a step says otherwise; every question
  // asked is kept.
  let answerDialogs = true;
  const dialogs = [];
  page.on("dialog", (d) => {
    dialogs.push(d.message());
    return answerDialogs ? d.accept() : d.dismiss();
  });
  // Chromium logs every error answer; a step that provokes one on purpose names its status.
  const expectedStatuses = new Set([401]);
  page.on("console", (m) => {
    const status = Number(m.text().match(/responded with a status of (\d+)/)?.[1]);
    if (m.type() === "error" && !expectedStatuses.has(status)) problems.push(`console: ${m.text()}`);
  });
  page.setDefaultTimeout(WAIT.timeout);

  // A wrong key is refused with a message; the right one opens the rules.
  await page.goto(`${base}/`);
  await page.fill("#api-key", "opsiq_sk_not_a_key");
  await page.click("#sign-in");
  await page.getByText("The API key was not accepted").waitFor();
  await page.fill("#api-key", key);
  await page.click("#sign-in");
  await page.getByText("No rules yet").waitFor();

  // Build: when ticket.created, if tier is enterprise and priority is high or urgent and
  // (the subject mentions an outage or it is not tagged test), deliver to the endpoint.
  await page.click("#new-rule");
  await page.fill("#rule-name", "Escalate enterprise tickets");
  await page.fill("#rule-event-type", "ticket.created");
  const top = page.locator("#conditions > .group.top");
  const rows = page.locator(".condition");
  const setRow = async (i, field, op, value) => {
    const row = rows.nth(i);
    await row.locator(".cond-field").fill(field);
    await row.locator(".cond-op").selectOption(op);
    await row.locator(".cond-value").fill(value);
  };
  await top.locator(":scope > .row > .add-condition").click();
  await setRow(0, "data.customer.tier", "eq", "enterprise");
  await top.locator(":scope > .row > .add-condition").click();
  await setRow(1, "data.priority", "in", "high, urgent");
  await top.locator(":scope > .row > .add-group").click();
  const nested = top.locator(":scope > .group");
  await setRow(2, "data.subject", "contains", "outage");
  await nested.locator(":scope > .row > .add-condition").click();
  await setRow(3, "data.tags", "contains", "test");
  await rows.nth(3).locator("input.negate").check();
  await page.click("#add-deliver");
  await page.locator(".out-endpoint").selectOption(endpointId);

  const expected = {
    name: "Escalate enterprise tickets",
    enabled: true,
    when: { event_type: "ticket.created" },
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
    then: [{ deliver: { endpoint_id: endpointId } }],
  };
  assert.deepEqual(JSON.parse(await page.textContent("#rule-json")), expected);

  // The sample comes from the catalog's schema of ticket.created; it is not an enterprise ticket.
  const sample = JSON.parse(await page.inputValue("#sample-event"));
  assert.equal(sample.type, "ticket.created");
  assert.equal(sample.data.priority, "low");
  await page.click("#test-rule");
  await page.getByText("Triggered, but the conditions do not hold.").waitFor();
  const matching = { type: "ticket.created", data: { ticket_id: "t_1", subject: "Checkout outage", priority: "urgent", customer: { id: "c_1", tier: "enterprise" }, tags: [] } };
  await page.fill("#sample-event", JSON.stringify(matching));
  await page.click("#test-rule");
  await page.getByText("Matched: 1 output(s) would run.").waitFor();

  // Leaving with unsaved edits asks first; staying keeps the page and every edit.
  answerDialogs = false;
  const [leaving] = await Promise.all([page.waitForEvent("dialog"), page.click('#nav a[href="#/endpoints"]')]);
  assert.match(leaving.message(), /unsaved changes/);
  await page.waitForFunction(() => location.hash === "#/rules/new");
  assert.equal(await page.inputValue("#rule-name"), "Escalate enterprise tickets");
  assert.deepEqual(JSON.parse(await page.textContent("#rule-json")), expected);
  answerDialogs = true;

  await page.click("#save-rule");
  const saved = await page.locator("#saved").textContent(WAIT);
  const ruleId = saved.match(/rul_[0-9A-Za-z]+/)?.[0];
  assert.ok(ruleId, saved);

  // Once saved, leaving asks nothing. The list says what it does; opening it again shows the
  // same rule.
  const asked = dialogs.length;
  await page.goto(`${base}/#/rules`);
  await page.getByText("When ticket.created happens, if data.customer.tier equals \"enterprise\"").waitFor();
  assert.equal(dialogs.length, asked, `asked: ${dialogs.slice(asked)}`);
  await page.getByRole("link", { name: "Escalate enterprise tickets" }).click();
  await page.locator("#rule-name").waitFor();
  assert.equal(await page.inputValue("#rule-name"), "Escalate enterprise tickets");
  assert.deepEqual(JSON.parse(await page.textContent("#rule-json")), expected);
  // A save over someone else's change made meanwhile is refused; the person loads the current
  // version from the message and saves again.
  const ruleChanged = await page.evaluate(async ([k, id]) => {
    const headers = { authorization: `Bearer ${k}`, "content-type": "application/json" };
    const stored = await (await fetch(`/v1/rules/${id}`, { headers })).json();
    for (const field of ["id", "created_at", "updated_at", "version"]) delete stored[field];
    stored.description = "Changed by someone else.";
    return (await fetch(`/v1/rules/${id}`, { method: "PUT", headers, body: JSON.stringify(stored) })).status;
  }, [key, ruleId]);
  assert.equal(ruleChanged, 200);

  expectedStatuses.add(412);
  await page.click("#save-rule");
  const staleRule = page.locator(".problem", { hasText: "the rule was changed meanwhile and is at version 2" });
  await staleRule.waitFor();
  expectedStatuses.delete(412);
  await page.click("#load-current");
  await staleRule.waitFor({ state: "detached" });
  // The current version holds their change, and the person's edit goes on top of it.
  assert.equal(await page.inputValue("#rule-description"), "Changed by someone else.");
  await page.fill("#rule-description", "Changed by someone else, then by me.");
  expected.description = "Changed by someone else, then by me.";
  await page.click("#save-rule");
  await page.getByText(`Saved as ${ruleId}.`).waitFor();
  const ruleVersion = await page.evaluate(async ([k, id]) => {
    return (await (await fetch(`/v1/rules/${id}`, { headers: { authorization: `Bearer ${k}` } })).json()).version;
  }, [key, ruleId]);
  assert.equal(ruleVersion, 3, "the second save landed on the version it loaded");

  // An incomplete rule is explained, not sent.
  await page.goto(`${base}/#/rules/new`);
  await page.locator("h2", { hasText: "New rule" }).waitFor();
  await page.click("#save-rule");
  await page.getByText("give the rule a name").waitFor();

  // A rule holding a whole number that a browser rounds opens with a warning and is not saved
  // (a save would have changed the number).
  const bigRuleId = await page.evaluate(async (k) => {
    const headers = { authorization: `Bearer ${k}`, "content-type": "application/json" };
    const body = '{"name": "big", "enabled": false, "when": {"event_type": "ticket.created"}, "then": [{"emit": {"type": "big.number", "data": {"n": 9007199254740993}}}]}';
    return (await (await fetch("/v1/rules", { method: "POST", headers, body })).json()).id;
  }, key);
  assert.ok(bigRuleId?.startsWith("rul_"), String(bigRuleId));
  await page.goto(`${base}/#/rules/${bigRuleId}`);
  await page.locator(".problem", { hasText: "beyond 2^53" }).waitFor();
  await page.click("#save-rule");
  await page.locator(".problem", { hasText: "saving is refused" }).waitFor();
  const bigRule = await page.evaluate(async ([k, id]) => {
    return await (await fetch(`/v1/rules/${id}`, { headers: { authorization: `Bearer ${k}` } })).text();
  }, [key, bigRuleId]);
  assert.match(bigRule, /"n":9007199254740993\b/);
  assert.match(bigRule, /"version":1\b/);

  // The endpoints page lists the endpoint and sends it a signed test event.
  await page.goto(`${base}/#/endpoints`);
  await page.locator("tr", { hasText: endpointId }).getByRole("button", { name: "send test" }).click();
  await page.getByText("Test event sent: delivery").waitFor();
  // ... and edits its subscriptions and rate limit.
  await page.locator("tr", { hasText: endpointId }).getByRole("button", { name: "edit" }).click();
  await page.fill("#edit-endpoint-types", "none.*, escalation.*");
  await page.fill("#edit-endpoint-rate", "50");
  await page.click("#save-endpoint");
  await page.getByText(`Saved ${endpointId}.`).waitFor();
  await page.locator("tr", { hasText: endpointId }).getByText("none.*, escalation.*").waitFor();
  // An edit over someone else's change made meanwhile is refused, not silently lost.
  await page.locator("tr", { hasText: endpointId }).getByRole("button", { name: "edit" }).click();
  const endpointChanged = await page.evaluate(async ([k, id]) => {
    const headers = { authorization: `Bearer ${k}`, "content-type": "application/json" };
    const body = JSON.stringify({ description: "Changed by someone else." });
    return (await fetch(`/v1/endpoints/${id}`, { method: "PATCH", headers, body })).status;
  }, [key, endpointId]);
  assert.equal(endpointChanged, 200);
  await page.fill("#edit-endpoint-rate", "60");
  expectedStatuses.add(412);
  await page.click("#save-endpoint");
  await page.getByText("the endpoint was changed meanwhile and is at version 3").waitFor();
  expectedStatuses.delete(412);
  const afterRefusal = await page.evaluate(async ([k, id]) => {
    return (await fetch(`/v1/endpoints/${id}`, { headers: { authorization: `Bearer ${k}` } })).json();
  }, [key, endpointId]);
  assert.equal(afterRefusal.rate_limit_per_s, 50, "the refused edit changed nothing");
  // The list was read again: editing from it now starts at the current version and lands.
  await page.locator("tr", { hasText: endpointId }).getByRole("button", { name: "edit" }).click();
  assert.equal(await page.inputValue("#edit-endpoint-description"), "Changed by someone else.");
  await page.fill("#edit-endpoint-rate", "60");
  await page.click("#save-endpoint");
  await page.getByText(`Saved ${endpointId}.`).waitFor();
  // Recovering its failed deliveries of the last day finds none; an endpoint added here shows
  // its secret once and can be deleted again.
  await page.locator("tr", { hasText: endpointId }).getByRole("button", { name: "recover" }).click();
  await page.click("#recover");
  await page.getByText("0 failed delivery(ies) queued again.").waitFor();
  await page.fill("#endpoint-url", "http://127.0.0.1:9/unused");
  await page.fill("#endpoint-types", "audit.*");
  await page.click("#add-endpoint");
  const created = await page.locator("div.ok", { hasText: "Created ep_" }).textContent(WAIT);
  assert.match(created, /whsec_/);
  await page.locator("tr", { hasText: "127.0.0.1:9/unused" }).getByRole("button", { name: "delete" }).click();
  await page.locator("tr", { hasText: "127.0.0.1:9/unused" }).waitFor({ state: "detached" });
  // A custom event type joins the catalog.
  await page.goto(`${base}/#/event-types`);
  await page.fill("#type-name", "escalation.opened");
  await page.fill("#type-description", "A ticket was escalated");
  await page.click("#add-type");
  await page.locator("tr", { hasText: "escalation.opened" }).getByText("A ticket was escalated").waitFor();
  // One added by mistake can go again (the list is read again from the server after the
  // delete, so the row leaves only once the type is gone); built-in ones offer no delete.
  await page.fill("#type-name", "scratch.mistake");
  await page.click("#add-type");
  await page.locator("tr", { hasText: "scratch.mistake" }).getByRole("button", { name: "delete" }).click();
  await page.locator("tr", { hasText: "scratch.mistake" }).waitFor({ state: "detached" });
  assert.equal(await page.locator("tr", { hasText: "invoice.paid" }).getByRole("button", { name: "delete" }).count(), 0);

  // An event that matches is delivered; the log shows it and its attempt.
  // (sent from the event types page, whose form starts from the type's schema)
  await page.goto(`${base}/#/event-types`);
  await page.fill("#send-type", "ticket.created");
  assert.equal(JSON.parse(await page.inputValue("#send-data")).priority, "low");
  await page.fill("#send-data", JSON.stringify(matching.data));
  await page.click("#send-event");
  await page.locator("#send-result", { hasText: "accepted" }).waitFor();
  let deliveryId = null;
  const deadline = Date.now() + 60_000;
  await page.goto(`${base}/#/deliveries?status=succeeded&endpoint_id=${endpointId}`);
  while (!deliveryId) {
    assert.ok(Date.now() < deadline, "the delivery never showed as succeeded in the log");
    await page.locator("h2", { hasText: "Deliveries" }).waitFor();
    const link = page.locator("tr", { hasText: "ticket.created" }).locator("a").first();
    if (await link.count()) {
      deliveryId = (await link.textContent()).trim();
    } else {
      await page.waitForTimeout(200);
      await page.reload();
    }
  }
  // The log filters by event type too.
  const deliveryFilters = page.locator("#delivery-filters");
  await deliveryFilters.getByLabel("event type").fill("invoice.paid");
  await deliveryFilters.getByLabel("event type").press("Enter");
  await page.getByText("No deliveries match.").waitFor();
  await deliveryFilters.getByLabel("event type").fill("ticket.created");
  await deliveryFilters.getByLabel("event type").press("Enter");
  await page.getByRole("link", { name: deliveryId }).click();
  await page.getByText("Attempt 1 — HTTP 200").waitFor();

  // Gateway: the page declares an action whose large calls need a person's approval ...
  const wireSchema = {
    type: "object",
    properties: { amount: { type: "integer", minimum: 1 }, iban: { type: "string" } },
    required: ["amount", "iban"],
    additionalProperties: false,
  };
  await page.goto(`${base}/#/actions/new`);
  await page.locator("h2", { hasText: "New action" }).waitFor();
  await page.fill("#action-name", "wire_funds");
  await page.fill("#action-description", "Send a bank transfer.");
  await page.fill("#action-input-schema", JSON.stringify(wireSchema));
  await page.selectOption("#action-endpoint", paymentsId);
  // A guard holds large transfers for a person; small ones would go straight through.
  await page.click("#add-guard");
  const guard = page.locator(".guard").first();
  await guard.locator(".group.top > .row > .add-condition").click();
  const guardRow = guard.locator(".condition").first();
  await guardRow.locator(".cond-field").fill("arguments.amount");
  await guardRow.locator(".cond-op").selectOption("gt");
  await guardRow.locator(".cond-value").fill("1000");
  await guard.locator(".guard-reason").fill("large transfer");
  const tool = JSON.parse(await page.textContent("#tool-preview"));
  assert.deepEqual(tool, { type: "function", function: { name: "wire_funds", description: "Send a bank transfer.", parameters: wireSchema } });
  await page.click("#save-action");
  await page.getByText("Saved wire_funds, version 1.").waitFor();
  // (a schema that does not compile is refused with the server's reasons, and changes nothing)
  expectedStatuses.add(422);
  await page.fill("#action-input-schema", '{"type": "object", "properties": {"amount": {"type": "money"}}}');
  await page.click("#save-action");
  await page.locator("#action-messages .problem").first().waitFor();
  // (and saving it again untouched changes nothing, not even its version)
  await page.goto(`${base}/#/actions`);
  await page.getByRole("link", { name: "wire_funds" }).click();
  await page.locator("h2", { hasText: "Action wire_funds" }).waitFor();
  await page.click("#save-action");
  await page.getByText("No changes: wire_funds is still version 1.").waitFor();
  // (and a save over someone else's change made meanwhile is refused, not silently lost)
  const meanwhile = await page.evaluate(async (k) => {
    const headers = { authorization: `Bearer ${k}`, "content-type": "application/json" };
    const stored = await (await fetch("/v1/actions/wire_funds", { headers })).json();
    stored.description = "Changed by someone else.";
    return (await fetch("/v1/actions/wire_funds", { method: "PUT", headers, body: JSON.stringify(stored) })).status;
  }, key);
  assert.equal(meanwhile, 200);
  await page.fill("#action-description", "My change.");
  expectedStatuses.add(412);
  await page.click("#save-action");
  await page.locator("#action-messages .problem", { hasText: "changed meanwhile and is at version 2" }).waitFor();
  // The form keeps the person's edit until they load the current version.
  assert.equal(await page.inputValue("#action-description"), "My change.");
  await page.click("#load-current");
  await page.locator("p", { hasText: "Version 2 (" }).waitFor();
  assert.equal(await page.inputValue("#action-description"), "Changed by someone else.");
  expectedStatuses.delete(412);

  // ... adds an agent with role finance and mints it a token for wire_* ...
  await page.goto(`${base}/#/agents`);
  await page.fill("#agent-id", "treasury-bot");
  await page.fill("#agent-roles", "finance");
  await page.getByRole("button", { name: "Add agent" }).click();
  const agentRow = page.locator("tr", { hasText: "treasury-bot" });
  await agentRow.locator(".token-scopes").fill("invoke:wire_*");
  await agentRow.getByRole("button", { name: "Mint token" }).click();
  const token = (await page.locator("code.secret").textContent(WAIT)).trim();
  // ... lets role finance invoke wire_* ...
  await page.goto(`${base}/#/policies`);
  await page.click("#add-policy-row");
  const policyRow = page.locator("#policy-rows tr").last();
  await policyRow.locator(".policy-subject").fill("role:finance");
  await policyRow.locator(".policy-object").fill("wire_*");
  answerDialogs = false;
  const [leavingPolicies] = await Promise.all([page.waitForEvent("dialog"), page.click('#nav a[href="#/agents"]')]);
  assert.match(leavingPolicies.message(), /unsaved changes/);
  await page.waitForFunction(() => location.hash === "#/policies");
  assert.equal(await policyRow.locator(".policy-subject").inputValue(), "role:finance");
  answerDialogs = true;
  await page.click("#save-policies");
  await page.getByText("Saved; every replica applies it at once.").waitFor();
  const askedAfterPolicies = dialogs.length;
  // ... the agent's call of an action that needs approval waits for a person ...
  const call = await page.evaluate(async (t) => {
    const res = await fetch("/v1/actions/wire_funds/invoke", {
      method: "POST",
      headers: { authorization: `Bearer ${t}`, "content-type": "application/json", "idempotency-key": "wire-1" },
      body: JSON.stringify({ arguments: { amount: 1200, iban: "DE89370400440532013000" } }),
    });
    return { status: res.status, body: await res.json() };
  }, token);
  assert.equal(call.status, 202, JSON.stringify(call.body));
  assert.equal(call.body.status, "pending_approval");
  // ... who approves it in the queue, after which it runs and its record says so.
  await page.goto(`${base}/#/approvals`);
  const card = page.locator(".approval", { hasText: "wire_funds by treasury-bot" });
  await card.getByText("large transfer").waitFor();
  assert.equal(dialogs.length, askedAfterPolicies, "saved policies are left without a question");
  await card.getByText('"amount": 1200').waitFor();
  await card.locator(".approval-comment").fill("checked with finance");
  await card.getByRole("button", { name: "Approve" }).click();
  await page.getByText("Nothing waits for a decision.").waitFor();
  const invocationId = call.body.invocation_id;
  const invDeadline = Date.now() + 60_000;
  await page.goto(`${base}/#/invocations/${invocationId}`);
  while (!(await page.getByText(/^succeeded — wire_funds v2, by treasury-bot/).count())) {
    assert.ok(Date.now() < invDeadline, "the approved invocation never showed as succeeded");
    await page.waitForTimeout(200);
    await page.reload();
  }
  // The invocations list filters by action and by agent.
  await page.goto(`${base}/#/invocations`);
  const invFilters = page.locator("#invocation-filters");
  await invFilters.getByLabel("action name").fill("wire_funds");
  await invFilters.getByLabel("action name").press("Enter");
  await page.waitForFunction(() => location.hash.includes("action=wire_funds"));
  await page.getByRole("link", { name: invocationId }).waitFor();
  await invFilters.getByLabel("agent id (agt_…)").fill("agt_nobody");
  await invFilters.getByRole("button", { name: "Filter" }).click();
  await page.getByText("No invocations match.").waitFor();
  assert.ok(page.url().includes("action=wire_funds") && page.url().includes("agent_id=agt_nobody"), page.url());

  // The agent's token is listed with its scopes, never itself, and revoked from the list.
  await page.goto(`${base}/#/agents`);
  const botRow = page.locator("tr", { hasText: "treasury-bot" }).first();
  await botRow.locator("summary", { hasText: "Tokens" }).click();
  const tokenRow = botRow.locator(".token-list tr", { hasText: "invoke:wire_*" });
  await tokenRow.getByText("active").waitFor();
  assert.ok(!(await page.innerText("body")).includes(token), "a minted token is shown only once");
  const toolsWith = (t) => page.evaluate(async (bearer) => (await fetch("/v1/tools", { headers: { authorization: `Bearer ${bearer}` } })).status, t);
  assert.equal(await toolsWith(token), 200);
  await tokenRow.getByRole("button", { name: "revoke" }).click();
  await tokenRow.getByText("revoked").waitFor();
  assert.equal(await toolsWith(token), 401);

  // A read-only key for a dashboard: made, shown once, usable, then revoked at once.
  await page.goto(`${base}/#/api-keys`);
  await page.fill("#key-name", "dashboard");
  await page.selectOption("#key-role", "viewer");
  await page.click("#make-key");
  const viewerKey = (await page.locator("code.secret").textContent(WAIT)).trim();
  assert.match(viewerKey, /^opsiq_sk_/);
  const statusWith = (k) => page.evaluate(async (key) => (await fetch("/v1/rules", { headers: { authorization: `Bearer ${key}` } })).status, k);
  assert.equal(await statusWith(viewerKey), 200);
  await page.locator("tr", { hasText: "dashboard" }).getByRole("button", { name: "revoke" }).click();
  await page.locator("tr", { hasText: "dashboard" }).waitFor({ state: "detached" });
  assert.equal(await statusWith(viewerKey), 401);

  assert.deepEqual(problems, []);
  console.log(JSON.stringify({ rule_id: ruleId, rule: expected, delivery_id: deliveryId, invocation_id: invocationId }));
} catch (e) {
  // What the person would have seen, to tell a broken page from a broken step.
  console.error(`at ${page.url()} the page showed:\n${await page.innerText("body").catch(() => "(nothing)")}`);
  console.error(`page problems: ${JSON.stringify(problems)}`);
  throw e;
} finally {
  await browser.close();
}
