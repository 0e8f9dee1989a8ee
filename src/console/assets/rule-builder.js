// The visual rule builder's model: a *form* (plain data the page edits, every value as the text
// the user typed) and a *rule* (the JSON that /v1/rules stores), converted both ways.
// No DOM here, so the same functions run in the browser and in Node (the tests drive them
// against the real server).

/** The comparison operators, in the order the builder offers them, with their labels. */
export const OPERATORS = [
  { op: "eq", label: "equals" },
  { op: "neq", label: "does not equal" },
  { op: "contains", label: "contains" },
  { op: "starts_with", label: "starts with" },
  { op: "in", label: "is one of" },
  { op: "not_in", label: "is none of" },
  { op: "gt", label: "is greater than" },
  { op: "gte", label: "is at least" },
  { op: "lt", label: "is less than" },
  { op: "lte", label: "is at most" },
  { op: "matches", label: "matches the pattern" },
  { op: "exists", label: "is present" },
];

const KNOWN_OPS = new Set(OPERATORS.map((o) => o.op));

/** An empty form: a rule for every event, no conditions, no outputs yet. */
export function emptyForm() {
  return {
    name: "",
    description: "",
    enabled: true,
    eventType: "",
    conditions: newGroup(),
    outputs: [],
  };
}

/** A new group of conditions that must all hold. */
export function newGroup(mode = "all") {
  return { kind: "group", mode, negate: false, items: [] };
}

/** A new comparison row. */
export function newCondition(field = "", op = "eq", value = "") {
  return { kind: "condition", field, op, value, negate: false };
}

/** A new output of the given kind (`deliver`, `invoke` or `emit`). */
export function newOutput(kind) {
  switch (kind) {
    case "deliver":
      return { kind, endpointId: "" };
    case "invoke":
      return { kind, action: "", arguments: "" };
    case "emit":
      return { kind, type: "", data: "" };
    default:
      throw new Error(`unknown output kind ${kind}`);
  }
}

/**
 * Reads one typed value. `kind` is what the event's schema says the field holds (`"string"`,
 * `"number"`, `"boolean"`) or `undefined` when it does not say. Quoted text (`"42"`) is always
 * that string. Otherwise, on a text field the text is the string; on other fields a JSON number,
 * boolean, null, array or object is that value and anything else is a string — so `enterprise`
 * and `"enterprise"` are the same, and on a field of unknown type `42` is the number.
 */
