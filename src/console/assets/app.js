// The OpsIQ web console: a single page over the public HTTP API, signed in with an API key kept
// in this tab's sessionStorage. Everything is built with DOM calls and textContent, never HTML
// strings, so no value from the API can become markup.

import {
  GUARD_VERDICTS,
  OPERATORS,
  describeRule,
  emptyForm,
  fieldsOf,
  formFromGuards,
  formFromRule,
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
  unsafeIntegerIn,
} from "./rule-builder.js";

const KEY_SLOT = "opsiq.apiKey";
const main = document.getElementById("main");
const nav = document.getElementById("nav");

/** An error answer of the API, with the contract's `{code, message, details}`. */
class ApiFailure extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.details = error.details ?? [];
  }
}

/** Marks an API answer that held whole numbers a browser cannot keep exactly (beyond 2^53). */
const LOSSY = Symbol("lossy");

/** The `ETag` an API answer came with, if any: sent back as If-Match, a save never overwrites unseen changes. */
const ETAG = Symbol("etag");

/**
 * Parses JSON and says whether it held whole numbers beyond 2^53, which JavaScript rounds (read
 * from the source text where the browser offers it to revivers).
 */
function parseExact(text) {
  let lossy = false;
  let told = false;
  const value = JSON.parse(text, (_key, v, context) => {
    told ||= context !== undefined;
    if (typeof v === "number" && !Number.isSafeInteger(v) && /^-?\d+$/.test(context?.source ?? "")) lossy = true;
    return v;
  });
  // A browser that does not hand revivers the source text: find such numbers in the text itself.
  if (!told) lossy = unsafeIntegerIn(text) !== undefined;
  return { value, lossy };
}

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { authorization: `Bearer ${sessionStorage.getItem(KEY_SLOT)}`, ...headers } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 204) return null;
  let data;
  try {
    const parsed = parseExact(await res.text());
    data = parsed.value;
    if (parsed.lossy && data && typeof data === "object") Object.defineProperty(data, LOSSY, { value: true });
    const etag = res.headers.get("etag");
    if (etag && data && typeof data === "object") Object.defineProperty(data, ETAG, { value: etag });
  } catch {
    data = undefined;
  }
  if (res.ok && data === undefined) {
    throw new ApiFailure(res.status, { code: "unreadable_answer", message: `${method} ${path.split("?")[0]} answered ${res.status} without JSON` });
  }
  if (!res.ok) {
    if (res.status === 401) signOut("The API key was not accepted; sign in again.");
    throw new ApiFailure(res.status, data?.error ?? { code: `http_${res.status}`, message: res.statusText });
  }
  return data;
}

const enc = encodeURIComponent;

/** Change only the version this page shows: someone else's save meanwhile is a 412, not lost. */
function ifMatch(stored) {
  return { "if-match": stored[ETAG] ?? `"${stored.version}"` };
}

/**
 * Runs a change made from a list; one refused because the object changed meanwhile (412) shows
 * the list again as it is now, with the server's message above it, so the next try starts from
 * the current version.
 */
async function changeFromList(fn) {
  try {
    return await fn();
  } catch (err) {
    if (err.status !== 412) throw err;
    await route();
    notice(problem(err));
    return "";
  }
}

let lastId = 0;

/** An element id no other element on the page has. */
function uniqueId(prefix) {
  lastId += 1;
  return `${prefix}-${lastId}`;
}

/** 128 random bits in hex (crypto.randomUUID needs a secure context; this does not). */
function randomKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Creates an element: `h("button", {class: "x", onclick}, "text", child…)`. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else if (name === "checked") el.checked = true;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/**
 * Whether leaving the current view would lose edits: set by the editor on view (see
 * `watchEdits`), cleared when another view is shown.
 */
let unsavedEdits = null;

/**
 * Watches the form controls under `root` (except those `skip` names) for changes since now.
 * Returns `sending`: call it as a save is sent (it notes the values sent) and call what it
 * returns once the save has landed, so that edits made while it was under way stay unsaved.
 */
function watchEdits(root, skip = () => false) {
  const values = () =>
    JSON.stringify([...root.querySelectorAll("input, textarea, select")].filter((el) => !skip(el)).map((el) => (el.type === "checkbox" ? el.checked : el.value)));
  let saved = values();
  unsavedEdits = () => root.isConnected && values() !== saved;
  return () => {
    const sent = values();
    return () => {
      saved = sent;
    };
  };
}

/** Asks before edits are thrown away; true if there are none or the person agrees. */
function mayLeave() {
  return !unsavedEdits?.() || confirm("Leave this page? Your unsaved changes will be lost.");
}

/** Replaces the page's content with `nodes` (arrays flattened, empty slots skipped). */
function show(...nodes) {
  main.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function problem(err) {
  const box = h("div", { class: "problem", role: "alert" }, err.message);
  const sole = err.details?.length === 1 && err.message.includes(err.details[0].message);
  if (err.details?.length && !sole) {
    box.append(h("ul", {}, err.details.map((d) => h("li", {}, h("code", {}, d.path || "/"), " ", d.message))));
  }
  return box;
}

/**
 * A problem with an editor's save or delete. One refused because the object changed meanwhile
 * (412) also offers to load the current version; until the person asks, the form keeps their
 * edits, so nothing they typed is lost to someone else's change.
 */
function editorProblem(err) {
  if (err.status !== 412) return problem(err);
  const reload = h("button", { type: "button", id: "load-current", onclick: () => route() }, "Load the current version");
  return h("div", {}, problem(err), h("p", {}, reload, " ", h("span", { class: "muted" }, "(the edits here are discarded)")));
}

/**
 * `<option>`s: an empty choice, then `choices` (`[value, text]`), marking `selected`; a
 * `selected` value no longer among them (deleted since) stays chosen, with `missing` beside it,
 * so a save never drops it silently.
 */
function choiceOptions(empty, choices, selected, missing = "no longer exists") {
  return [
    h("option", { value: "" }, empty),
    choices.map(([value, text]) => h("option", { value, selected: value === selected }, text)),
    selected && !choices.some(([value]) => value === selected) ? h("option", { value: selected, selected: true }, `${selected} (${missing})`) : null,
  ];
}

function table(headers, rows, empty) {
  if (rows.length === 0) return h("p", { class: "muted" }, empty);
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))), h("tbody", {}, rows));
}

function link(href, text) {
  return h("a", { href }, text);
}

function when(ts) {
  return ts ? new Date(ts).toLocaleString() : "";
}

function pre(value) {
  return h("pre", {}, typeof value === "string" ? value : JSON.stringify(value, null, 2));
}

/** Runs `fn` and shows in `box` what it returns (nothing for `""`), or the error it throws. */
async function showOutcome(box, fn) {
  try {
    const shown = await fn();
    box.replaceChildren(...[shown].flat(Infinity).filter((n) => n !== "" && n !== null && n !== undefined));
  } catch (err) {
    box.replaceChildren(problem(err));
  }
}

/** Splits "a, b , c" into ["a", "b", "c"]. */
function commaList(text) {
  return text.split(",").map((t) => t.trim()).filter(Boolean);
}

/**
 * A card holding a form: a title, `[label, control, …extras]` fields, a submit button and
 * `buttons`; on submit, `submit` runs and its result or error shows under the buttons.
 */
function formCard({ title, intro, fields, submitLabel, submitId, submit, buttons = [], outId }) {
  const out = h("div", { id: outId });
  const button = h("button", { type: "submit", id: submitId }, submitLabel);
  // One submission at a time: a double click must not send twice.
  const onsubmit = async (e) => {
    e.preventDefault();
    button.disabled = true;
    try {
      await showOutcome(out, submit);
    } finally {
      button.disabled = false;
    }
  };
  return h(
    "form",
    { class: "card", onsubmit },
    title ? h("h3", {}, title) : null,
    intro ? h("p", { class: "muted" }, intro) : null,
    fields.map(([label, control, ...extras]) => [h("label", { for: control.id }, label), control, extras]),
    h("div", { class: "row" }, button, buttons),
    out,
  );
}

/** Every item of a list route (`path` without a query), up to 1,000. */
async function listAll(path) {
  const items = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "100" });
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `${path}?${query}`);
    items.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && items.length < 1000);
  return items;
}

// ---------------------------------------------------------------- sign in

function signOut(message) {
  navigation++;
  sessionStorage.removeItem(KEY_SLOT);
  nav.hidden = true;
  showSignIn(message);
}