export function parseScalar(text, kind) {
  const t = text.trim();
  if (t.startsWith('"')) {
    try {
      const value = JSON.parse(t);
      if (typeof value === "string") return value;
    } catch {
      // reported below
    }
    throw new BuilderError(`${t} opens a quote it does not close (write "text in quotes")`);
  }
  if (kind === "string") return t;
  if (/^-?\d+(\.\d+)?([eE][+-]?\d+)?$/.test(t)) {
    const n = Number(t);
    if (/^-?\d+$/.test(t) && !Number.isSafeInteger(n)) {
      throw new BuilderError(`${t} is too large to compare exactly; put it in quotes to compare it as text`);
    }
    return n;
  }
  if (kind === "number") throw new BuilderError(`this field holds numbers, and ${t || "nothing"} is not one`);
  if (t === "true" || t === "false" || t === "null") return JSON.parse(t);
  if (/^[[{]/.test(t)) {
    let value;
    try {
      value = JSON.parse(t);
    } catch {
      return t;
    }
    const unsafe = unsafeIntegerIn(t);
    if (unsafe !== undefined) throw new BuilderError(`${unsafe} is too large to compare exactly; put it in quotes to compare it as text`);
    return value;
  }
  return t;
}

/** The text that [`parseScalar`] reads back as `value` for a field of `kind`. */
export function formatScalar(value, kind) {
  if (typeof value !== "string") return JSON.stringify(value);
  const plain = value === value.trim() && value !== "" && !/^["[{]/.test(value) && !value.includes(",");
  if (!plain) return JSON.stringify(value);
  if (kind === "string") return value;
  let readBack;
  try {
    readBack = parseScalar(value, kind);
  } catch {
    return JSON.stringify(value);
  }
  return readBack === value ? value : JSON.stringify(value);
}

/** Splits `a, "b, c", d` at the commas outside quotes. */
function splitList(text) {
  const items = [];
  let current = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "\\" && quoted) {
      current += c + (text[i + 1] ?? "");
      i++;
    } else if (c === '"') {
      quoted = !quoted;
      current += c;
    } else if (c === "," && !quoted) {
      items.push(current);
      current = "";
    } else {
      current += c;
    }
  }
  if (quoted) throw new BuilderError("a quote in the list is not closed");
  items.push(current);
  return items;
}

/** The value of a comparison from its text, as the operator expects it (see [`parseScalar`]). */
export function parseValue(op, text, kind) {
  switch (op) {
    case "exists":
      return text.trim() === "false" ? false : undefined;
    case "matches":
    case "starts_with":
      if (text === "") throw new BuilderError(op === "matches" ? "enter a pattern" : "enter the text it starts with");
      return text;
    case "in":
    case "not_in": {
      const t = text.trim();
      if (t === "") throw new BuilderError("enter one or more values, separated by commas");
      if (t.startsWith("[")) {
        let list;
        try {
          list = JSON.parse(t);
        } catch {
          list = null;
        }
        if (Array.isArray(list)) {
          const unsafe = unsafeIntegerIn(t);
          if (unsafe !== undefined) throw new BuilderError(`${unsafe} is too large to compare exactly; put it in quotes to compare it as text`);
          return list;
        }
        throw new BuilderError('a list in brackets must be a JSON array, e.g. ["high", "urgent"]');
      }
      return splitList(t).map((item) => {
        if (item.trim() === "") throw new BuilderError("the list has an empty item; separate values with single commas");
        return parseScalar(item, kind);
      });
    }
    default:
      if (text.trim() === "") throw new BuilderError('enter a value to compare with (write "" for empty text)');
      return parseScalar(text, kind);
  }
}

/** The text a comparison's value is edited as (the inverse of [`parseValue`]). */
export function formatValue(op, value, kind) {
  switch (op) {
    case "exists":
      return value === false ? "false" : "true";
    case "matches":
    case "starts_with":
      return typeof value === "string" ? value : JSON.stringify(value);
    case "in":
    case "not_in": {
      const scalar = (v) => v === null || ["string", "number", "boolean"].includes(typeof v);
      if (!Array.isArray(value) || value.length === 0 || !value.every(scalar)) return JSON.stringify(value);
      return value.map((v) => formatScalar(v, kind)).join(", ");
    }
    default:
      return value === undefined ? "" : formatScalar(value, kind);
  }
}

/**
 * What a comparison's value is read as, from the event's schema: a function of the field's
 * path and the operator (for `contains` on a list, the kind of its items).
 */
export function kindsOf(schema) {
  return kindsFrom(fieldsOf(schema));
}

/** [`kindsOf`] for a list of fields such as [`fieldsOf`] or [`guardFieldsOf`] give. */
export function kindsFrom(fieldList) {
  const fields = new Map(fieldList.map((f) => [f.path, f]));
  return (path, op) => {
    const field = fields.get(path.trim());
    if (!field) return undefined;
    return op === "contains" && field.type === "array" ? field.items : field.type === "array" ? undefined : field.type;
  };
}

/** A mistake in the form, reported before anything is sent. */
export class BuilderError extends Error {}

/**
 * The first whole number in JSON `text` (outside its strings) that JavaScript cannot hold exactly
 * (beyond 2^53), as written; `undefined` if none.
 */
export function unsafeIntegerIn(text) {
  const tokens = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
  for (const [token] of text.matchAll(tokens)) {
    if (/^-?\d+$/.test(token) && !Number.isSafeInteger(Number(token))) return token;
  }
  return undefined;
}

function parseObjectText(text, what) {
  if (text.trim() === "") return undefined;
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new BuilderError(`${what} is not valid JSON (${e.message})`);
  }
  const unsafe = unsafeIntegerIn(text);
  if (unsafe !== undefined) {
    throw new BuilderError(`${what} holds ${unsafe}, a whole number beyond 2^53 that the console cannot send exactly; put it in quotes, or use the API`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new BuilderError(`${what} must be a JSON object, like {"key": "value"}`);
  }
  return value;
}

/** Sets `target[key]` to the JSON object in `text` (nothing when blank), or records why not. */
function putObject(target, key, text, what, path, errors) {
  try {
    const value = parseObjectText(text, what);
    if (value !== undefined) target[key] = value;
  } catch (e) {
    errors.push({ path, message: e.message });
  }
}

function conditionFromNode(node, outer, errors, kindOf) {
  // A negated node sits inside `{"not": …}`, and the server's pointers say so.
  const at = node.negate ? `${outer}/not` : outer;
  let condition;
  if (node.kind === "group") {
    if (node.items.length === 0) {
      errors.push({ path: at, message: "this group has no conditions: add one or remove the group" });
      return null;
    }
    const items = node.items
      .map((item, i) => conditionFromNode(item, `${at}/${node.mode}/${i}`, errors, kindOf))
      .filter((c) => c !== null);
    condition = { [node.mode]: items };
  } else {
    const field = node.field.trim();
    if (field === "") {
      errors.push({ path: `${at}/field`, message: "choose the field to compare, e.g. data.customer.tier" });
    }
    if (!KNOWN_OPS.has(node.op)) {
      errors.push({ path: `${at}/op`, message: `unknown operator ${node.op}` });
    }
    condition = { field, op: node.op };
    try {
      const value = parseValue(node.op, node.value, node.untyped ? undefined : kindOf(field, node.op));
      if (value !== undefined) condition.value = value;
    } catch (e) {
      errors.push({ path: `${at}/value`, message: e.message });
    }
  }
  return node.negate ? { not: condition } : condition;
}

/** The condition a top-level group describes, or `undefined` when it has none (always holds). */
function conditionOfGroup(top, at, errors, kindOf) {
  if (top.items.length > 0) {
    // A single, plain condition needs no group around it.
    const sole = top.items.length === 1 && !top.negate ? top.items[0] : top;
    return conditionFromNode(sole, at, errors, kindOf);
  }
  if (top.negate) errors.push({ path: at, message: "\"not\" needs conditions to negate: add one or untick it" });
  return undefined;
}

/** The verdicts a guard can give, with their labels. */
export const GUARD_VERDICTS = [
  { then: "require_approval", label: "hold it for a person's approval" },
  { then: "deny", label: "refuse it" },
  { then: "allow", label: "allow it (skip later guards; an action that always needs approval still does)" },
];

/** A new guard: holds every call for approval until conditions are added. */
export function newGuard() {
  return { conditions: newGroup(), then: "require_approval", reason: "" };
}

/**
 * An action's guards from their forms, and the mistakes in them (paths under `/guards`, as
 * the API's 422 details).
 */
export function guardsFromForm(forms, kindOf = () => undefined) {
  const errors = [];
  const guards = forms.map((form, i) => {
    const guard = {};
    const condition = conditionOfGroup(form.conditions, `/guards/${i}/if`, errors, kindOf);
    if (condition !== undefined) guard.if = condition;
    if (!GUARD_VERDICTS.some((v) => v.then === form.then)) errors.push({ path: `/guards/${i}/then`, message: "choose what the guard does" });
    guard.then = form.then;
    // Kept as typed: an empty reason is left out (the server then gives its default).
    if (form.reason !== "") guard.reason = form.reason;
    return guard;
  });
  return { guards, errors };
}

/** The forms that edit an action's guards (the inverse of [`guardsFromForm`]). */
export function formFromGuards(guards, kindOf = () => undefined) {
  return (guards ?? []).map((g) => {
    const form = newGuard();
    if (g.if !== undefined) {
      const node = nodeFromCondition(g.if, kindOf);
      form.conditions = node.kind === "group" ? node : { ...newGroup(), items: [node] };
    }
    form.then = g.then ?? "require_approval";
    form.reason = String(g.reason ?? "");
    return form;
  });
}

/**
 * The fields a guard can compare for an action whose arguments `inputSchema` describes: the
 * agent's id and roles, the action's name and version, and `arguments.*`.
 */
export function guardFieldsOf(inputSchema) {
  const fields = [
    { path: "agent.id", type: "string" },
    { path: "agent.roles", type: "array", items: "string" },
    { path: "action.name", type: "string" },
    { path: "action.version", type: "number" },
  ];
  walkFields(inputSchema, "arguments", fields);
  return fields;
}

/**
 * The rule a form describes, and the mistakes that keep it from being valid
 * (`[{path, message}]`, paths as JSON pointers into the rule, like the API's 422 details).
 */
export function ruleFromForm(form, kindOf = () => undefined) {
  const errors = [];
  const rule = { name: form.name.trim(), enabled: form.enabled };
  if (rule.name === "") errors.push({ path: "/name", message: "give the rule a name" });
  if (form.description.trim() !== "") rule.description = form.description.trim();
  const eventType = form.eventType.trim();
  if (eventType === "") {
    errors.push({ path: "/when/event_type", message: "choose the event that triggers the rule (or * for any)" });
  }
  rule.when = { event_type: eventType };

  const condition = conditionOfGroup(form.conditions, "/if", errors, kindOf);
  if (condition !== undefined) rule.if = condition;

  rule.then = form.outputs.map((output, i) => {
    const at = `/then/${i}`;
    switch (output.kind) {
      case "deliver":
        if (output.endpointId === "") errors.push({ path: `${at}/deliver/endpoint_id`, message: "choose an endpoint" });
        return { deliver: { endpoint_id: output.endpointId } };
      case "invoke": {
        if (output.action === "") errors.push({ path: `${at}/invoke/action`, message: "choose an action" });
        const invoke = { action: output.action };
        putObject(invoke, "arguments", output.arguments, "the arguments", `${at}/invoke/arguments`, errors);
        return { invoke };
      }
      case "emit": {
        if (output.type.trim() === "") errors.push({ path: `${at}/emit/type`, message: "name the event to emit" });
        const emit = { type: output.type.trim() };
        putObject(emit, "data", output.data, "the event data", `${at}/emit/data`, errors);
        return { emit };
      }
      default:
        errors.push({ path: at, message: `unknown output ${output.kind}` });
        return {};
    }
  });
  if (rule.then.length === 0) {
    errors.push({ path: "/then", message: "add at least one thing to do: deliver, invoke or emit" });
  }
  return { rule, errors };
}

function nodeFromCondition(condition, kindOf) {
  if (condition && typeof condition === "object") {
    if ("not" in condition) {
      const inner = nodeFromCondition(condition.not, kindOf);
      inner.negate = !inner.negate;
      return inner;
    }
    for (const mode of ["all", "any"]) {
      if (Array.isArray(condition[mode])) {
        return { kind: "group", mode, negate: false, items: condition[mode].map((c) => nodeFromCondition(c, kindOf)) };
      }
    }
    const op = condition.op ?? "eq";
    const field = condition.field ?? "";
    let kind = kindOf(field, op);
    // A stored value of another type than the schema now gives (written before the schema
    // changed, say) is edited untyped, so that saving keeps it as it is.
    const values = Array.isArray(condition.value) && ["in", "not_in"].includes(op) ? condition.value : [condition.value];
    const untyped = kind === "string" && values.some((v) => v !== undefined && typeof v !== "string");
    if (untyped) kind = undefined;
    const row = newCondition(field, op, formatValue(op, condition.value, kind));
    if (untyped) row.untyped = true;
    return row;
  }
  return newCondition();
}

/**
 * The form that edits a stored rule (the inverse of [`ruleFromForm`], up to equivalent shapes:
 * a double `not` reads as none, and a group of one condition at the top as that condition).
 */
export function formFromRule(rule, kindOf = () => undefined) {
  const form = emptyForm();
  form.name = rule.name ?? "";
  form.description = rule.description ?? "";
  form.enabled = rule.enabled !== false;
  form.eventType = rule.when?.event_type ?? "";
  if (rule.if !== undefined) {
    const node = nodeFromCondition(rule.if, kindOf);
    form.conditions = node.kind === "group" ? node : { ...newGroup(), items: [node] };
  }
  form.outputs = (rule.then ?? []).map((output) => {
    if (output.deliver) return { kind: "deliver", endpointId: output.deliver.endpoint_id ?? "" };
    if (output.invoke) {
      return {
        kind: "invoke",
        action: output.invoke.action ?? "",
        arguments: output.invoke.arguments === undefined ? "" : JSON.stringify(output.invoke.arguments, null, 2),
      };
    }
    if (output.emit) {
      return {
        kind: "emit",
        type: output.emit.type ?? "",
        data: output.emit.data === undefined ? "" : JSON.stringify(output.emit.data, null, 2),
      };
    }
    return newOutput("deliver");
  });
  return form;
}

/** `"string"`, `"number"`, `"boolean"`, `"array"`, `"object"`, or `undefined` (unknown or mixed). */
function kindOfSchema(schema) {
  if (!schema || typeof schema !== "object") return undefined;
  const type = schema.type ?? (Array.isArray(schema.enum) && schema.enum.every((v) => typeof v === "string") ? "string" : undefined);
  if (typeof type !== "string") return undefined;
  return type === "integer" ? "number" : type === "null" ? undefined : type;
}

/**
 * The fields a condition can compare for events described by `schema` (a JSON Schema of the
 * event's `data`), as `{path, enum?}` with dotted paths from the event (`data.customer.tier`).
 */
export function fieldsOf(schema) {
  const fields = [
    { path: "type", type: "string" },
    { path: "id", type: "string" },
  ];
  walkFields(schema, "data", fields);
  return fields;
}

/** Adds the properties `schema` describes to `fields`, as dotted paths under `prefix`. */
function walkFields(schema, prefix, fields, depth = 0) {
  if (!schema || typeof schema !== "object" || depth > 6) return;
  for (const [name, prop] of Object.entries(schema.properties ?? {})) {
    const here = `${prefix}.${name}`;
    const field = { path: here, type: kindOfSchema(prop) };
    if (field.type === "array") field.items = kindOfSchema(prop?.items);
    if (Array.isArray(prop?.enum)) field.enum = prop.enum;
    fields.push(field);
    walkFields(prop, here, fields, depth + 1);
  }
}

/** A plausible example of data matching `schema`, to start a dry run from. */
export function sampleOf(schema, depth = 0, root = schema) {
  if (!schema || typeof schema !== "object" || depth > 6) return null;
  schema = flatten(schema, root);
  if (schema.examples?.length) return schema.examples[0];
  if (schema.const !== undefined) return schema.const;
  if (Array.isArray(schema.enum) && schema.enum.length) return schema.enum[0];
  const type = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  const shape = schema.properties || schema.required ? "object" : schema.prefixItems ? "array" : null;
  switch (type ?? shape) {
    case "object": {
      const out = {};
      for (const [name, prop] of Object.entries(schema.properties ?? {})) out[name] = sampleOf(prop, depth + 1, root);
      // A required field the schema says nothing more about takes any value.
      for (const name of Array.isArray(schema.required) ? schema.required : []) if (!(name in out)) out[name] = "example";
      return out;
    }
    case "array": {
      const prefix = Array.isArray(schema.prefixItems) ? schema.prefixItems.map((item) => sampleOf(item, depth + 1, root)) : [];
      const wanted = Math.max(schema.minItems ?? 0, schema.items && !prefix.length ? 1 : 0) - prefix.length;
      const room = Number.isInteger(schema.maxItems) ? schema.maxItems - prefix.length : Infinity;
      const count = Math.max(0, Math.min(wanted, room));
      const items = Array.from({ length: count }, () => sampleOf(schema.items, depth + 1, root));
      // Unique items must differ: vary the copies within what the item schema allows.
      const rest = schema.uniqueItems ? items.map((item, k) => distinct(item, k, flatten(schema.items ?? {}, root))) : items;
      return [...prefix, ...rest];
    }
    case "integer":
      return numberWithin(schema, true);
    case "number":
      return numberWithin(schema, false);
    case "boolean":
      return true;
    case "string":
      return stringWithin(schema);
    default:
      return null;
  }
}

/**
 * `schema` with what it composes folded in, so one sample fits it: a local `$ref` (`#/$defs/…`)
 * is read where it points, `allOf` parts are merged (their properties and required fields
 * together), and of `anyOf` / `oneOf` the first branch is taken.
 */
function flatten(schema, root, seen = 0) {
  if (!schema || typeof schema !== "object" || seen > 8) return schema ?? {};
  let out = { ...schema };
  if (typeof out.$ref === "string") {
    const target = pointTo(root, out.$ref);
    delete out.$ref;
    if (target) out = merge(flatten(target, root, seen + 1), out);
  }
  if (Array.isArray(out.allOf)) {
    const parts = out.allOf;
    delete out.allOf;
    for (const part of parts) out = merge(out, flatten(part, root, seen + 1));
  }
  for (const key of ["anyOf", "oneOf"]) {
    if (Array.isArray(out[key]) && out[key].length) {
      const first = out[key][0];
      delete out[key];
      out = merge(out, flatten(first, root, seen + 1));
    }
  }
  return out;
}

/** Two schemas as one: the second's keywords win, properties and required fields add up. */
function merge(a, b) {
  const out = { ...a, ...b };
  if (a.properties || b.properties) out.properties = { ...a.properties, ...b.properties };
  if (a.required || b.required) out.required = [...new Set([...(a.required ?? []), ...(b.required ?? [])])];
  return out;
}

/** What a local reference (`#/$defs/name`, any JSON pointer in the same document) points to. */
function pointTo(root, ref) {
  if (!ref.startsWith("#")) return undefined;
  const path = ref.slice(1).split("/").slice(1).map((p) => decodeURIComponent(p).replaceAll("~1", "/").replaceAll("~0", "~"));
  let at = root;
  for (const step of path) {
    if (!at || typeof at !== "object") return undefined;
    at = at[step];
  }
  return at && typeof at === "object" ? at : undefined;
}

/** Strings that each `format` accepts. */
const FORMAT_SAMPLES = {
  email: "ada@example.com",
  "date-time": "1970-01-01T00:00:00.000Z",
  date: "1970-01-01",
  time: "00:00:00Z",
  uri: "https://example.com/",
  url: "https://example.com/",
  uuid: "00000000-0000-4000-8000-000000000000",
  hostname: "example.com",
  ipv4: "192.0.2.1",
  ipv6: "2001:db8::1",
};

/** A string within the schema's lengths; a pattern is met only by an `examples` entry. */
function stringWithin(schema) {
  const text = FORMAT_SAMPLES[schema.format] ?? "example";
  const min = Number.isInteger(schema.minLength) ? schema.minLength : 0;
  const max = Number.isInteger(schema.maxLength) ? schema.maxLength : Infinity;
  if (text.length < min) return text + "x".repeat(min - text.length);
  return text.length > max ? text.slice(0, max) : text;
}

/** A number within the schema's bounds (inclusive or exclusive) and a multiple of `multipleOf`. */
function numberWithin(schema, integer) {
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
  const [min, max] = [num(schema.minimum), num(schema.maximum)];
  const [above, below] = [num(schema.exclusiveMinimum), num(schema.exclusiveMaximum)];
  // The closest allowed values at each end; an exclusive bound's neighbour is one step in.
  const lows = [min !== undefined && (integer ? Math.ceil(min) : min), above !== undefined && (integer ? Math.floor(above) + 1 : above + 1)];
  const highs = [max !== undefined && (integer ? Math.floor(max) : max), below !== undefined && (integer ? Math.ceil(below) - 1 : below - 1)];
  const low = lows.filter((v) => v !== false).reduce((a, b) => Math.max(a, b), -Infinity);
  const high = highs.filter((v) => v !== false).reduce((a, b) => Math.min(a, b), Infinity);
  let value = integer ? 100 : 1.5;
  if (Number.isFinite(low) && Number.isFinite(high)) {
    // Between two exclusive bounds closer than a step, only the middle is sure to fit.
    value = low <= high ? (low + high) / 2 : ((above ?? min) + (below ?? max)) / 2;
  } else if (value < low) value = low;
  else if (value > high) value = high;
  const multiple = num(schema.multipleOf);
  if (multiple !== undefined && multiple > 0) {
    value = Math.ceil(value / multiple) * multiple;
    if (value > high) value -= multiple;
  } else if (integer) {
    value = Math.ceil(value);
    if (value > high) value = Math.floor(high);
  }
  return value;
}

/** `item` made different from the other copies of it by its position `k`, within `schema`. */
function distinct(item, k, schema) {
  if (k === 0) return item;
  if (Array.isArray(schema.enum) && schema.enum.length > k) return schema.enum[k];
  if (typeof item === "number") {
    const step = typeof schema.multipleOf === "number" && schema.multipleOf > 0 ? schema.multipleOf : 1;
    const up = item + k * step;
    const max = schema.maximum ?? (schema.exclusiveMaximum !== undefined ? schema.exclusiveMaximum - step : undefined);
    return max === undefined || up <= max ? up : item - k * step;
  }
  if (typeof item === "string" && !schema.pattern) {
    const varied = `${item}${k}`;
    return Number.isInteger(schema.maxLength) && varied.length > schema.maxLength
      ? `${item.slice(0, Math.max(0, schema.maxLength - String(k).length))}${k}`
      : varied;
  }
  return item;
}

function describeCondition(c) {
  if (c.all) return `(${c.all.map(describeCondition).join(" and ")})`;
  if (c.any) return `(${c.any.map(describeCondition).join(" or ")})`;
  if (c.not) return `not ${describeCondition(c.not)}`;
  const label = OPERATORS.find((o) => o.op === c.op)?.label ?? c.op;
  if (c.op === "exists") return `${c.field} ${c.value === false ? "is absent" : label}`;
  return `${c.field} ${label} ${JSON.stringify(c.value)}`;
}

/** One sentence saying what a rule does, for lists. */
export function describeRule(rule) {
  const when = rule.when?.event_type === "*" ? "any event" : rule.when?.event_type;
  const cond = rule.if ? `, if ${describeCondition(rule.if).replace(/^\((.*)\)$/, "$1")}` : "";
  const outputs = (rule.then ?? []).map((o) => {
    if (o.deliver) return `deliver to ${o.deliver.endpoint_id}`;
    if (o.invoke) return `invoke ${o.invoke.action}`;
    if (o.emit) return `emit ${o.emit.type}`;
    return "?";
  });
  return `When ${when} happens${cond}: ${outputs.join(", then ")}.`;
}