function showSignIn(message) {
  const input = h("input", { type: "password", id: "api-key", autocomplete: "off", placeholder: "opsiq_sk_…", required: true });
  const form = h(
    "form",
    {
      class: "card narrow",
      onsubmit: async (e) => {
        e.preventDefault();
        sessionStorage.setItem(KEY_SLOT, input.value.trim());
        try {
          await api("GET", `/v1/rules?limit=1`);
          if (!location.hash || location.hash === "#/") history.replaceState(null, "", "#/rules");
          route();
        } catch (err) {
          if (sessionStorage.getItem(KEY_SLOT)) sessionStorage.removeItem(KEY_SLOT);
          if (!(err instanceof ApiFailure && err.status === 401)) form.append(problem(err));
        }
      },
    },
    h("h2", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key of your workspace. It stays in this browser tab only."),
    message ? h("div", { class: "problem", role: "alert" }, message) : null,
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"),
  );
  show(form);
}

// ---------------------------------------------------------------- rules

async function showRules() {
  const rules = await listAll(`/v1/rules`);
  return [
    h("div", { class: "bar" }, h("h2", {}, "Rules"), h("a", { class: "button", href: "#/rules/new", id: "new-rule" }, "New rule")),
    h("p", { class: "muted" }, "When an event happens and the conditions hold, a rule delivers it, invokes an action or emits another event."),
    table(
      ["Name", "What it does", "Enabled", "Updated"],
      rules.map((r) =>
        h("tr", {}, h("td", {}, link(`#/rules/${enc(r.id)}`, r.name)), h("td", {}, describeRule(r)), h("td", {}, r.enabled === false ? "no" : "yes"), h("td", {}, when(r.updated_at))),
      ),
      "No rules yet. Create one with the builder.",
    ),
  ];
}

/** Loads what the builder offers in its lists: event types, endpoints and actions. */
async function builderChoices() {
  const [eventTypes, endpoints, actions] = await Promise.all([
    listAll(`/v1/event-types`),
    listAll(`/v1/endpoints`),
    listAll(`/v1/actions`),
  ]);
  return { eventTypes, endpoints, actions };
}

async function showRuleEditor(id) {
  const choices = await builderChoices();
  let stored = null;
  if (id) stored = await api("GET", `/v1/rules/${enc(id)}`);
  const schema = choices.eventTypes.find((t) => t.name === stored?.when?.event_type)?.schema;
  const form = stored ? formFromRule(stored, kindsOf(schema)) : emptyForm();
  const editor = new RuleEditor(form, choices, stored);
  return [editor.root];
}

/** Edits a condition tree in place: nested all-of / any-of groups of comparisons, each negatable. */
class ConditionTree {
  /**
   * `fields()` and `kindOf()` give the comparable fields and how their values are typed;
   * `changed(structural)` runs after every edit (structural: rows or groups added or removed).
   */
  constructor(group, { fields, kindOf, changed, id, placeholder = "data.customer.tier" }) {
    this.group = group;
    this.placeholder = placeholder;
    this.fieldsNow = fields;
    this.kindOfNow = kindOf;
    this.changed = changed;
    this.fieldList = h("datalist", { id: uniqueId("fields") });
    this.element = h("div", { id, class: "conditions" });
  }

  get fields() {
    return this.fieldsNow() ?? [];
  }

  get kindOf() {
    return this.kindOfNow() ?? (() => undefined);
  }

  /** Draws the tree again (after rows or groups were added or removed). */
  render() {
    this.element.replaceChildren(this.groupView(this.group, null, 0), this.fieldList);
    this.changed(true);
  }

  /** Offers the current fields in every field box, and says again how each value reads. */
  refreshFields() {
    this.fieldList.replaceChildren(...this.fields.map((f) => h("option", { value: f.path })));
    this.element.replaceChildren(this.groupView(this.group, null, 0), this.fieldList);
  }

  update() {
    this.changed(false);
  }

  groupView(group, parent, depth) {
    const mode = h(
      "select",
      { class: "group-mode", "aria-label": "Match all or any", onchange: (e) => { group.mode = e.target.value; this.update(); } },
      h("option", { value: "all", selected: group.mode === "all" }, "all of"),
      h("option", { value: "any", selected: group.mode === "any" }, "any of"),
    );
    const items = group.items.map((item) =>
      item.kind === "group" ? this.groupView(item, group, depth + 1) : this.conditionView(item, group),
    );
    return h(
      "div",
      { class: depth === 0 ? "group top" : "group" },
      h(
        "div",
        { class: "row" },
        this.negateToggle(group),
        h("span", {}, "Match"),
        mode,
        h("span", {}, "these:"),
        parent ? h("button", { type: "button", class: "link", onclick: () => this.removeFrom(parent, group) }, "remove group") : null,
      ),
      items,
      h(
        "div",
        { class: "row" },
        h("button", { type: "button", class: "add-condition", onclick: () => { group.items.push(newCondition()); this.render(); } }, "+ Condition"),
        depth < 4 ? h("button", { type: "button", class: "add-group", onclick: () => { group.items.push({ ...newGroup("any"), items: [newCondition()] }); this.render(); } }, "+ Group") : null,
      ),
    );
  }

  negateToggle(node) {
    return h(
      "label",
      { class: "inline negate", title: node.kind === "group" ? "Holds when the group does not" : "Holds when the condition does not" },
      h("input", {
        type: "checkbox",
        class: "negate",
        checked: node.negate,
        "aria-label": node.kind === "group" ? "Negate this group" : "Negate this condition",
        onchange: (e) => { node.negate = e.target.checked; this.update(); },
      }),
      " not",
    );
  }

  conditionView(cond, group) {
    const enumFor = () => this.fields.find((f) => f.path === cond.field.trim())?.enum ?? [];
    const valueList = h("datalist", { id: uniqueId("values") });
    const fillValues = () => valueList.replaceChildren(...enumFor().map((v) => h("option", { value: typeof v === "string" ? v : JSON.stringify(v) })));
    fillValues();
    // Says how the value will be read (text, number, a list…), or what is wrong with it.
    const readAs = h("span", { class: "muted read-as" });
    const describe = () => {
      const { errors, value } = readValue(cond, cond.untyped ? () => undefined : this.kindOf);
      readAs.textContent = errors ?? value;
      // A row still being filled in is not yet a mistake.
      readAs.classList.toggle("warn", errors !== undefined && cond.value.trim() !== "");
    };
    const value = cond.op === "exists"
      ? h(
          "select",
          { class: "cond-value", "aria-label": "Present or absent", onchange: (e) => { cond.value = e.target.value; this.update(); } },
          h("option", { value: "true", selected: cond.value !== "false" }, "yes"),
          h("option", { value: "false", selected: cond.value === "false" }, "no (absent)"),
        )
      : h("input", {
          class: "cond-value",
          list: valueList.id,
          value: cond.value,
          placeholder: cond.op === "in" || cond.op === "not_in" ? "high, urgent" : "value",
          "aria-label": "Value",
          oninput: (e) => { cond.value = e.target.value; describe(); this.update(); },
        });
    describe();
    return h(
      "div",
      { class: "condition row" },
      this.negateToggle(cond),
      h("input", {
        class: "cond-field",
        list: this.fieldList.id,
        value: cond.field,
        placeholder: this.placeholder,
        "aria-label": "Field",
        oninput: (e) => { cond.field = e.target.value; fillValues(); describe(); this.update(); },
      }),
      h(
        "select",
        {
          class: "cond-op",
          "aria-label": "Operator",
          onchange: (e) => {
            const wasExists = cond.op === "exists";
            cond.op = e.target.value;
            if (wasExists !== (cond.op === "exists")) {
              cond.value = cond.op === "exists" ? "true" : "";
              this.render();
            } else {
              describe();
              this.update();
            }
          },
        },
        OPERATORS.map((o) => h("option", { value: o.op, selected: o.op === cond.op }, o.label)),
      ),
      value,
      valueList,
      cond.op === "exists" ? null : readAs,
      h("button", { type: "button", class: "link remove-condition", onclick: () => this.removeFrom(group, cond) }, "remove"),
    );
  }

  removeFrom(group, node) {
    group.items.splice(group.items.indexOf(node), 1);
    this.render();
  }
}

/** How a condition's value text reads: `{value: "number 42"}` or `{errors: "…"}`. */
function readValue(cond, kindOf) {
  if (cond.value.trim() === "" && cond.field.trim() === "") return { value: "" };
  try {
    const v = parseValue(cond.op, cond.value, kindOf(cond.field, cond.op));
    const name = (x) => (x === null ? "null" : Array.isArray(x) ? `a list of ${x.length}` : typeof x === "string" ? "text" : typeof x);
    return { value: `read as ${name(v)}` };
  } catch (e) {
    return { errors: e.message };
  }
}

/** The visual builder: edits a form, shows the rule it makes, dry-runs and saves it. */
const LOSSY_RULE = "This rule holds whole numbers beyond 2^53, which a browser cannot keep exactly: the form shows them rounded, and saving is refused so that they are not changed. Edit the rule through the API.";

class RuleEditor {
  constructor(form, choices, stored) {
    this.form = form;
    this.choices = choices;
    /** The rule as last read or saved (its ETag included), or null for a new one. */
    this.stored = stored;
    this.ruleId = stored?.id ?? null;
    this.preview = h("pre", { id: "rule-json" });
    this.messages = h("div", { id: "rule-messages" });

    this.outputsBox = h("div", { id: "outputs" });
    this.sample = h("textarea", {
      id: "sample-event",
      rows: 10,
      spellcheck: "false",
      "aria-label": "Sample event (JSON)",
      oninput: () => { this.sampleEdited = true; },
    });
    this.sampleEdited = false;
    this.heading = h("h2", {}, this.ruleId ? "Edit rule" : "New rule");
    this.deleteButton = h("button", { type: "button", id: "delete-rule", class: "danger", hidden: !this.ruleId, onclick: () => this.remove() }, "Delete");
    this.noConditions = h("p", { class: "muted" }, "No conditions: the rule runs on every such event.");
    this.testResult = h("div", { id: "test-result" });
    this.tree = new ConditionTree(form.conditions, {
      id: "conditions",
      fields: () => this.fields,
      kindOf: () => this.kindOf,
      changed: (structural) => {
        if (structural) this.noConditions.hidden = this.form.conditions.items.length > 0;
        this.update();
      },
    });
    this.root = this.build();
    this.refreshFields();
    this.renderConditions();
    this.renderOutputs();
    this.update();
    if (this.lossy()) this.messages.replaceChildren(problem({ message: LOSSY_RULE }));
    // The sample event is a scratch pad, not part of the rule.
    this.sending = watchEdits(this.root, (el) => el === this.sample);
  }

  build() {
    const f = this.form;
    const typeList = h("datalist", { id: "event-type-list" }, this.choices.eventTypes.map((t) => h("option", { value: t.name }, t.description ?? "")));
    const eventType = h("input", {
      id: "rule-event-type",
      list: "event-type-list",
      value: f.eventType,
      placeholder: "ticket.created, invoice.*, or *",
      "aria-label": "Event type that triggers the rule",
      oninput: (e) => {
        f.eventType = e.target.value;
        this.refreshFields();
        this.update();
      },
    });
    return h(
      "div",
      { class: "builder" },
      h("div", { class: "bar" }, this.heading, link("#/rules", "All rules")),
      h(
        "section",
        { class: "card" },
        h("label", { for: "rule-name" }, "Name"),
        h("input", { id: "rule-name", value: f.name, oninput: (e) => { f.name = e.target.value; this.update(); } }),
        h("label", { for: "rule-description" }, "Description (optional)"),
        h("input", { id: "rule-description", value: f.description, oninput: (e) => { f.description = e.target.value; this.update(); } }),
        h("label", { class: "inline" }, h("input", { type: "checkbox", id: "rule-enabled", checked: f.enabled, onchange: (e) => { f.enabled = e.target.checked; this.update(); } }), " Enabled"),
      ),
      h("section", { class: "card" }, h("h3", {}, "When this happens"), eventType, typeList),
      h("section", { class: "card" }, h("h3", {}, "If these conditions hold"), this.noConditions, this.tree.element),
      h(
        "section",
        { class: "card" },
        h("h3", {}, "Then do this"),
        this.outputsBox,
        h(
          "div",
          { class: "row" },
          h("button", { type: "button", id: "add-deliver", onclick: () => this.addOutput("deliver") }, "+ Deliver to an endpoint"),
          h("button", { type: "button", id: "add-invoke", onclick: () => this.addOutput("invoke") }, "+ Invoke an action"),
          h("button", { type: "button", id: "add-emit", onclick: () => this.addOutput("emit") }, "+ Emit an event"),
        ),
      ),
      h(
        "section",
        { class: "card" },
        h("h3", {}, "Try it on a sample event"),
        h("p", { class: "muted" }, "A dry run: shows which conditions hold and the exact signed requests, sends nothing."),
        this.sample,
        h("div", { class: "row" }, h("button", { type: "button", id: "test-rule", onclick: () => this.test() }, "Test")),
        this.testResult,
      ),
      h("section", { class: "card" }, h("h3", {}, "The rule as JSON"), this.preview),
      this.messages,
      h(
        "div",
        { class: "row" },
        h("button", { type: "button", id: "save-rule", class: "primary", onclick: () => this.save() }, "Save rule"),
        this.deleteButton,
      ),
    );
  }

  /** The catalog entry of the chosen event type, if it names one exactly. */
  eventTypeSchema() {
    return this.choices.eventTypes.find((t) => t.name === this.form.eventType.trim())?.schema ?? null;
  }

  /**
   * Offers the chosen event type's fields and reads values as its schema types them; fills the
   * sample from the schema unless the user has written one.
   */
  refreshFields() {
    const schema = this.eventTypeSchema();
    this.fields = fieldsOf(schema);
    this.kindOf = kindsOf(schema);
    this.tree.refreshFields();
    if (!this.sampleEdited || this.sample.value.trim() === "") {
      const type = this.form.eventType.trim().replace(/\*$/, "example");
      this.sample.value = JSON.stringify({ type: type || "example", data: sampleOf(schema) ?? {} }, null, 2);
    }
  }

  update() {
    const { rule, errors } = ruleFromForm(this.form, this.kindOf);
    this.preview.textContent = JSON.stringify(rule, null, 2);
    this.localErrors = errors;
  }

  renderConditions() {
    this.tree.render();
  }

  addOutput(kind) {
    this.form.outputs.push(newOutput(kind));
    this.renderOutputs();
  }

  renderOutputs() {
    const views = this.form.outputs.map((output, i) => {
      const remove = h("button", { type: "button", class: "link", onclick: () => { this.form.outputs.splice(i, 1); this.renderOutputs(); } }, "remove");
      let body;
      switch (output.kind) {
        case "deliver":
          body = [
            h("span", {}, "Deliver the event to"),
            h(
              "select",
              { class: "out-endpoint", "aria-label": `Output ${i + 1}: endpoint`, onchange: (e) => { output.endpointId = e.target.value; this.update(); } },
              choiceOptions("choose an endpoint…", this.choices.endpoints.map((ep) => [ep.id, `${ep.url} (${ep.id})`]), output.endpointId),
            ),
          ];
          break;
        case "invoke":
          body = [
            h("span", {}, "Invoke"),
            h(
              "select",
              { class: "out-action", "aria-label": `Output ${i + 1}: action`, onchange: (e) => { output.action = e.target.value; this.update(); } },
              choiceOptions("choose an action…", this.choices.actions.map((a) => [a.name, a.title ? `${a.title} (${a.name})` : a.name]), output.action),
            ),
            h("span", { class: "muted" }, "with arguments (JSON; {{data.field}} inserts a value from the event):"),
            h("textarea", { class: "out-arguments", "aria-label": `Output ${i + 1}: arguments (JSON)`, rows: 4, spellcheck: "false", value: output.arguments, placeholder: '{"license_id": "{{data.license_id}}", "days": 7}', oninput: (e) => { output.arguments = e.target.value; this.update(); } }),
          ];
          break;
        default:
          body = [
            h("span", {}, "Emit the event"),
            h("input", { class: "out-type", "aria-label": `Output ${i + 1}: event type to emit`, value: output.type, placeholder: "escalation.opened", oninput: (e) => { output.type = e.target.value; this.update(); } }),
            h("span", { class: "muted" }, "with data (JSON, templates allowed):"),
            h("textarea", { class: "out-data", "aria-label": `Output ${i + 1}: event data (JSON)`, rows: 3, spellcheck: "false", value: output.data, placeholder: '{"ticket": "{{data.ticket_id}}"}', oninput: (e) => { output.data = e.target.value; this.update(); } }),
          ];
      }
      return h("div", { class: "output" }, h("div", { class: "row" }, h("strong", {}, `${i + 1}.`), body), h("div", { class: "row" }, remove));
    });
    this.outputsBox.replaceChildren(...views);
    this.update();
  }

  /** The form's rule, or `null` after showing what is wrong with it. */
  ruleOrErrors() {
    this.update();
    if (this.localErrors.length) {
      this.messages.replaceChildren(problem({ message: "The rule is not complete yet:", details: this.localErrors }));
      return null;
    }
    this.messages.replaceChildren();
    return ruleFromForm(this.form, this.kindOf).rule;
  }

  async test() {
    const rule = this.ruleOrErrors();
    if (!rule) return;
    let event;
    try {
      event = JSON.parse(this.sample.value);
    } catch (e) {
      this.testResult.replaceChildren(problem({ message: `The sample event is not valid JSON (${e.message}).` }));
      return;
    }
    try {
      const result = await api("POST", `/v1/rules/test`, { rule, event });
      this.testResult.replaceChildren(dryRunView(result));
    } catch (err) {
      this.testResult.replaceChildren(problem(err));
    }
  }

  /** Whether the stored rule held whole numbers the browser rounded (saving would change them). */
  lossy() {
    return Boolean(this.stored?.[LOSSY]);
  }

  async save() {
    if (this.lossy()) {
      this.messages.replaceChildren(problem({ message: LOSSY_RULE }));
      return;
    }
    const rule = this.ruleOrErrors();
    if (!rule) return;
    const landed = this.sending();
    try {
      const saved = this.ruleId
        ? await api("PUT", `/v1/rules/${enc(this.ruleId)}`, rule, ifMatch(this.stored))
        : await api("POST", `/v1/rules`, rule);
      landed();
      this.stored = saved;
      this.ruleId = saved.id;
      this.heading.textContent = "Edit rule";
      this.deleteButton.hidden = false;
      this.messages.replaceChildren(h("div", { class: "ok", role: "status", id: "saved" }, `Saved as ${saved.id}.`));
      history.replaceState(null, "", `#/rules/${enc(saved.id)}`);
      main.dataset.view = location.hash;
    } catch (err) {
      this.messages.replaceChildren(editorProblem(err));
    }
  }

  async remove() {
    if (!confirm("Delete this rule?")) return;
    try {
      await api("DELETE", `/v1/rules/${enc(this.ruleId)}`, undefined, ifMatch(this.stored));
      unsavedEdits = null;
      location.hash = "#/rules";
    } catch (err) {
      this.messages.replaceChildren(editorProblem(err));
    }
  }
}

/** What an output of a dry run would fail on, if anything. */
function outputProblem(o) {
  if (o.error) return o.error;
  if (o.valid === false) return `its arguments do not fit the action: ${(o.details ?? []).map((d) => `${d.path || "/"} ${d.message}`).join("; ")}`;
  return null;
}

function dryRunView(result) {
  const outputs = result.outputs ?? [];
  const failing = outputs.filter(outputProblem).length;
  const verdict = !result.triggered
    ? "Not triggered: the event type does not match."
    : !result.matched
      ? "Triggered, but the conditions do not hold."
      : failing
        ? `Matched, but ${failing} of ${outputs.length} output(s) would fail.`
        : `Matched: ${outputs.length} output(s) would run.`;
  // A comparison under an odd number of "not"s counts against the rule when it holds.
  const negated = (c) => ((c.at ?? "").match(/\/not(?=\/|$)/g) ?? []).length % 2 === 1;
  return h(
    "div",
    { class: result.matched && !failing ? "ok" : result.matched ? "problem" : "muted-box" },
    h("p", { id: "test-verdict" }, verdict),
    result.enabled === false ? h("p", { class: "muted" }, "This rule is disabled: events do not run it until it is enabled.") : null,
    table(
      ["Condition", "The event has", "Comparison held", "Counts as"],
      (result.conditions ?? []).map((c) =>
        h(
          "tr",
          {},
          h("td", {}, `${negated(c) ? "not " : ""}${c.field} ${c.op} ${JSON.stringify(c.value ?? true)}`),
          h("td", {}, c.actual === undefined ? "(absent)" : JSON.stringify(c.actual)),
          h("td", {}, c.held ? "yes" : "no"),
          h("td", {}, c.held !== negated(c) ? "✔ true" : "✘ false"),
        ),
      ),
      "No conditions.",
    ),
    outputs.map((o) => {
      const trouble = outputProblem(o);
      const held = o.status === "pending_approval" ? ` (held for a person's approval: ${o.approval_reason})` : "";
      const what = o.deliver ? `deliver to ${o.deliver.endpoint_id}` : o.invoke ? `invoke ${o.invoke.action}${held}` : o.emit ? `emit ${o.emit.type}` : "output";
      return h("details", { open: Boolean(trouble) }, h("summary", {}, trouble ? `✘ ${what}: ${trouble}` : what), pre(o));
    }),
  );
}

// ---------------------------------------------------------------- endpoints

/** Edits an endpoint's settings in place (PATCH; the secret is rotated separately). */
function endpointEditor(ep, out) {
  const url = h("input", { id: "edit-endpoint-url", type: "url", value: ep.url, required: true });
  const description = h("input", { id: "edit-endpoint-description", value: ep.description ?? "" });
  const types = h("input", { id: "edit-endpoint-types", value: (ep.event_types ?? []).join(", ") });
  const rate = h("input", { id: "edit-endpoint-rate", type: "number", min: 1, value: ep.rate_limit_per_s ?? "", placeholder: "no limit" });
  const scheme = h(
    "select",
    { id: "edit-endpoint-scheme" },
    [["opsiq-v1", "opsiq-v1 (X-OpsIQ-Signature)"], ["standard-webhooks", "Standard Webhooks (webhook-signature)"]].map(([v, t]) => h("option", { value: v, selected: v === ep.signature_scheme }, t)),
  );
  return formCard({
    title: `Edit ${ep.id}`,
    fields: [
      ["URL", url],
      ["Description", description],
      ["Event types (comma-separated patterns)", types],
      ["Rate limit (deliveries per second)", rate],
      ["Signature scheme", scheme],
    ],
    submitLabel: "Save",
    submitId: "save-endpoint",
    buttons: [h("button", { type: "button", onclick: () => out.replaceChildren() }, "Cancel")],
    submit: () => changeFromList(async () => {
      const eventTypes = commaList(types.value);
      await api("PATCH", `/v1/endpoints/${enc(ep.id)}`, {
        url: url.value.trim(),
        description: description.value.trim(),
        event_types: eventTypes.length ? eventTypes : ["*"],
        rate_limit_per_s: rate.value === "" ? null : Number(rate.value),
        signature_scheme: scheme.value,
      }, ifMatch(ep));
      await route();
      notice(h("div", { class: "ok", role: "status" }, `Saved ${ep.id}.`));
      return "";
    }),
  });
}

/** Re-queues an endpoint's failed deliveries since a time (after an outage, say). */
function recoverForm(ep, out) {
  const dayAgo = new Date(Date.now() - 86_400_000 - new Date().getTimezoneOffset() * 60_000);
  const since = h("input", { id: "recover-since", type: "datetime-local", required: true, value: dayAgo.toISOString().slice(0, 16) });
  return formCard({
    title: `Recover failed deliveries to ${ep.url}`,
    fields: [["Failed since (your local time)", since]],
    submitLabel: "Recover",
    submitId: "recover",
    buttons: [h("button", { type: "button", onclick: () => out.replaceChildren() }, "Cancel")],
    submit: async () => {
      const r = await api("POST", `/v1/endpoints/${enc(ep.id)}/recover`, { since: new Date(since.value).toISOString() });
      return h("div", { class: "ok", role: "status" }, `${r.recovered} failed delivery(ies) queued again.`);
    },
  });
}

async function showEndpoints() {
  const endpoints = await listAll(`/v1/endpoints`);
  const url = h("input", { id: "endpoint-url", type: "url", placeholder: "https://example.com/webhooks", required: true });
  const types = h("input", { id: "endpoint-types", placeholder: "* or invoice.*, ticket.created" });
  const description = h("input", { id: "endpoint-description", placeholder: "optional" });
  const create = formCard({
    title: "Add an endpoint",
    fields: [
      ["URL", url],
      ["Event types (comma-separated patterns)", types],
      ["Description", description],
    ],
    submitLabel: "Add endpoint",
    submitId: "add-endpoint",
    submit: async () => {
      const eventTypes = commaList(types.value);
      const ep = await api("POST", `/v1/endpoints`, { url: url.value.trim(), description: description.value.trim() || undefined, event_types: eventTypes.length ? eventTypes : ["*"] });
      await route();
      notice(h("div", { class: "ok", role: "status" }, `Created ${ep.id}. Its signing secret (shown again under "secret"): `, h("code", { class: "secret" }, ep.secret)));
      return "";
    },
  });
  const action = (label, fn) => h("button", { type: "button", class: "link", onclick: fn }, label);
  const out = h("div");
  const run = (fn) => showOutcome(out, fn);
  const rows = endpoints.map((ep) =>
    h(
      "tr",
      {},
      h("td", {}, ep.url, h("div", { class: "muted" }, ep.id)),
      h("td", {}, (ep.event_types ?? []).join(", ")),
      h("td", {}, ep.enabled ? "enabled" : `disabled${ep.disabled_reason ? ` (${ep.disabled_reason})` : ""}`),
      h(
        "td",
        {},
        action("send test", () => run(async () => { const r = await api("POST", `/v1/endpoints/${enc(ep.id)}/test`, {}); return h("div", { class: "ok" }, `Test event sent: delivery `, link(`#/deliveries/${enc(r.delivery_id)}`, r.delivery_id)); })),
        action("secret", () => run(async () => pre(await api("GET", `/v1/endpoints/${enc(ep.id)}/secret`)))),
        action("rotate secret", () => run(async () => { if (!confirm("Rotate the secret? The old one keeps signing during the overlap.")) return ""; return pre(await api("POST", `/v1/endpoints/${enc(ep.id)}/rotate-secret`, {})); })),
        action(ep.enabled ? "disable" : "enable", () => run(() => changeFromList(async () => { await api("PATCH", `/v1/endpoints/${enc(ep.id)}`, { enabled: !ep.enabled }, ifMatch(ep)); await route(); return ""; }))),
        action("edit", () => out.replaceChildren(endpointEditor(ep, out))),
        action("deliveries", () => { location.hash = `#/deliveries?endpoint_id=${enc(ep.id)}`; }),
        action("recover", () => out.replaceChildren(recoverForm(ep, out))),
        action("delete", () => run(() => changeFromList(async () => { if (!confirm(`Delete ${ep.url}?`)) return ""; await api("DELETE", `/v1/endpoints/${enc(ep.id)}`, undefined, ifMatch(ep)); await route(); return ""; }))),
      ),
    ),
  );
  return [h("h2", {}, "Endpoints"), table(["URL", "Event types", "State", ""], rows, "No endpoints yet."), out, create];
}

// ---------------------------------------------------------------- deliveries

async function showDeliveries(params) {
  const status = params.get("status") ?? "";
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  for (const name of ["endpoint_id", "event_type"]) if (params.get(name)) query.set(name, params.get(name));
  query.set("limit", "50");
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  const page = await api("GET", `/v1/deliveries?${query}`);
  const filter = statusFilter("delivery-status", status, ["pending", "delivering", "succeeded", "failed"], params, "#/deliveries");
  const rows = page.data.map((d) =>
    h("tr", {}, h("td", {}, link(`#/deliveries/${enc(d.id)}`, d.id)), h("td", {}, d.event_type ?? d.action ?? d.kind), h("td", {}, d.status), h("td", {}, String(d.attempts)), h("td", {}, d.last_status_code ?? d.last_error ?? ""), h("td", {}, when(d.created_at))),
  );
  return [
    h("div", { class: "bar" }, h("h2", {}, "Deliveries"), filter),
    textFilters("delivery-filters", params, "#/deliveries", [["endpoint_id", "endpoint id (ep_…)"], ["event_type", "event type"]]),
    table(["Delivery", "Event / action", "Status", "Attempts", "Last answer", "Created"], rows, "No deliveries match."),
    olderLink("#/deliveries", params, page.next_cursor),
  ];
}

async function showDelivery(id) {
  const d = await api("GET", `/v1/deliveries/${enc(id)}`);
  const out = h("div");
  const attempts = (d.attempts_log ?? []).map((a) =>
    h(
      "details",
      { open: true },
      h("summary", {}, `Attempt ${a.attempt} — ${a.response ? `HTTP ${a.response.status}` : a.error_class ?? "no answer"} in ${a.duration_ms ?? "?"} ms, ${when(a.started_at)}`),
      h("h4", {}, "Request"),
      pre(a.request),
      h("h4", {}, "Response"),
      a.response ? pre(a.response) : h("p", {}, a.error ?? "none"),
    ),
  );
  return [
    h("div", { class: "bar" }, h("h2", {}, `Delivery ${d.id}`), link("#/deliveries", "All deliveries")),
    h("p", {}, `${d.status}, ${d.attempts} attempt(s), endpoint ${d.endpoint_id}, idempotency key `, h("code", {}, d.idempotency_key)),
    h(
      "button",
      {
        type: "button",
        id: "replay",
        onclick: async () => {
          try {
            const r = await api("POST", `/v1/deliveries/${enc(d.id)}/replay`, {});
            await route();
            notice(h("div", { class: "ok", role: "status" }, `Replay queued (${r.status}); reload to follow it.`));
          } catch (err) {
            out.replaceChildren(problem(err));
          }
        },
      },
      "Replay",
    ),
    out,
    h("h3", {}, "Body"),
    pre(d.body),
    h("h3", {}, "Attempts"),
    attempts.length ? attempts : h("p", { class: "muted" }, "Not attempted yet."),
  ];
}

// ---------------------------------------------------------------- actions, event types, audit

async function showActions() {
  const actions = await listAll(`/v1/actions`);
  return [
    h("div", { class: "bar" }, h("h2", {}, "Actions"), h("a", { class: "button", href: "#/actions/new", id: "new-action" }, "New action")),
    h("p", { class: "muted" }, "What agents may run, declared as JSON-Schema tools. Each change makes a new version; invocations record the version they ran."),
    table(
      ["Name", "Description", "Mode", "Approval", "Version", "Enabled"],
      actions.map((a) =>
        h(
          "tr",
          {},
          h("td", {}, link(`#/actions/${enc(a.name)}`, a.name)),
          h("td", {}, a.description ?? ""),
          h("td", {}, a.mode ?? ""),
          h("td", {}, a.approval ?? ""),
          h("td", {}, String(a.version ?? "")),
          h("td", {}, a.enabled === false ? "no" : "yes"),
        ),
      ),
      "No actions declared yet.",
    ),
  ];
}

const ANNOTATIONS = [
  ["read_only", "Read-only (no Idempotency-Key needed)"],
  ["destructive", "Destructive"],
  ["idempotent", "Idempotent"],
  ["open_world", "Reaches outside your system"],
];

const STARTER_SCHEMA = {
  type: "object",
  properties: { customer_id: { type: "string", description: "The customer's id." } },
  required: ["customer_id"],
  additionalProperties: false,
};

/**
 * An action's guards as forms: each a condition tree over the call (arguments, agent, action),
 * a verdict and a reason, checked in order; the first whose condition holds decides.
 */
class GuardList {
  constructor(guards, inputSchema) {
    this.inputSchema = inputSchema;
    this.fields = guardFieldsOf(inputSchema());
    this.kindOf = kindsFrom(this.fields);
    this.forms = formFromGuards(guards, this.kindOf);
    // Guards nobody edited are sent back exactly as stored, so an untouched save changes nothing.
    this.forms.forEach((form, i) => { form.stored = guards[i]; });
    this.list = h("div", { id: "guards" });
    this.element = h(
      "div",
      {},
      this.list,
      h("button", { type: "button", id: "add-guard", onclick: () => { this.forms.push(newGuard()); this.render(); } }, "+ Guard"),
    );
    this.render();
  }

  /** Offers the arguments the input schema declares (called when it changes). */
  refreshFields() {
    this.fields = guardFieldsOf(this.inputSchema());
    this.kindOf = kindsFrom(this.fields);
    for (const tree of this.trees) tree.refreshFields();
  }

  render() {
    this.trees = [];
    this.list.replaceChildren(
      ...this.forms.map((form, i) => {
        const touch = () => { form.stored = undefined; };
        let drawn = false;
        const tree = new ConditionTree(form.conditions, { fields: () => this.fields, kindOf: () => this.kindOf, changed: () => drawn && touch(), placeholder: "arguments.amount" });
        tree.render();
        tree.refreshFields();
        drawn = true;
        this.trees.push(tree);
        return h(
          "div",
          { class: "guard output" },
          h("div", { class: "row" }, h("strong", {}, `Guard ${i + 1}.`), h("span", { class: "muted" }, "If the call matches (no conditions: every call)"), h("button", { type: "button", class: "link", onclick: () => { this.forms.splice(i, 1); this.render(); } }, "remove")),
          tree.element,
          h(
            "div",
            { class: "row" },
            h("span", {}, "then"),
            h(
              "select",
              { class: "guard-then", "aria-label": `Guard ${i + 1}: what it does`, onchange: (e) => { form.then = e.target.value; touch(); } },
              GUARD_VERDICTS.map((v) => h("option", { value: v.then, selected: v.then === form.then }, v.label)),
            ),
            h("input", { class: "guard-reason", "aria-label": `Guard ${i + 1}: reason`, placeholder: "reason, shown to the caller", value: form.reason, oninput: (e) => { form.reason = e.target.value; touch(); } }),
          ),
        );
      }),
    );
  }

  /** The guards, or a refusal naming what is incomplete. */
  value() {
    const { guards, errors } = guardsFromForm(this.forms, this.kindOf);
    // An untouched guard's mistakes are the server's to judge, as they were when it was stored.
    const mine = errors.filter((e) => this.forms[Number(e.path.split("/")[2])]?.stored === undefined);
    if (mine.length) throw new ApiFailure(0, { code: "incomplete_guard", message: "A guard is not complete yet:", details: mine });
    return guards.map((g, i) => this.forms[i].stored ?? g);
  }
}

/** Declares or edits an action: a form for its settings and guards, JSON for its schemas. */
async function showActionEditor(name) {
  const [endpoints, stored] = await Promise.all([listAll(`/v1/endpoints`), name ? api("GET", `/v1/actions/${enc(name)}`) : null]);
  const a = stored ?? { input_schema: STARTER_SCHEMA, mode: "async", approval: "never", timeout_ms: 10000, enabled: true, annotations: {} };
  const input = (id, label, value, extra = {}) => [h("label", { for: id }, label), h("input", { id, value: value ?? "", ...extra })];
  const json = (value) => (value === undefined || value === null ? "" : JSON.stringify(value, null, 2));
  let root = null;
  const field = (id) => root.querySelector(`#${id}`);
  const out = h("div", { id: "action-messages" });
  const preview = h("pre", { id: "tool-preview" });
  const showPreview = () => {
    let parameters;
    try {
      parameters = JSON.parse(field("action-input-schema").value);
    } catch {
      parameters = "(the input schema is not valid JSON yet)";
    }
    const description = field("action-description").value || field("action-title").value;
    const tool = { type: "function", function: { name: field("action-name").value.trim(), description, parameters } };
    preview.textContent = JSON.stringify(tool, null, 2);
  };
  const readJson = (id, what, optional) => {
    const text = field(id).value.trim();
    if (text === "" && optional) return undefined;
    let parsed;
    try {
      parsed = parseExact(text);
    } catch (e) {
      throw new ApiFailure(0, { code: "invalid_json", message: `${what} is not valid JSON (${e.message}).` });
    }
    if (parsed.lossy) {
      throw new ApiFailure(0, { code: "inexact_number", message: `${what} holds a whole number beyond 2^53, which the console cannot send exactly; use the API for it.` });
    }
    return parsed.value;
  };
  // A browser has already rounded such numbers in the stored action: saving would change them.
  const lossy = Boolean(stored?.[LOSSY]);
  const guardList = new GuardList(a.guards, () => {
    try {
      return JSON.parse(field("action-input-schema").value);
    } catch {
      return root ? null : a.input_schema;
    }
  });
  const save = async () => {
    const landed = sending();
    try {
      if (lossy) throw new ApiFailure(0, { code: "inexact_number", message: "This action holds whole numbers beyond 2^53, which a browser cannot keep exactly; change it through the API." });
      const title = field("action-title").value;
      const declaration = {
        name: field("action-name").value.trim(),
        // Kept as typed (an unchanged save must not change the action); empty means none.
        title: title === "" && stored?.title !== "" ? undefined : title,
        description: field("action-description").value,
        input_schema: readJson("action-input-schema", "The input schema"),
        output_schema: readJson("action-output-schema", "The output schema", true),
        guards: guardList.value(),
        endpoint_id: field("action-endpoint").value || undefined,
        mode: field("action-mode").value,
        timeout_ms: Number(field("action-timeout").value),
        approval: field("action-approval").value,
        enabled: field("action-enabled").checked,
        annotations: Object.fromEntries(ANNOTATIONS.map(([key]) => [key, field(`action-${key}`).checked])),
      };
      const saved = stored
        ? await api("PUT", `/v1/actions/${enc(stored.name)}`, declaration, ifMatch(stored))
        : await api("POST", `/v1/actions`, declaration);
      landed();
      // Re-read from the server (its version, its hash); a new action gets its own address,
      // unless the user has gone elsewhere meanwhile.
      if (!stored && location.hash === "#/actions/new") history.replaceState(null, "", `#/actions/${enc(saved.name)}`);
      await route();
      const said = stored && saved.version === stored.version ? `No changes: ${saved.name} is still version ${saved.version}.` : `Saved ${saved.name}, version ${saved.version}.`;
      notice(h("div", { class: "ok", role: "status", id: "action-saved" }, said));
    } catch (err) {
      out.replaceChildren(editorProblem(err));
    }
  };
  const remove = async () => {
    if (!confirm(`Delete ${stored.name}? Agents can no longer call it, and calls waiting for approval can no longer be approved.`)) return;
    try {
      await api("DELETE", `/v1/actions/${enc(stored.name)}`, undefined, ifMatch(stored));
      unsavedEdits = null;
      location.hash = "#/actions";
    } catch (err) {
      out.replaceChildren(editorProblem(err));
    }
  };
  root = h(
    "div",
    {},
    h("div", { class: "bar" }, h("h2", {}, stored ? `Action ${stored.name}` : "New action"), link("#/actions", "All actions")),
    stored ? h("p", { class: "muted" }, `Version ${stored.version} (${stored.content_hash}).`) : null,
    stored?.source === "file"
      ? h("p", { class: "muted" }, "Declared in a file under schemas/actions: a change made here stands until that file changes, which applies the file again.")
      : null,
    lossy ? h("div", { class: "problem", role: "alert" }, "This action holds whole numbers beyond 2^53, which a browser cannot keep exactly, so it cannot be saved from here; change it through the API.") : null,
    h(
      "section",
      { class: "card", oninput: () => { showPreview(); guardList.refreshFields(); } },
      input("action-name", "Name (letters, digits, _ and -; what the model calls)", a.name, { readonly: Boolean(stored), placeholder: "refund_invoice" }),
      input("action-title", "Title (optional)", a.title),
      h("label", { for: "action-description" }, "Description (the model reads this to decide when to call it)"),
      h("textarea", { id: "action-description", rows: 2, value: a.description ?? "" }),
      h("label", { for: "action-input-schema" }, "Input schema (JSON Schema 2020-12; arguments are validated against it)"),
      h("textarea", { id: "action-input-schema", rows: 10, spellcheck: "false", value: json(a.input_schema) }),
    ),
    h(
      "section",
      { class: "card" },
      h("label", { for: "action-endpoint" }, "Endpoint that receives each call"),
      h(
        "select",
        { id: "action-endpoint" },
        choiceOptions("none yet", endpoints.map((ep) => [ep.id, `${ep.url} (${ep.id})`]), a.endpoint_id, "deleted: calls fail until you choose another"),
      ),
      h("label", { for: "action-mode" }, "Mode"),
      h("select", { id: "action-mode" }, [["async", "async: answer 202 at once"], ["sync", "sync: wait for the endpoint's answer"]].map(([v, t]) => h("option", { value: v, selected: v === a.mode }, t))),
      input("action-timeout", "Timeout for sync calls (milliseconds, 100 to 120000)", String(a.timeout_ms ?? 10000), { type: "number", min: 100, max: 120000 }),
      h("label", { for: "action-approval" }, "Approval"),
      h("select", { id: "action-approval" }, [["never", "never"], ["always", "always: a person approves each call"]].map(([v, t]) => h("option", { value: v, selected: v === a.approval }, t))),
      h("div", { class: "row" }, ANNOTATIONS.map(([key, label]) => h("label", { class: "inline" }, h("input", { type: "checkbox", id: `action-${key}`, checked: Boolean(a.annotations?.[key]) }), ` ${label}`))),
      h("label", { class: "inline" }, h("input", { type: "checkbox", id: "action-enabled", checked: a.enabled !== false }), " Enabled"),
    ),
    h(
      "section",
      { class: "card" },
      h("label", { for: "action-output-schema" }, "Output schema (optional; sync results are checked against it)"),
      h("textarea", { id: "action-output-schema", rows: 4, spellcheck: "false", value: json(a.output_schema) }),
    ),
    h(
      "section",
      { class: "card" },
      h("h3", {}, "Guards (optional)"),
      h("p", { class: "muted" }, "Checked on every call, by agents and by rules, in order; the first whose conditions hold decides. Compare arguments.*, agent.id, agent.roles, action.name or action.version."),
      guardList.element,
    ),
    h("section", { class: "card" }, h("h3", {}, "How a model sees it (OpenAI tool format)"), preview),
    out,
    h(
      "div",
      { class: "row" },
      h("button", { type: "button", id: "save-action", class: "primary", onclick: save }, "Save action"),
      stored ? h("button", { type: "button", id: "delete-action", class: "danger", onclick: remove }, "Delete") : null,
    ),
  );
  showPreview();
  const sending = watchEdits(root);
  return root;
}

async function showEventTypes() {
  const types = await listAll(`/v1/event-types`);
  const name = h("input", { id: "type-name", placeholder: "escalation.opened", required: true });
  const description = h("input", { id: "type-description", placeholder: "What happened" });
  const typeSchema = h("textarea", { id: "type-schema", rows: 5, spellcheck: "false", placeholder: '{"type": "object", "properties": {"ticket": {"type": "string"}}, "required": ["ticket"]}' });
  // Sending an event by hand: the quickest way to see a first webhook arrive.
  const sendable = types.filter((t) => !t.reserved);
  const sendType = h("input", { id: "send-type", list: "send-type-list", placeholder: "ticket.created", required: true });
  const sendData = h("textarea", { id: "send-data", rows: 8, spellcheck: "false", value: "{}" });
  let lastSample = "{}";
  sendType.addEventListener("input", () => {
    const schema = sendable.find((t) => t.name === sendType.value.trim())?.schema;
    // Only what the form itself put there is replaced, never data the user wrote.
    if (schema && sendData.value === lastSample) {
      lastSample = JSON.stringify(sampleOf(schema), null, 2);
      sendData.value = lastSample;
    }
  });
  const out = h("div");
  // A custom type can go; events of its name are then taken free-form again.
  const remove = (t) =>
    h("button", {
      type: "button",
      class: "link",
      onclick: () => showOutcome(out, async () => {
        if (!confirm(`Delete the event type ${t.name}? Events of that name are then accepted without a schema.`)) return "";
        await api("DELETE", `/v1/event-types/${enc(t.name)}`);
        await route();
        notice(h("div", { class: "ok", role: "status" }, `Deleted ${t.name}.`));
        return "";
      }),
    }, "delete");
  return [
    h("h2", {}, "Event types"),
    table(
      ["Name", "Description", "Fields", ""],
      types.map((t) => h("tr", {}, h("td", {}, h("code", {}, t.name), t.builtin ? h("span", { class: "muted" }, " built in") : null), h("td", {}, t.description ?? ""), h("td", {}, fieldsOf(t.schema).slice(2).map((f) => f.path).join(", ")), h("td", {}, t.builtin ? null : remove(t)))),
      "No event types.",
    ),
    out,
    formCard({
      title: "Add a custom event type",
      fields: [
        ["Name", name],
        ["Description", description],
        ["Schema of its data (optional JSON Schema; events of this type are then checked against it)", typeSchema],
      ],
      submitLabel: "Add",
      submitId: "add-type",
      submit: async () => {
        let schema;
        if (typeSchema.value.trim() !== "") {
          try {
            schema = JSON.parse(typeSchema.value);
          } catch (err) {
            throw new ApiFailure(0, { code: "invalid_json", message: `The schema is not valid JSON (${err.message}).` });
          }
        }
        const added = await api("POST", `/v1/event-types`, { name: name.value.trim(), description: description.value.trim() || undefined, schema });
        await route();
        notice(h("div", { class: "ok", role: "status" }, `Added ${added.name}.`));
        return "";
      },
    }),
    formCard({
      title: "Send an event",
      intro: "It goes to every endpoint subscribed to its type and through your rules, like one your system sends.",
      fields: [
        ["Type", sendType, h("datalist", { id: "send-type-list" }, sendable.map((t) => h("option", { value: t.name })))],
        ["Data (JSON)", sendData],
      ],
      submitLabel: "Send event",
      submitId: "send-event",
      outId: "send-result",
      submit: async () => {
        let data;
        try {
          data = JSON.parse(sendData.value);
        } catch (err) {
          throw new ApiFailure(0, { code: "invalid_json", message: `The data is not valid JSON (${err.message}).` });
        }
        // A fresh key per click: this form sends a new event each time.
        const r = await api("POST", `/v1/events`, { type: sendType.value.trim(), data }, { "idempotency-key": randomKey() });
        return h("div", { class: "ok", role: "status" }, `Event ${r.event_id} accepted: ${r.deliveries} delivery(ies). `, link("#/deliveries", "See the delivery log"));
      },
    }),
  ];
}

async function showAudit(params) {
  const query = new URLSearchParams({ limit: "100" });
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  const page = await api("GET", `/v1/audit?${query}`);
  return [
    h("h2", {}, "Audit log"),
    h("p", { class: "muted" }, "Every change made with an admin key, hash-chained; `opsiq audit verify` checks the chain."),
    table(
      ["#", "When", "Who", "What", "Target"],
      page.data.map((r) => h("tr", {}, h("td", {}, String(r.seq)), h("td", {}, when(r.created_at)), h("td", {}, r.actor), h("td", {}, r.action), h("td", {}, r.target ?? ""))),
      "Nothing recorded yet.",
    ),
    olderLink("#/audit", params, page.next_cursor),
  ];
}

// ---------------------------------------------------------------- agents: invocations, approvals, agents, policies

function statusFilter(id, current, statuses, params, base) {
  return h(
    "select",
    {
      id,
      onchange: (e) => {
        const next = new URLSearchParams(params);
        next.delete("cursor");
        // Kept even when empty: "any status" must not fall back to a view's default filter.
        next.set("status", e.target.value);
        location.hash = `${base}?${next}`;
      },
    },
    ["", ...statuses].map((s) => h("option", { value: s, selected: s === current }, s || "any status")),
  );
}

/**
 * Text filters for a list: one input per `[name, label]`, applied (first page again) on Enter
 * or with the button; an empty input drops its filter.
 */
function textFilters(id, params, base, fields) {
  const inputs = fields.map(([name, label]) => h("input", { name, value: params.get(name) ?? "", placeholder: label, "aria-label": label }));
  return h(
    "form",
    {
      id,
      class: "row",
      onsubmit: (e) => {
        e.preventDefault();
        const next = new URLSearchParams(params);
        next.delete("cursor");
        for (const input of inputs) {
          if (input.value.trim()) next.set(input.name, input.value.trim());
          else next.delete(input.name);
        }
        location.hash = `${base}?${next}`;
      },
    },
    inputs,
    h("button", { type: "submit" }, "Filter"),
  );
}

function olderLink(base, params, cursor) {
  if (!cursor) return null;
  const p = new URLSearchParams(params);
  p.set("cursor", cursor);
  return link(`${base}?${p}`, "Older →");
}

async function showInvocations(params) {
  const status = params.get("status") ?? "";
  const query = new URLSearchParams({ limit: "50" });
  for (const name of ["status", "agent_id", "action", "cursor"]) if (params.get(name)) query.set(name, params.get(name));
  const page = await api("GET", `/v1/invocations?${query}`);
  const statuses = ["pending_approval", "queued", "delivering", "succeeded", "failed", "denied"];
  return [
    h("div", { class: "bar" }, h("h2", {}, "Invocations"), statusFilter("invocation-status", status, statuses, params, "#/invocations")),
    textFilters("invocation-filters", params, "#/invocations", [["action", "action name"], ["agent_id", "agent id (agt_…)"]]),
    h("p", { class: "muted" }, "Every call of an action by an agent or a rule — denied ones too."),
    table(
      ["Invocation", "Action", "Caller", "Status", "Created"],
      page.data.map((i) => h("tr", {}, h("td", {}, link(`#/invocations/${enc(i.id)}`, i.id)), h("td", {}, h("code", {}, i.action?.name ?? ""), i.action?.version != null ? ` v${i.action.version}` : ""), h("td", {}, i.agent_id ?? i.principal ?? ""), h("td", {}, i.status), h("td", {}, when(i.created_at)))),
      "No invocations match.",
    ),
    olderLink("#/invocations", params, page.next_cursor),
  ];
}

async function showInvocation(id) {
  const inv = await api("GET", `/v1/invocations/${enc(id)}`);
  return [
    h("div", { class: "bar" }, h("h2", {}, `Invocation ${inv.id}`), link("#/invocations", "All invocations")),
    h("p", {}, `${inv.status} — ${inv.action?.name}${inv.action?.version != null ? ` v${inv.action.version}` : ""}, by ${inv.agent_id ?? inv.principal}`, inv.duration_ms != null ? `, ${inv.duration_ms} ms` : ""),
    inv.delivery_id ? h("p", {}, "Delivery: ", link(`#/deliveries/${enc(inv.delivery_id)}`, inv.delivery_id)) : null,
    h("h3", {}, "Arguments"),
    pre(inv.arguments),
    inv.result != null ? [h("h3", {}, "Result"), pre(inv.result)] : null,
    inv.error != null ? [h("h3", {}, "Error"), pre(inv.error)] : null,
  ];
}

async function showApprovals(params) {
  const status = params.has("status") ? params.get("status") : "pending";
  const query = new URLSearchParams({ limit: "50" });
  if (status) query.set("status", status);
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  const page = await api("GET", `/v1/approvals?${query}`);
  const invocations = await Promise.all(page.data.map((a) => api("GET", `/v1/invocations/${enc(a.invocation_id)}`).catch(() => null)));
  const filterParams = new URLSearchParams(params);
  filterParams.set("status", status);
  const items = page.data.map((a, i) => {
    const inv = invocations[i];
    const comment = h("input", { class: "approval-comment", placeholder: "comment (optional)" });
    const out = h("div");
    const decide = (approve) => async () => {
      const body = comment.value.trim() ? { comment: comment.value.trim() } : {};
      try {
        if (approve) await api("POST", `/v1/approvals/${enc(a.id)}/approve`, body);
        else await api("POST", `/v1/approvals/${enc(a.id)}/deny`, body);
        await route();
        const what = inv ? `${inv.action?.name} by ${inv.agent_id ?? inv.principal}` : a.invocation_id;
        notice(h("div", { class: "ok", role: "status" }, `${approve ? "Approved" : "Denied"}: ${what}.`));
      } catch (err) {
        // Decided elsewhere meanwhile: show the queue as it is now, with the reason on top.
        if (err.status === 409) {
          await route();
          notice(problem(err));
        } else {
          out.replaceChildren(problem(err));
        }
      }
    };
    return h(
      "section",
      { class: "card approval" },
      h("div", { class: "bar" }, h("h3", {}, inv ? `${inv.action?.name} by ${inv.agent_id ?? inv.principal}` : a.invocation_id), h("span", { class: "muted" }, `${a.status}, ${when(a.created_at)}`)),
      a.reason ? h("p", {}, `Why approval is needed: ${a.reason}`) : null,
      inv ? pre(inv.arguments) : h("div", { class: "problem" }, "The call's arguments could not be loaded; reload before deciding."),
      h("p", {}, "Invocation ", link(`#/invocations/${enc(a.invocation_id)}`, a.invocation_id)),
      a.status === "pending" && inv
        ? h("div", { class: "row" }, comment, h("button", { type: "button", class: "primary approve", onclick: decide(true) }, "Approve"), h("button", { type: "button", class: "danger deny", onclick: decide(false) }, "Deny"))
        : h("p", { class: "muted" }, `Decided by ${a.decided_by_name ? `${a.decided_by_name} (${a.decided_by})` : a.decided_by ?? "?"}${a.comment ? `: ${a.comment}` : ""}`),
      out,
    );
  });
  return [
    h("div", { class: "bar" }, h("h2", {}, "Approvals"), statusFilter("approval-status", status, ["pending", "approved", "denied"], filterParams, "#/approvals")),
    items.length ? items : h("p", { class: "muted" }, status === "pending" ? "Nothing waits for a decision." : "No approvals match."),
    olderLink("#/approvals", filterParams, page.next_cursor),
  ];
}

function revokeToken(agentId, jti) {
  return api("DELETE", `/v1/agents/${enc(agentId)}/tokens/${enc(jti)}`);
}

async function showAgents() {
  const agents = await listAll(`/v1/agents`);
  const out = h("div");
  const run = (fn) => showOutcome(out, fn);
  // An agent's recent tokens, read when opened: their ids, scopes and state, never the tokens.
  const tokenList = (agent) => {
    const box = h("div", { class: "token-list" });
    const load = () =>
      showOutcome(box, async () => {
        const page = await api("GET", `/v1/agents/${enc(agent.id)}/tokens?limit=20`);
        const revoke = (t) =>
          h("button", {
            type: "button",
            class: "link revoke-token",
            onclick: () => revokeToken(agent.id, t.jti).then(load, (err) => box.replaceChildren(problem(err))),
          }, "revoke");
        return [
          table(
            ["Token id", "Scopes", "State", "Expires"],
            page.data.map((t) =>
              h("tr", {}, h("td", {}, h("code", {}, t.jti)), h("td", {}, t.scopes.join(" ")), h("td", {}, t.status, " ", t.status === "active" ? revoke(t) : null), h("td", {}, when(t.expires_at))),
            ),
            "No tokens yet.",
          ),
          page.next_cursor ? h("p", { class: "muted" }, "The 20 newest are shown.") : null,
        ];
      });
    return h("details", { ontoggle: (e) => e.target.open && load() }, h("summary", {}, "Tokens"), box);
  };
  const mint = (agent) => {
    const scopes = h("input", { class: "token-scopes", value: "invoke:*", "aria-label": "Scopes, e.g. invoke:billing_*" });
    const ttl = h("input", { class: "token-ttl", type: "number", min: 1, value: 3600, "aria-label": "Lifetime in seconds" });
    return h(
      "form",
      {
        class: "row",
        onsubmit: (e) => {
          e.preventDefault();
          run(async () => {
            const t = await api("POST", `/v1/agents/${enc(agent.id)}/tokens`, { scopes: scopes.value.split(/[\s,]+/).filter(Boolean), ttl_seconds: Number(ttl.value) });
            const revoke = h("button", { type: "button", class: "link" }, "revoke this token");
            revoke.addEventListener("click", () => run(async () => { await revokeToken(agent.id, t.jti); return h("div", { class: "ok", role: "status" }, `Token ${t.jti} revoked.`); }));
            return h("div", { class: "ok", role: "status" }, `Token for ${agent.id} (id ${t.jti}, expires ${when(t.expires_at)}), shown once: `, h("code", { class: "secret" }, t.token), " ", revoke);
          });
        },
      },
      h("label", { class: "inline" }, "scopes ", scopes),
      h("label", { class: "inline" }, "lifetime (s) ", ttl),
      h("button", { type: "submit" }, "Mint token"),
    );
  };
  const id = h("input", { id: "agent-id", placeholder: "support-bot", required: true });
  const name = h("input", { id: "agent-name", placeholder: "Support bot" });
  const roles = h("input", { id: "agent-roles", placeholder: "support, billing" });
  const tokenAgent = h("input", { id: "token-agent", placeholder: "support-bot", required: true });
  const tokenId = h("input", { id: "token-id", placeholder: "the token's id", required: true });
  return [
    h("h2", {}, "Agents"),
    table(
      ["Agent", "Roles", "State", "Tokens"],
      agents.map((a) =>
        h(
          "tr",
          {},
          h("td", {}, a.name ?? a.id, h("div", { class: "muted" }, a.id)),
          h("td", {}, (a.roles ?? []).join(", ")),
          h("td", {}, a.revoked ? "revoked" : "active"),
          h(
            "td",
            {},
            a.revoked ? null : mint(a),
            tokenList(a),
            a.revoked ? null : h("button", { type: "button", class: "link", onclick: () => run(async () => { if (!confirm(`Revoke ${a.id} and every token it holds?`)) return ""; await api("DELETE", `/v1/agents/${enc(a.id)}`); await route(); return ""; }) }, "revoke agent"),
          ),
        ),
      ),
      "No agents yet.",
    ),
    out,
    formCard({
      title: "Add an agent",
      fields: [
        ["Id", id],
        ["Name", name],
        ["Roles (comma-separated; policies grant actions to roles)", roles],
      ],
      intro: "An agent's id is kept forever, even after it is revoked.",
      submitLabel: "Add agent",
      submitId: "add-agent",
      submit: async () => {
        await api("POST", `/v1/agents`, { id: id.value.trim(), name: name.value.trim() || id.value.trim(), roles: commaList(roles.value) });
        await route();
        return "";
      },
    }),
    formCard({
      title: "Revoke one token",
      intro: "A leaked token is revoked by its id (shown when it was minted); the agent and its other tokens keep working.",
      fields: [
        ["Agent id", tokenAgent],
        ["Token id", tokenId],
      ],
      submitLabel: "Revoke token",
      submitId: "revoke-token",
      submit: async () => {
        await revokeToken(tokenAgent.value.trim(), tokenId.value.trim());
        return h("div", { class: "ok", role: "status" }, `Token ${tokenId.value.trim()} revoked.`);
      },
    }),
  ];
}

async function showPolicies() {
  const policy = await api("GET", `/v1/policies`);
  const rows = policy.rows.map((r) => ({ ...r }));
  const body = h("tbody", { id: "policy-rows" });
  // Row numbers match the "row N" of error messages.
  const out = h("div");
  const render = () => {
    body.replaceChildren(
      ...rows.map((r, i) =>
        h(
          "tr",
          {},
          h("td", { class: "muted" }, String(i + 1)),
          h("td", {}, h("input", { class: "policy-subject", value: r.subject, placeholder: "role:support or agent:<id>", "aria-label": "subject", oninput: (e) => { r.subject = e.target.value; } })),
          h("td", {}, h("input", { class: "policy-object", value: r.object, placeholder: "refund_* or *", "aria-label": "actions", oninput: (e) => { r.object = e.target.value; } })),
          h("td", {}, h("select", { class: "policy-effect", "aria-label": "effect", onchange: (e) => { r.effect = e.target.value; } }, ["allow", "deny"].map((v) => h("option", { value: v, selected: v === r.effect }, v)))),
          h("td", {}, h("button", { type: "button", class: "link", onclick: () => { rows.splice(i, 1); render(); } }, "remove")),
        ),
      ),
    );
  };
  render();
  const sending = watchEdits(body);
  const fileRows = policy.file_rows ?? [];
  return [
    h("h2", {}, "Policies"),
    h("p", { class: "muted" }, "Which roles (or agents) may invoke which actions. Deny wins over allow; a token also needs the scope."),
    h("table", {}, h("thead", {}, h("tr", {}, ["Row", "Subject", "Actions", "Effect", ""].map((t) => h("th", {}, t)))), body),
    h(
      "div",
      { class: "row" },
      h("button", { type: "button", id: "add-policy-row", onclick: () => { rows.push({ subject: "role:", object: "*", act: "invoke", effect: "allow" }); render(); } }, "+ Row"),
      h(
        "button",
        {
          type: "button",
          id: "save-policies",
          class: "primary",
          onclick: async () => {
            const landed = sending();
            if (rows.length === 0 && !confirm("Save no rows? Every grant made here is removed (rows from policies/ files stay).")) return;
            try {
              const changed = { rows: rows.map((r) => ({ subject: r.subject.trim(), object: r.object.trim(), act: r.act ?? "invoke", effect: r.effect })) };
              await api("PUT", `/v1/policies`, changed, policy[ETAG] ? { "if-match": policy[ETAG] } : {});
              landed();
              await route();
              notice(h("div", { class: "ok", role: "status" }, "Saved; every replica applies it at once."));
            } catch (err) {
              // The API counts rows from 0; the table shows them from 1.
              const details = (err.details ?? []).map((d) => ({ ...d, path: d.path.replace(/^\/rows\/(\d+)/, (_, n) => `row ${Number(n) + 1}`) }));
              out.replaceChildren(problem({ message: err.message, details }));
            }
          },
        },
        "Save policies",
      ),
    ),
    out,
    fileRows.length
      ? [h("h3", {}, "From policies/ files (read-only here)"), table(["Subject", "Actions", "Effect"], fileRows.map((r) => h("tr", {}, h("td", {}, r.subject ?? ""), h("td", {}, r.object ?? ""), h("td", {}, r.effect ?? ""))), "")]
      : null,
  ];
}

// ---------------------------------------------------------------- API keys

async function showApiKeys() {
  const keys = await listAll(`/v1/api-keys`);
  const name = h("input", { id: "key-name", placeholder: "dashboard", required: true });
  const role = h(
    "select",
    { id: "key-role" },
    [["viewer", "viewer: read only"], ["developer", "developer: read, send events"], ["approver", "approver: read, decide approvals"], ["admin", "admin: everything but owner keys"], ["owner", "owner"]].map(([v, t]) => h("option", { value: v }, t)),
  );
  const out = h("div");
  return [
    h("h2", {}, "API keys"),
    h("p", { class: "muted" }, "Keys for people and systems using this API (agents use tokens instead). Stored hashed: a key is shown once, when it is made."),
    table(
      ["Name", "Role", "Key", "Created", ""],
      keys.map((k) =>
        h(
          "tr",
          {},
          h("td", {}, k.name, h("div", { class: "muted" }, k.id)),
          h("td", {}, k.role),
          h("td", {}, h("code", {}, `${k.key_prefix ?? ""}…`)),
          h("td", {}, when(k.created_at)),
          h("td", {}, h("button", {
            type: "button",
            class: "link",
            onclick: async () => {
              if (!confirm(`Revoke ${k.name}? Whatever uses it stops working at once.`)) return;
              try {
                await api("DELETE", `/v1/api-keys/${enc(k.id)}`);
                await route();
              } catch (err) {
                out.replaceChildren(problem(err));
              }
            },
          }, "revoke")),
        ),
      ),
      "No keys.",
    ),
    out,
    formCard({
      title: "Make a key",
      fields: [
        ["Name", name],
        ["Role", role],
      ],
      submitLabel: "Make key",
      submitId: "make-key",
      submit: async () => {
        const k = await api("POST", `/v1/api-keys`, { name: name.value.trim(), role: role.value });
        await route();
        notice(h("div", { class: "ok", role: "status" }, `Key ${k.name} (${k.role}), shown once: `, h("code", { class: "secret" }, k.key)));
        return "";
      },
    }),
  ];
}

// ---------------------------------------------------------------- routing

const VIEWS = [
  [/^#\/rules\/new$/, () => showRuleEditor(null)],
  [/^#\/rules\/([^/?]+)$/, (m) => showRuleEditor(decodeURIComponent(m[1]))],
  [/^#\/rules$/, showRules],
  [/^#\/endpoints$/, showEndpoints],
  [/^#\/deliveries\/([^/?]+)$/, (m) => showDelivery(decodeURIComponent(m[1]))],
  [/^#\/deliveries(\?.*)?$/, (m) => showDeliveries(new URLSearchParams(m[1] ?? ""))],
  [/^#\/invocations\/([^/?]+)$/, (m) => showInvocation(decodeURIComponent(m[1]))],
  [/^#\/invocations(\?.*)?$/, (m) => showInvocations(new URLSearchParams(m[1] ?? ""))],
  [/^#\/approvals(\?.*)?$/, (m) => showApprovals(new URLSearchParams(m[1] ?? ""))],
  [/^#\/agents$/, showAgents],
  [/^#\/policies$/, showPolicies],
  [/^#\/actions\/new$/, () => showActionEditor(null)],
  [/^#\/actions\/([^/?]+)$/, (m) => showActionEditor(decodeURIComponent(m[1]))],
  [/^#\/actions$/, showActions],
  [/^#\/event-types$/, showEventTypes],
  [/^#\/api-keys$/, showApiKeys],
  [/^#\/audit(\?.*)?$/, (m) => showAudit(new URLSearchParams(m[1] ?? ""))],
];

let navigation = 0;

/**
 * Renders the view the address names. Views load their data and return their nodes; a view
 * that finishes after the user went elsewhere is dropped, and the old one is cleared at once,
 * so a slow answer can never put a stale page (and its buttons) under a new address.
 */
async function route() {
  // Another address while an editor holds edits: ask first, and stay (at its address) if told to.
  if (main.dataset.view && location.hash !== main.dataset.view && !mayLeave()) {
    history.replaceState(null, "", main.dataset.view);
    return;
  }
  unsavedEdits = null;
  const mine = ++navigation;
  if (!sessionStorage.getItem(KEY_SLOT)) {
    nav.hidden = true;
    showSignIn();
    return;
  }
  nav.hidden = false;
  const hash = location.hash || "#/rules";
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("current", hash.startsWith(a.getAttribute("href")));
  const view = VIEWS.find(([pattern]) => pattern.test(hash));
  if (!view) {
    // Replaced, not pushed: Back must not return to the address that bounced.
    history.replaceState(null, "", "#/rules");
    return route();
  }
  if (main.dataset.view !== hash) show(h("p", { class: "muted", id: "loading" }, "Loading…"));
  main.dataset.view = hash;
  let nodes;
  try {
    nodes = await view[1](hash.match(view[0]));
  } catch (err) {
    nodes = sessionStorage.getItem(KEY_SLOT) ? problem(err) : null;
  }
  if (mine === navigation && nodes) show(nodes);
}

/** Shows a message above the current view (after a refresh, say). */
function notice(node) {
  main.prepend(node);
}

document.getElementById("sign-out").addEventListener("click", () => mayLeave() && signOut("Signed out."));
window.addEventListener("beforeunload", (e) => {
  if (unsavedEdits?.()) {
    e.preventDefault();
    e.returnValue = "";
  }
});
window.addEventListener("hashchange", route);
route();
