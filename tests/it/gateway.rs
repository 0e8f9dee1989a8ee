//! The agent gateway: tokens, scopes and roles, validated and idempotent invocations, tool
//! export, invocation records, rate limits.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Method;
use serde_json::{Value, json};

use crate::delivery::{endpoint, fast_delivery};
use crate::dual;
use crate::harness::{Backend, TestApp, assert_error, at_once, details, error_code, read, wait_until};
use crate::receiver::Receiver;

/// An app with loopback delivery, the shipped example actions bound to `rx`, and the shipped policy.
pub struct World {
    pub app: TestApp,
    pub rx: Receiver,
}

pub async fn world(backend: Backend) -> World {
    world_with(backend, |_, _| {}).await
}

pub async fn world_with(
    backend: Backend,
    adjust: impl FnOnce(&mut opsiq::config::RawConfig, &std::path::Path) + 'static,
) -> World {
    let app = TestApp::on(backend)
        .with(fast_delivery)
        .with(|raw, _| raw.actions_dir = crate::harness::repo_path("schemas/actions"))
        .with(adjust)
        .start()
        .await;
    let rx = Receiver::start().await;
    rx.answer(|r, _| {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let result = match body["action"]["name"].as_str() {
            Some("refund_invoice") => json!({"refund_id": "re_1", "status": "succeeded"}),
            Some("lookup_customer") => {
                json!({"customer_id": body["arguments"]["customer_id"], "tier": "enterprise"})
            }
            Some("create_ticket") => json!({"ticket_id": "t_9"}),
            _ => json!({"ok": true}),
        };
        (
            200,
            vec![("content-type", "application/json".into())],
            result.to_string(),
        )
    });
    let (endpoint_id, _) = endpoint(&app, &rx.url("/actions"), json!({"event_types": ["none.*"]})).await;
    for name in [
        "refund_invoice",
        "create_ticket",
        "lookup_customer",
        "extend_license",
        "escalate_to_human",
    ] {
        let (_, mut action) = app.call(Method::GET, &format!("/v1/actions/{name}"), None).await;
        action["endpoint_id"] = endpoint_id.clone().into();
        let (status, body) = app
            .call(Method::PUT, &format!("/v1/actions/{name}"), Some(action))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    World { app, rx }
}

/// Creates an agent with roles and returns a token with `scopes`.
pub async fn agent_token(app: &TestApp, id: &str, roles: &[&str], scopes: &[&str]) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/agents",
            Some(json!({"id": id, "name": id, "roles": roles})),
        )
        .await;
    assert!(status == 201 || status == 409, "{body}");
    token(app, id, scopes, 3600).await
}

pub async fn token(app: &TestApp, agent: &str, scopes: &[&str], ttl: u64) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/v1/agents/{agent}/tokens"),
            Some(json!({"scopes": scopes, "ttl_seconds": ttl})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

/// POSTs an invocation as `token`.
pub async fn invoke(
    app: &TestApp,
    token: &str,
    action: &str,
    args: Value,
    key: Option<&str>,
) -> (u16, Value) {
    read(
        invoke_request(app, token, action, args, key)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Calls tool `name` over MCP (the stateless 2026-07-28 revision) with an idempotency key;
/// answers the JSON-RPC response.
async fn mcp_call(app: &TestApp, token: &str, name: &str, arguments: Value, key: &str) -> Value {
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": name, "arguments": arguments,
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {},
                      "io.opsiq/idempotency-key": key}}});
    let resp = app
        .as_key(token, Method::POST, "/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", name)
        .json(&call)
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Declares action `name` again as it is, changed by `change`.
async fn redeclare(app: &TestApp, name: &str, change: impl FnOnce(&mut Value)) {
    let path = format!("/v1/actions/{name}");
    let (_, mut action) = app.call(Method::GET, &path, None).await;
    change(&mut action);
    let (status, body) = app.call(Method::PUT, &path, Some(action)).await;
    assert_eq!(status, 200, "{body}");
}

/// The tool `name` as `GET /v1/tools?format=mcp` lists it for `token`.
async fn mcp_tool(app: &TestApp, token: &str, name: &str) -> Value {
    let (_, mcp) = app
        .call_as(token, Method::GET, "/v1/tools?format=mcp", None)
        .await;
    mcp["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not listed: {mcp}"))
}

/// Like [`invoke`] with `refund_invoice`, on a task of its own (to run calls side by side).
fn spawn_refund(app: &TestApp, token: &str, key: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let req = invoke_request(app, token, "refund_invoice", refund_args(), Some(key));
    tokio::spawn(async move { read(req.send().await.unwrap()).await })
}

fn invoke_request(
    app: &TestApp,
    token: &str,
    action: &str,
    args: Value,
    key: Option<&str>,
) -> reqwest::RequestBuilder {
    let req = app
        .as_key(token, Method::POST, &format!("/v1/actions/{action}/invoke"))
        .json(&json!({"arguments": args}));
    match key {
        Some(k) => req.header("Idempotency-Key", k),
        None => req,
    }
}

fn refund_args() -> Value {
    json!({"invoice_id": "in_42", "amount": 1500, "currency": "eur", "reason": "service_outage"})
}

dual!(an_answer_too_exact_for_json_numbers_is_kept_as_text);

dual!(
    tools_are_listed_per_token_in_each_format,
    sync_and_async_invocations,
    idempotency_replays_and_conflicts,
    concurrent_duplicates_make_one_delivery,
    invalid_arguments_get_actionable_422s,
    scope_and_role_denials_are_recorded,
    forged_and_revoked_tokens_are_refused,
    endpoint_client_errors_become_tool_errors,
    output_schema_mismatch_is_reported,
    policy_edits_take_effect_at_once,
    rate_limits_answer_429,
    external_issuer_tokens,
    saving_the_issuer_refetches_its_jwks,
    calls_to_a_disabled_endpoint_are_refused_at_once,
    a_used_key_outlives_its_deleted_action,
);

async fn tools_are_listed_per_token_in_each_format(backend: Backend) {
    let w = world(backend).await;
    let support = agent_token(&w.app, "agt_support", &["support"], &["invoke:*"]).await;
    let (status, body) = w
        .app
        .call_as(&support, Method::GET, "/v1/tools?format=openai", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let names: HashSet<String> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = ["lookup_customer", "create_ticket", "escalate_to_human"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected, "support may not refund or extend");
    let t = &body["data"][0];
    assert_eq!(t["type"], "function");
    assert!(t["function"]["parameters"]["type"] == "object");
    assert!(t["function"]["description"].is_string());

    let (_, anthropic) = w
        .app
        .call_as(&support, Method::GET, "/v1/tools?format=anthropic", None)
        .await;
    let a = &anthropic["data"][0];
    assert!(a["name"].is_string() && a["input_schema"]["type"] == "object" && a.get("function").is_none());
    // OpenAI and Anthropic refuse a request whose tool has `oneOf` at the top of its schema;
    // the shipped lookup_customer has one: it is said in the description instead.
    let lookup_openai = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "lookup_customer")
        .unwrap();
    let lookup_anthropic = anthropic["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "lookup_customer")
        .unwrap();
    let lookup = mcp_tool(&w.app, &support, "lookup_customer").await;
    for (schema, description) in [
        (
            &lookup_openai["function"]["parameters"],
            &lookup_openai["function"]["description"],
        ),
        (
            &lookup_anthropic["input_schema"],
            &lookup_anthropic["description"],
        ),
        (&lookup["inputSchema"], &lookup["description"]),
    ] {
        assert!(schema.get("oneOf").is_none(), "{schema}");
        assert!(schema["properties"]["email"].is_object(), "{schema}");
        let description = description.as_str().unwrap();
        assert!(
            description.ends_with("Give exactly one of: customer_id; email."),
            "{description}"
        );
    }
    // The gateway still holds calls to the whole schema.
    let (status, body) = invoke(
        &w.app,
        &support,
        "lookup_customer",
        json!({"customer_id": "c_1", "email": "a@example.com"}),
        None,
    )
    .await;
    assert_eq!((status, error_code(&body)), (422, "validation_failed"), "{body}");
    assert_eq!(lookup["inputSchema"]["type"], "object");
    assert_eq!(lookup["annotations"]["readOnlyHint"], true);
    assert!(lookup["outputSchema"].is_object());
    // An async action's output schema is not advertised: an MCP client would demand structured
    // content that a queued call cannot have.
    let billing = agent_token(&w.app, "agt_billing_tools", &["billing"], &["invoke:*"]).await;
    let extend = mcp_tool(&w.app, &billing, "extend_license").await;
    assert!(
        extend["inputSchema"].is_object() && extend.get("outputSchema").is_none(),
        "{extend}"
    );

    // Scope AND role: a narrow scope hides what the role would allow.
    let narrow = token(&w.app, "agt_support", &["invoke:create_ticket"], 600).await;
    let (_, body) = w.app.call_as(&narrow, Method::GET, "/v1/tools", None).await;
    let names: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["create_ticket"]);
    let (status, _) = w
        .app
        .call_as(&support, Method::GET, "/v1/tools?format=yaml", None)
        .await;
    assert_eq!(status, 400);

    // Pages, when asked for: in name order, each going on after the last name of the one before.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/v1/tools?format=anthropic&limit=2&cursor={cursor}");
        let (status, page) = w.app.call_as(&support, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2, "{page}");
        paged.extend(data.iter().map(|t| t["name"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
    }
    assert_eq!(paged, ["create_ticket", "escalate_to_human", "lookup_customer"]);
    for bad in ["limit=0", "limit=201"] {
        let (status, _) = w
            .app
            .call_as(&support, Method::GET, &format!("/v1/tools?{bad}"), None)
            .await;
        assert_eq!(status, 400, "{bad}");
    }

    // Only what can be called is listed: an action whose endpoint is disabled, or that has
    // none, would only ever answer `action_unavailable`.
    let listed = |token: String| {
        let app = &w.app;
        async move {
            let (status, body) = app
                .call_as(&token, Method::GET, "/v1/tools?format=anthropic", None)
                .await;
            assert_eq!(status, 200, "{body}");
            let names = body["data"].as_array().unwrap().iter();
            names
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let (own_endpoint, _) = endpoint(&w.app, &w.rx.url("/tickets"), json!({"event_types": ["none.*"]})).await;
    redeclare(&w.app, "create_ticket", |a| {
        a["endpoint_id"] = own_endpoint.clone().into()
    })
    .await;
    assert!(
        listed(support.clone())
            .await
            .contains(&"create_ticket".to_string())
    );
    let path = format!("/v1/endpoints/{own_endpoint}");
    let (status, body) = w
        .app
        .call(Method::PATCH, &path, Some(json!({"enabled": false})))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(10), || async {
        listed(support.clone()).await == ["escalate_to_human", "lookup_customer"]
    })
    .await;
    let (status, body) = invoke(
        &w.app,
        &support,
        "create_ticket",
        json!({"customer_id": "cus_1", "subject": "Broken", "body": "b"}),
        Some("t-1"),
    )
    .await;
    assert_error((status, &body), 409, "action_unavailable", "disabled");
    redeclare(&w.app, "create_ticket", |a| a["endpoint_id"] = Value::Null).await;
    assert_eq!(
        w.app
            .call(Method::PATCH, &path, Some(json!({"enabled": true})))
            .await
            .0,
        200
    );
    assert_eq!(listed(support).await, ["escalate_to_human", "lookup_customer"]);
}

async fn sync_and_async_invocations(backend: Backend) {
    let w = world(backend).await;
    let billing = agent_token(&w.app, "agt_billing", &["billing"], &["invoke:*"]).await;
    let (status, body) = invoke(
        &w.app,
        &billing,
        "refund_invoice",
        refund_args(),
        Some("refund-1"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["result"]["refund_id"], "re_1");
    let invocation_id = body["invocation_id"].as_str().unwrap().to_string();

    let r = &w.rx.received()[0];
    assert_eq!(r.header("x-opsiq-action"), Some("refund_invoice"));
    let sent = r.json();
    assert_eq!(sent["type"], "action.invoke");
    assert_eq!(sent["id"], invocation_id.as_str());
    assert_eq!(sent["action"]["name"], "refund_invoice");
    assert!(sent["action"]["version"].as_i64().unwrap() >= 1);
    assert_eq!(sent["arguments"], refund_args());
    assert_eq!(sent["agent"]["id"], "agt_billing");
    assert_eq!(sent["agent"]["roles"], json!(["billing"]));
    let key = r.header("idempotency-key").unwrap();
    assert!(
        key.starts_with("idem_") && !key.contains("refund-1"),
        "derived from, not equal to, the agent's key"
    );

    // The record names exactly what ran.
    let (_, record) = w
        .app
        .call(Method::GET, &format!("/v1/invocations/{invocation_id}"), None)
        .await;
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["agent_id"], "agt_billing");
    assert!(
        record["action"]["content_hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(record["arguments"], refund_args());
    assert!(record["duration_ms"].is_number());

    // extend_license is declared async: 202 at once, settled later.
    let (status, body) = invoke(
        &w.app,
        &billing,
        "extend_license",
        json!({"license_id": "lic_7", "days": 7}),
        Some("x-1"),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    let id = body["invocation_id"].as_str().unwrap();
    let (_, settled) = w
        .app
        .call_as(
            &billing,
            Method::GET,
            &format!("/v1/invocations/{id}?wait=30s"),
            None,
        )
        .await;
    assert_eq!(settled["status"], "succeeded", "{settled}");

    // An agent sees only its own invocations.
    let other = agent_token(&w.app, "agt_other", &["support"], &["invoke:*"]).await;
    let (status, _) = w
        .app
        .call_as(
            &other,
            Method::GET,
            &format!("/v1/invocations/{invocation_id}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, mine) = w
        .app
        .call_as(&billing, Method::GET, "/v1/invocations", None)
        .await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 2);
    let (_, theirs) = w.app.call_as(&other, Method::GET, "/v1/invocations", None).await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
    // Naming another agent in the filter finds nothing rather than being ignored.
    let (status, named) = w
        .app
        .call_as(&billing, Method::GET, "/v1/invocations?agent_id=agt_other", None)
        .await;
    assert_eq!(
        (status, named["data"].as_array().unwrap().len()),
        (200, 0),
        "{named}"
    );
    let (_, own) = w
        .app
        .call_as(
            &billing,
            Method::GET,
            "/v1/invocations?agent_id=agt_billing",
            None,
        )
        .await;
    assert_eq!(own["data"].as_array().unwrap().len(), 2);
}

/// An endpoint's answer holding an integer past 64 bits reaches the caller as the text it sent,
/// not as the nearest float.
async fn an_answer_too_exact_for_json_numbers_is_kept_as_text(backend: Backend) {
    let w = world(backend).await;
    let support = agent_token(&w.app, "agt_s", &["support"], &["invoke:*"]).await;
    let answer = r#"{"customer_id": "c_1", "tier": "enterprise", "ltv": 123456789012345678901234567890}"#;
    w.rx.answer(move |_, _| {
        (
            200,
            vec![("content-type", "application/json".into())],
            answer.into(),
        )
    });
    let (status, body) = invoke(
        &w.app,
        &support,
        "lookup_customer",
        json!({"customer_id": "c_1"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!(answer), "{body}");
    // Other JSON stays JSON, an escaped NUL in it too.
    let with_nul = r#"{"customer_id": "c_1", "tier": "enterprise", "note": "a\u0000b"}"#;
    w.rx.answer(move |_, _| {
        (
            200,
            vec![("content-type", "application/json".into())],
            with_nul.into(),
        )
    });
    let (status, body) = invoke(
        &w.app,
        &support,
        "lookup_customer",
        json!({"customer_id": "c_1"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["tier"], "enterprise", "{body}");
}

async fn idempotency_replays_and_conflicts(backend: Backend) {
    let w = world(backend).await;
    let billing = agent_token(&w.app, "agt_b", &["billing"], &["invoke:*"]).await;
    let (_, first) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("k1")).await;
    let (status, again) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("k1")).await;
    assert_eq!(status, 200);
    assert_eq!(again["invocation_id"], first["invocation_id"]);
    assert_eq!(again["result"], first["result"]);
    assert_eq!(w.rx.received().len(), 1, "never a second delivery");
    // 1500.0 and 1.5e3 are the number 1500, as JSON Schema counts: the same call, not a conflict.
    for spelling in ["1500.0", "1.5e3"] {
        let mut respelled = refund_args();
        respelled["amount"] = serde_json::from_str(spelling).unwrap();
        let (status, again) = invoke(&w.app, &billing, "refund_invoice", respelled, Some("k1")).await;
        assert_eq!(status, 200, "{spelling}: {again}");
        assert_eq!(again["invocation_id"], first["invocation_id"]);
    }
    assert_eq!(w.rx.received().len(), 1, "never a second delivery");

    // An async call was answered 202 at once: so is its repeat, after the call succeeded too.
    let license = json!({"license_id": "lic_1", "days": 7});
    let (status, queued) = invoke(&w.app, &billing, "extend_license", license.clone(), Some("x1")).await;
    assert_eq!((status, &queued["status"]), (202, &json!("queued")), "{queued}");
    let path = format!("/v1/invocations/{}", queued["invocation_id"].as_str().unwrap());
    wait_until(Duration::from_secs(30), || async {
        w.app.call(Method::GET, &path, None).await.1["status"] == "succeeded"
    })
    .await;
    let (status, again) = invoke(&w.app, &billing, "extend_license", license.clone(), Some("x1")).await;
    assert_eq!((status, &again), (202, &queued), "the first answer");
    assert_eq!(w.rx.received().len(), 2, "never a second delivery");
    // Over MCP a tool result tells a model what happened: a repeat says where the call stands.
    let first = mcp_call(&w.app, &billing, "extend_license", license.clone(), "x3").await;
    let first_text = first["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(first_text.contains("is queued"), "{first}");
    wait_until(Duration::from_secs(30), || async { w.rx.received().len() == 3 }).await;
    // (The test receiver's answer does not fit the action's output schema: the tool result
    // says the action ran, and with what.)
    let done = crate::harness::eventually(Duration::from_secs(30), || async {
        let again = mcp_call(&w.app, &billing, "extend_license", license.clone(), "x3").await;
        let text = again["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // (Between the delivery's answer and its record the call is still `delivering`.)
        (text != first_text && !text.contains("is delivering")).then_some(text)
    })
    .await;
    assert!(done.starts_with("The action ran"), "{done}");
    assert_eq!(w.rx.received().len(), 3, "never a second delivery");
    // Except a denial: a call a person refused answers so when repeated.
    let deliveries = w.rx.received().len();
    redeclare(&w.app, "extend_license", |a| a["approval"] = "always".into()).await;
    let license = json!({"license_id": "lic_2", "days": 3});
    let (status, held) = invoke(&w.app, &billing, "extend_license", license.clone(), Some("x2")).await;
    assert_eq!(
        (status, &held["status"]),
        (202, &json!("pending_approval")),
        "{held}"
    );
    let (_, pending) = w
        .app
        .call(Method::GET, "/v1/approvals?status=pending", None)
        .await;
    let approval = pending["data"][0]["id"].as_str().unwrap();
    let deny = format!("/v1/approvals/{approval}/deny");
    assert_eq!(w.app.call(Method::POST, &deny, None).await.0, 200);
    let (status, again) = invoke(&w.app, &billing, "extend_license", license, Some("x2")).await;
    assert_eq!(status, 403, "{again}");
    assert_eq!(w.rx.received().len(), deliveries);

    let mut other = refund_args();
    other["amount"] = json!(99);
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", other, Some("k1")).await;
    assert_eq!(status, 409);
    assert_eq!(error_code(&body), "idempotency_conflict");

    let (status, body) = invoke(&w.app, &billing, "refund_invoice", refund_args(), None).await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "idempotency_key_required");
    // read_only actions need no key.
    let (status, body) = invoke(
        &w.app,
        &billing,
        "lookup_customer",
        json!({"customer_id": "c_1"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["tier"], "enterprise");

    // Keys are per agent: another agent's same key is a different call.
    let billing2 = agent_token(&w.app, "agt_b2", &["billing"], &["invoke:*"]).await;
    let (_, theirs) = invoke(&w.app, &billing2, "refund_invoice", refund_args(), Some("k1")).await;
    assert_ne!(theirs["invocation_id"], first["invocation_id"]);

    // Keys last 24 hours: once expired (even before the purge deletes it) a key is free again.
    let db = opsiq::db::Database::connect(&w.app.database_url).await.unwrap();
    let day_and_a_bit = 24 * 3600 * 1000 + 60_000;
    db.execute(
        "UPDATE idempotency_records SET created_at = created_at - $1, expires_at = expires_at - $1 WHERE key = $2",
        opsiq::args![day_and_a_bit, "k1"],
    )
    .await
    .unwrap();
    db.close().await;
    let mut other = refund_args();
    other["amount"] = json!(77);
    let (status, later) = invoke(&w.app, &billing, "refund_invoice", other, Some("k1")).await;
    assert!(status == 200 || status == 202, "{status} {later}");
    assert_ne!(later["invocation_id"], first["invocation_id"]);
    // The first call, two licenses, the read-only lookup, the other agent's call and this one.
    let deliveries = w.rx.wait_for(6).await;
    assert!(deliveries.iter().any(|d| d.json()["arguments"]["amount"] == 77));

    // A key stored by an earlier version, which hashed `1500.0` as spelled, still answers a retry
    // spelled so.
    let mut spelled = refund_args();
    spelled["amount"] = serde_json::from_str("1500.0").unwrap();
    let (status, stored) = invoke(&w.app, &billing, "refund_invoice", spelled.clone(), Some("k-old")).await;
    assert_eq!(status, 200, "{stored}");
    let legacy = opsiq::crypto::sha256_hex(format!("refund_invoice\n{spelled}").as_bytes());
    let db = opsiq::db::Database::connect(&w.app.database_url).await.unwrap();
    let updated = db
        .execute(
            "UPDATE idempotency_records SET request_hash = $1 WHERE key = $2",
            opsiq::args![&legacy, "k-old"],
        )
        .await
        .unwrap();
    db.close().await;
    assert_eq!(updated, 1);
    let (status, again) = invoke(&w.app, &billing, "refund_invoice", spelled, Some("k-old")).await;
    assert_eq!(
        (status, &again["invocation_id"]),
        (200, &stored["invocation_id"]),
        "{again}"
    );
    assert_eq!(w.rx.received().len(), 7, "never a second delivery");
    // A used key is answered as the key says even when the call would be refused: other
    // arguments (invalid ones too) are a conflict, and nothing more is recorded.
    let (_, listed) = w.app.call(Method::GET, "/v1/invocations", None).await;
    let recorded = listed["data"].as_array().unwrap().len();
    let mut invalid = refund_args();
    invalid["amount"] = json!("x");
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", invalid, Some("k1")).await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "idempotency_conflict"),
        "{body}"
    );
    let (_, listed) = w.app.call(Method::GET, "/v1/invocations", None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), recorded, "{listed}");
    // Also once the action is disabled: the same call gets its first answer, another a 409.
    let (status, before) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("k-dis")).await;
    assert_eq!(status, 200, "{before}");
    redeclare(&w.app, "refund_invoice", |a| a["enabled"] = json!(false)).await;
    let (status, again) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("k-dis")).await;
    assert_eq!(
        (status, &again["invocation_id"]),
        (200, &before["invocation_id"]),
        "{again}"
    );
    // Not to the same agent's token whose scopes leave the action out: it finds no action.
    let (status, narrow) = w
        .app
        .call(
            Method::POST,
            "/v1/agents/agt_b/tokens",
            Some(json!({"scopes": ["invoke:lookup_*"], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{narrow}");
    let narrow = narrow["token"].as_str().unwrap();
    let (status, body) = invoke(&w.app, narrow, "refund_invoice", refund_args(), Some("k-dis")).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    let mut other = refund_args();
    other["amount"] = json!(1);
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", other.clone(), Some("k-dis")).await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "idempotency_conflict"),
        "{body}"
    );
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", other, Some("k-new")).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    redeclare(&w.app, "refund_invoice", |a| a["enabled"] = json!(true)).await;

    // A whole number spelled as a float reaches the endpoint, and the record, as the integer it
    // is: a strictly typed reader of an integer field refuses `1500.0`.
    let before = w.rx.received().len();
    let mut respelled = refund_args();
    respelled["amount"] = serde_json::from_str("1.5e3").unwrap();
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", respelled, Some("k-float")).await;
    assert!(status == 200 || status == 202, "{body}");
    let sent = w.rx.wait_for(before + 1).await;
    let text = String::from_utf8_lossy(&sent[before].body).into_owned();
    assert!(text.contains(r#""amount":1500,"#), "{text}");
    let path = format!("/v1/invocations/{}", body["invocation_id"].as_str().unwrap());
    let (_, record) = w.app.call(Method::GET, &path, None).await;
    assert_eq!(record["arguments"]["amount"].to_string(), "1500", "{record}");
}

async fn concurrent_duplicates_make_one_delivery(backend: Backend) {
    let w = world(backend).await;
    let billing = agent_token(&w.app, "agt_c", &["billing"], &["invoke:*"]).await;
    let tasks: Vec<_> = (0..16).map(|_| spawn_refund(&w.app, &billing, "same")).collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 200 || status == 202, "{status} {body}");
        ids.insert(body["invocation_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "one invocation for sixteen duplicates");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.rx.received().len(), 1, "one delivery for sixteen duplicates");
}

async fn invalid_arguments_get_actionable_422s(backend: Backend) {
    let w = world(backend).await;
    let billing = agent_token(&w.app, "agt_v", &["billing"], &["invoke:*"]).await;
    let bad =
        json!({"invoice_id": "INV-1", "amount": -5, "currency": "euro", "reason": "because", "extra": 1});
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", bad, Some("v1")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(error_code(&body), "validation_failed");
    let paths: HashSet<&str> = details(&body, "path").into_iter().collect();
    for p in ["/invoice_id", "/amount", "/currency", "/reason"] {
        assert!(paths.contains(p), "missing {p} in {body}");
    }
    assert!(
        body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| !d["message"].as_str().unwrap().is_empty())
    );
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", json!({}), Some("v2")).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["details"].to_string().contains("invoice_id"),
        "{body}"
    );
    let (status, _) = invoke(&w.app, &billing, "refund_invoice", json!([1, 2]), Some("v3")).await;
    assert_eq!(status, 422);
    let (status, body) = invoke(&w.app, &billing, "no_such_action", json!({}), Some("v4")).await;
    assert_eq!(status, 404, "{body}");
    // Arguments that name a key twice would be checked as one value and read as another by a
    // parser that keeps the first: refused before anything else reads them.
    let twice = w
        .app
        .as_key(&billing, Method::POST, "/v1/actions/refund_invoice/invoke")
        .header("content-type", "application/json")
        .header("Idempotency-Key", "v5")
        .body(r#"{"arguments": {"invoice_id": "in_42", "amount": 1, "currency": "eur", "reason": "duplicate", "amount": 150000}}"#);
    let (status, body) = read(twice.send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "duplicate_key"), "{body}");
    assert_eq!(details(&body, "path"), ["/arguments/amount"], "{body}");
    assert!(w.rx.received().is_empty(), "nothing invalid is delivered");
}

async fn scope_and_role_denials_are_recorded(backend: Backend) {
    let w = world(backend).await;
    let narrow = agent_token(&w.app, "agt_n", &["billing"], &["invoke:lookup_*"]).await;
    let (status, body) = invoke(&w.app, &narrow, "refund_invoice", refund_args(), Some("s1")).await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "scope_denied");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invoke:refund_invoice")
    );

    let support = agent_token(&w.app, "agt_s", &["support"], &["invoke:*"]).await;
    let (status, body) = invoke(&w.app, &support, "refund_invoice", refund_args(), Some("s2")).await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "role_denied");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("support"),
        "{body}"
    );

    // Deny wins: billing allows refunds, intern denies them.
    let both = agent_token(&w.app, "agt_i", &["billing", "intern"], &["invoke:*"]).await;
    let (status, body) = invoke(&w.app, &both, "refund_invoice", refund_args(), Some("s3")).await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "role_denied");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("role:intern"),
        "{body}"
    );
    let (status, _) = invoke(
        &w.app,
        &both,
        "lookup_customer",
        json!({"customer_id": "c"}),
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (_, denied) = w
        .app
        .call(Method::GET, "/v1/invocations?status=denied", None)
        .await;
    let codes: Vec<&str> = denied["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes.len(), 3);
    assert!(codes.contains(&"scope_denied") && codes.contains(&"role_denied"));
    assert_eq!(w.rx.received().len(), 1, "only the allowed lookup was delivered");
}

fn tamper(token: &str, f: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    f(&mut claims);
    format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    )
}

async fn forged_and_revoked_tokens_are_refused(backend: Backend) {
    let w = world(backend).await;
    let good = agent_token(&w.app, "agt_f", &["support"], &["invoke:*"]).await;
    assert_eq!(w.app.call_as(&good, Method::GET, "/v1/tools", None).await.0, 200);
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(good.split('.').nth(1).unwrap()).unwrap()).unwrap();

    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not the tenant key"),
    )
    .unwrap();
    let (other_tenant, other_key) = w.app.new_tenant("globex").await;
    let cases = [
        ("alg none", alg_none),
        (
            "tampered scope",
            tamper(&good, |c| c["scope"] = "invoke:* admin".into()),
        ),
        (
            "tampered roles",
            tamper(&good, |c| c["roles"] = json!(["billing"])),
        ),
        ("wrong key", wrong_key),
        (
            "other tenant",
            tamper(&good, |c| c["tid"] = other_tenant.clone().into()),
        ),
        (
            "wrong audience",
            tamper(&good, |c| c["aud"] = "someone-else".into()),
        ),
        ("garbage", "not.a.jwt".to_string()),
        ("admin key", w.app.admin_key.clone()),
    ];
    for (name, token) in cases {
        let resp = w
            .app
            .as_key(&token, Method::GET, "/v1/tools")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{name}");
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
        assert_eq!(
            challenge, r#"Bearer realm="opsiq", error="invalid_token""#,
            "{name}"
        );
        let (_, body) = read(resp).await;
        assert_eq!(error_code(&body), "invalid_token", "{name}: {body}");
    }
    // No token at all: the challenge alone (RFC 6750 §3.1).
    let resp = w.app.http.get(w.app.url("/v1/tools")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], r#"Bearer realm="opsiq""#);
    // Two Authorization headers, one good: no reader may pick one the others did not.
    for path in ["/v1/tools", "/v1/endpoints"] {
        let resp = w
            .app
            .http
            .get(w.app.url(path))
            .header("authorization", format!("Bearer {good}"))
            .header("authorization", format!("Bearer {}", w.app.admin_key))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }

    // Expiry: a one-second token stops working.
    let short = token(&w.app, "agt_f", &["invoke:*"], 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = w.app.call_as(&short, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // Revoking a token, then the agent, takes effect at once.
    let (_, minted) = w
        .app
        .call(
            Method::POST,
            "/v1/agents/agt_f/tokens",
            Some(json!({"scopes": ["invoke:*"]})),
        )
        .await;
    let t2 = minted["token"].as_str().unwrap();
    assert_eq!(w.app.call_as(t2, Method::GET, "/v1/tools", None).await.0, 200);
    let jti = minted["jti"].as_str().unwrap();
    assert_eq!(
        w.app
            .call(Method::DELETE, &format!("/v1/agents/agt_f/tokens/{jti}"), None)
            .await
            .0,
        204
    );
    assert_eq!(w.app.call_as(t2, Method::GET, "/v1/tools", None).await.0, 401);
    assert_eq!(w.app.call_as(&good, Method::GET, "/v1/tools", None).await.0, 200);

    // The agent's tokens are listed newest first, a page at a time, with their state and
    // never the token itself.
    let mut listed: Vec<Value> = Vec::new();
    let mut path = "/v1/agents/agt_f/tokens?limit=1".to_string();
    loop {
        let (status, page) = w.app.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/agents/agt_f/tokens?limit=1&cursor={c}"),
            None => break,
        }
    }
    let jtis: Vec<&str> = listed.iter().map(|t| t["jti"].as_str().unwrap()).collect();
    assert!(
        jtis.windows(2).all(|w| w[0] > w[1]),
        "newest first, once each: {jtis:?}"
    );
    assert_eq!(listed[0]["jti"], jti, "the newest is the one just revoked");
    assert_eq!(listed[0]["status"], "revoked");
    assert!(listed[0]["revoked_at"].is_string());
    assert_eq!(listed[0]["scopes"], json!(["invoke:*"]));
    assert_eq!(listed[1]["status"], "expired", "the one-second token: {listed:?}");
    assert!(listed.iter().any(|t| t["status"] == "active"), "{listed:?}");
    assert!(listed.iter().all(|t| t.get("token").is_none()));
    assert!(!serde_json::to_string(&listed).unwrap().contains(&good));
    let (status, _) = w
        .app
        .call(Method::GET, "/v1/agents/agt_nobody/tokens", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = w
        .app
        .call_as(&other_key, Method::GET, "/v1/agents/agt_f/tokens", None)
        .await;
    assert_eq!(status, 404, "another tenant's agent is not there");
    assert_eq!(w.app.call(Method::DELETE, "/v1/agents/agt_f", None).await.0, 204);
    assert_eq!(w.app.call_as(&good, Method::GET, "/v1/tools", None).await.0, 401);
    // Revoking is idempotent; only what does not exist is a 404.
    assert_eq!(w.app.call(Method::DELETE, "/v1/agents/agt_f", None).await.0, 204);
    for missing in ["/v1/agents/agt_nobody", "/v1/agents/agt_f/tokens/jti_invented"] {
        let (status, body) = w.app.call(Method::DELETE, missing, None).await;
        assert_error((status, &body), 404, "not_found", "no such");
    }
    let (status, _) = w
        .app
        .call_as(&other_key, Method::DELETE, "/v1/agents/agt_f", None)
        .await;
    assert_eq!(status, 404, "another tenant's agent is not there");
    // Revoking the agent revoked every token it held, and the list says so.
    let (_, page) = w.app.call(Method::GET, "/v1/agents/agt_f/tokens", None).await;
    let tokens = page["data"].as_array().unwrap();
    assert!(!tokens.is_empty());
    assert!(
        tokens
            .iter()
            .all(|t| t["status"] == "revoked" && t["revoked_at"].is_string()),
        "{page}"
    );
    // Revoking one of them again later does not move the time it was revoked.
    let active_before = tokens.iter().find(|t| t["jti"] != jti).unwrap();
    let path = format!(
        "/v1/agents/agt_f/tokens/{}",
        active_before["jti"].as_str().unwrap()
    );
    assert_eq!(w.app.call(Method::DELETE, &path, None).await.0, 204);
    assert_eq!(w.app.call(Method::DELETE, &path, None).await.0, 204);
    let (_, again) = w.app.call(Method::GET, "/v1/agents/agt_f/tokens", None).await;
    let after = again["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["jti"] == active_before["jti"])
        .unwrap();
    assert_eq!(after["revoked_at"], active_before["revoked_at"]);
}

async fn endpoint_client_errors_become_tool_errors(backend: Backend) {
    let w = world(backend).await;
    w.rx.answer(|_, _| {
        (
            422,
            vec![("content-type", "application/json".into())],
            r#"{"message":"invoice in_42 is already refunded"}"#.into(),
        )
    });
    let billing = agent_token(&w.app, "agt_e", &["billing"], &["invoke:*"]).await;
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("e1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["error"]["status"], 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already refunded")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.rx.received().len(),
        1,
        "a 4xx answer to an action request is final"
    );
}

async fn output_schema_mismatch_is_reported(backend: Backend) {
    let w = world(backend).await;
    w.rx.answer(|_, _| (200, vec![], r#"{"unexpected": true}"#.into()));
    let billing = agent_token(&w.app, "agt_o", &["billing"], &["invoke:*"]).await;
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("o1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output_errors"]["code"], "output_schema_mismatch", "{body}");
    let (_, record) = w
        .app
        .call(
            Method::GET,
            &format!("/v1/invocations/{}", body["invocation_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(record["error"]["code"], "output_schema_mismatch");

    // Over MCP the result may not be given as structured content that breaks the advertised
    // schema: it is an error result that says the action ran.
    let body = mcp_call(&w.app, &billing, "refund_invoice", refund_args(), "o2").await;
    let result = &body["result"];
    assert_eq!(result["isError"], true, "{body}");
    assert!(result.get("structuredContent").is_none(), "{body}");
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("action ran") && text.contains("output schema"),
        "{text}"
    );
    assert_eq!(w.rx.received().len(), 2, "each key ran once");

    // A sync call still running at its timeout has no structured result to give: a tool that
    // advertises an output schema says so as an error result (clients refuse a plain one).
    redeclare(&w.app, "refund_invoice", |a| a["timeout_ms"] = json!(300)).await;
    w.rx.hold(Duration::from_secs(3));
    let body = mcp_call(&w.app, &billing, "refund_invoice", refund_args(), "o3").await;
    let result = &body["result"];
    assert_eq!(result["isError"], true, "{body}");
    assert!(result.get("structuredContent").is_none(), "{body}");
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("not available yet"), "{text}");
}

async fn policy_edits_take_effect_at_once(backend: Backend) {
    let w = world(backend).await;
    let support = agent_token(&w.app, "agt_p", &["support"], &["invoke:*"]).await;
    assert_eq!(
        invoke(
            &w.app,
            &support,
            "extend_license",
            json!({"license_id": "lic_1", "days": 3}),
            Some("p1")
        )
        .await
        .0,
        403
    );
    let rows = json!({"rows": [{"subject": "role:support", "object": "extend_*", "act": "invoke", "effect": "allow"}]});
    let (status, body) = w.app.call(Method::PUT, "/v1/policies", Some(rows)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        invoke(
            &w.app,
            &support,
            "extend_license",
            json!({"license_id": "lic_1", "days": 3}),
            Some("p2")
        )
        .await
        .0,
        202
    );
    let deny =
        json!({"rows": [{"subject": "agent:agt_p", "object": "*", "act": "invoke", "effect": "deny"}]});
    w.app.call(Method::PUT, "/v1/policies", Some(deny)).await;
    assert_eq!(
        invoke(
            &w.app,
            &support,
            "lookup_customer",
            json!({"customer_id": "c"}),
            None
        )
        .await
        .0,
        403
    );
    let (_, got) = w.app.call(Method::GET, "/v1/policies", None).await;
    assert_eq!(got["rows"].as_array().unwrap().len(), 1);
    assert!(got["file_rows"].as_array().unwrap().len() > 3);
    // What a GET answers can be PUT back as it is; the file rows in it are ignored.
    let (status, again) = w.app.call(Method::PUT, "/v1/policies", Some(got.clone())).await;
    assert_eq!((status, &again["rows"]), (200, &got["rows"]), "{again}");
    let bad = json!({"rows": [{"subject": "root", "object": "*", "effect": "allow"}, {"subject": "role:x", "object": "a b", "effect": "maybe"}]});
    let (status, body) = w.app.call(Method::PUT, "/v1/policies", Some(bad)).await;
    assert_eq!(status, 422);
    // Every problem of every row, each at its field.
    let paths = details(&body, "path");
    assert_eq!(
        paths,
        ["/rows/0/subject", "/rows/1/object", "/rows/1/effect"],
        "{body}"
    );
    // Another tenant's rows never apply here.
    let (_, other_key) = w.app.new_tenant("globex").await;
    let allow_all =
        json!({"rows": [{"subject": "agent:agt_p", "object": "*", "act": "invoke", "effect": "allow"}]});
    assert_eq!(
        w.app
            .call_as(&other_key, Method::PUT, "/v1/policies", Some(allow_all))
            .await
            .0,
        200
    );
    assert_eq!(
        invoke(
            &w.app,
            &support,
            "lookup_customer",
            json!({"customer_id": "c"}),
            None
        )
        .await
        .0,
        403
    );
}

async fn rate_limits_answer_429(backend: Backend) {
    let w = world_with(backend, |raw, _| raw.agent_rate_per_s = 2).await;
    let support = agent_token(&w.app, "agt_r", &["support"], &["invoke:*"]).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let resp = w
            .app
            .as_key(&support, Method::POST, "/v1/actions/lookup_customer/invoke")
            .json(&json!({"arguments": {"customer_id": "c"}}))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
        statuses.push(resp.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
}

/// The issuer of tokens from an [`Idp`].
pub(crate) const IDP_ISSUER: &str = "https://idp.example.com";

/// An identity provider serving one JWKS document at a time, for tests of external issuers.
pub(crate) struct Idp {
    receiver: Receiver,
    document: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Idp {
    /// Starts serving the public half of `key`.
    pub(crate) async fn serving(key: &jsonwebtoken::EncodingKey) -> Idp {
        let receiver = Receiver::start().await;
        let document = std::sync::Arc::new(std::sync::Mutex::new(jwks_document(key)));
        let served = document.clone();
        receiver.answer(move |_, _| {
            let body = served.lock().unwrap().clone();
            (200, vec![("content-type", "application/json".into())], body)
        });
        Idp { receiver, document }
    }

    /// Serves the public half of `key` from now on: the provider rotated its key.
    pub(crate) fn rotate_to(&self, key: &jsonwebtoken::EncodingKey) {
        *self.document.lock().unwrap() = jwks_document(key);
    }

    /// Where the document is served.
    pub(crate) fn jwks_url(&self) -> String {
        self.receiver.url("/.well-known/jwks.json")
    }

    /// Every fetch of the document so far.
    pub(crate) fn received(&self) -> Vec<crate::receiver::Received> {
        self.receiver.received()
    }
}

/// A JWKS document holding the public half of `key`.
fn jwks_document(key: &jsonwebtoken::EncodingKey) -> String {
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(key, jsonwebtoken::Algorithm::ES256).unwrap();
    json!({ "keys": [jwk] }).to_string()
}

/// A token of [`IDP_ISSUER`] for `audience` signed with `key`, with scope `invoke:*`, valid ten
/// minutes.
pub(crate) fn external_token(key: &jsonwebtoken::EncodingKey, audience: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": IDP_ISSUER, "aud": audience, "sub": "ext-bot",
                        "exp": now + 600, "iat": now, "scope": "invoke:*"});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        key,
    )
    .unwrap()
}

/// A fresh P-256 key pair made with openssl: the signing key and the public key as PEM, or
/// `None` (after `skip_or_fail`) where openssl is missing.
pub(crate) fn ec_key_pair(
    test: &str,
    dir: &std::path::Path,
    name: &str,
) -> Option<(jsonwebtoken::EncodingKey, String)> {
    let key = dir.join(format!("{name}.pem"));
    let pkcs8 = dir.join(format!("{name}-pkcs8.pem"));
    let public = dir.join(format!("{name}-pub.pem"));
    let openssl = |args: &[&str], input: &std::path::Path, output: &std::path::Path| {
        std::process::Command::new("openssl")
            .args(args)
            .arg(input)
            .arg("-out")
            .arg(output)
            .status()
            .is_ok_and(|s| s.success())
    };
    let generated = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"])
        .arg(&key)
        .status();
    if !generated.is_ok_and(|s| s.success()) {
        crate::harness::skip_or_fail(test, "openssl is not available to make a key pair");
        return None;
    }
    assert!(openssl(&["pkcs8", "-topk8", "-nocrypt", "-in"], &key, &pkcs8));
    assert!(openssl(&["ec", "-pubout", "-in"], &key, &public));
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(std::fs::read(&pkcs8).unwrap().as_slice()).unwrap();
    Some((signing, std::fs::read_to_string(&public).unwrap()))
}

async fn external_issuer_tokens(backend: Backend) {
    let w = world(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let Some((signing, pem)) = ec_key_pair("external_issuer_tokens", dir.path(), "idp") else {
        return;
    };
    // One key source, and public keys only: a private member would be stored and shown.
    let private_jwk = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "s"}]});
    // Nor keys that can verify nothing.
    let mut for_encryption: Value = serde_json::from_str(&jwks_document(&signing)).unwrap();
    let mut not_verifying = for_encryption.clone();
    for_encryption["keys"][0]["use"] = "enc".into();
    not_verifying["keys"][0]["key_ops"] = json!(["encrypt"]);
    let mut encryption_algorithm: Value = serde_json::from_str(&jwks_document(&signing)).unwrap();
    encryption_algorithm["keys"][0]["alg"] = "RSA-OAEP".into();
    for refused in [
        json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "jwks": for_encryption}),
        json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "jwks": not_verifying}),
        json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "jwks": encryption_algorithm}),
        json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "jwks": private_jwk}),
        json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "public_key_pem": pem,
               "jwks": {"keys": []}}),
    ] {
        let (status, body) = w.app.call(Method::PUT, "/v1/token-issuer", Some(refused)).await;
        assert_eq!(status, 422, "{body}");
    }
    let issuer = json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "public_key_pem": pem, "roles_claim": "groups"});
    let (status, body) = w.app.call(Method::PUT, "/v1/token-issuer", Some(issuer)).await;
    assert_eq!(status, 200, "{body}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mint = |f: &dyn Fn(&mut Value)| {
        let mut claims = json!({"iss": "https://idp.example.com", "aud": "opsiq-acme", "sub": "ext-bot", "exp": now + 600,
            "iat": now, "nbf": now, "groups": ["billing"], "scope": "invoke:refund_* invoke:lookup_*"});
        f(&mut claims);
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &signing,
        )
        .unwrap()
    };
    let good = mint(&|_| {});
    let (status, body) = w.app.call_as(&good, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"refund_invoice") && !names.contains(&"create_ticket"),
        "{names:?}"
    );
    let (status, body) = invoke(&w.app, &good, "refund_invoice", refund_args(), Some("ext-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.rx.received()[0].json()["agent"]["roles"], json!(["billing"]));
    // Its calls can wait for approval and be approved: the revocation checks made then apply to
    // the gateway's own agents and tokens, not to an external token's own `jti`.
    let (_, mut refund) = w.app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    refund["approval"] = "always".into();
    let put = |action: Value| {
        w.app
            .call(Method::PUT, "/v1/actions/refund_invoice", Some(action))
    };
    assert_eq!(put(refund.clone()).await.0, 200);
    let with_jti = mint(&|c| c["jti"] = "idp-token-1".into());
    let (status, call) = invoke(&w.app, &with_jti, "refund_invoice", refund_args(), Some("ext-2")).await;
    assert_eq!(status, 202, "{call}");
    let (_, pending) = w
        .app
        .call(Method::GET, "/v1/approvals?status=pending", None)
        .await;
    let approval = pending["data"][0]["id"].as_str().unwrap();
    let (status, _) = w.app.call(Method::GET, "/v1/approvals?status=bogus", None).await;
    assert_eq!(
        status, 400,
        "a status no approval has is refused, not an empty list"
    );
    let (status, body) = w
        .app
        .call(Method::POST, &format!("/v1/approvals/{approval}/approve"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    w.rx.wait_for(2).await;
    refund["approval"] = "never".into();
    assert_eq!(put(refund).await.0, 200);
    // Subjects are matched in a space-separated list: a subject with a space is refused, and a
    // role with one grants nothing (it cannot pose as `role:billing`).
    let posing = mint(&|c| c["sub"] = "x agent:agt_any".into());
    let (status, body) = w.app.call_as(&posing, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 401, "{body}");
    // Nor may a subject pass for a rule, whose calls guards and endpoints see as `rule:<id>`;
    // other colons are a subject's own (`repo:org/app:ref:main`).
    let posing = mint(&|c| c["sub"] = "rule:rul_any".into());
    let (status, body) = w.app.call_as(&posing, Method::GET, "/v1/tools", None).await;
    assert_error((status, &body), 401, "invalid_token", "rule:");
    let colons = mint(&|c| c["sub"] = "repo:org/app:ref:main".into());
    let (status, body) = w.app.call_as(&colons, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 200, "{body}");
    let posing = mint(&|c| c["groups"] = json!(["a role:billing"]));
    let (status, body) = w.app.call_as(&posing, Method::GET, "/v1/tools", None).await;
    assert_eq!(
        (status, body["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{body}"
    );

    // Another workspace may trust the same identity provider with an audience of its own.
    let (_, other_key) = w.app.new_tenant("globex").await;
    let same = json!({"issuer": "https://idp.example.com", "audience": "opsiq-acme", "public_key_pem": pem});
    let (status, body) = w
        .app
        .call_as(&other_key, Method::PUT, "/v1/token-issuer", Some(same))
        .await;
    assert_eq!((status, error_code(&body)), (409, "audience_in_use"));
    let own = json!({"issuer": "https://idp.example.com", "audience": "opsiq-globex", "public_key_pem": pem});
    assert_eq!(
        w.app
            .call_as(&other_key, Method::PUT, "/v1/token-issuer", Some(own))
            .await
            .0,
        200
    );
    let globex_token = mint(&|c| c["aud"] = "opsiq-globex".into());
    let (status, body) = w.app.call_as(&globex_token, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"].as_array().unwrap().len(),
        0,
        "globex grants this agent nothing"
    );
    assert_eq!(
        w.app.call_as(&good, Method::GET, "/v1/tools", None).await.0,
        200,
        "acme's tokens still work"
    );
    // A token must name one workspace, not land in whichever an audience matches first.
    let both = mint(&|c| c["aud"] = json!(["opsiq-acme", "opsiq-globex"]));
    let (status, body) = w.app.call_as(&both, Method::GET, "/v1/tools", None).await;
    assert_error((status, &body), 401, "invalid_token", "more than one workspace");
    // A subject that is one of the workspace's own agents would share its records and outlive
    // its revocation.
    agent_token(&w.app, "agt_twin", &["billing"], &["invoke:*"]).await;
    let twin = mint(&|c| c["sub"] = "agt_twin".into());
    let (status, body) = w.app.call_as(&twin, Method::GET, "/v1/tools", None).await;
    assert_error(
        (status, &body),
        401,
        "invalid_token",
        "agent created in this workspace",
    );
    // Critical header extensions are not understood, so such a token is refused.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.crit = Some(vec!["exp".into()]);
    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&good)
        .unwrap()
        .claims;
    let critical = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
    let (status, body) = w.app.call_as(&critical, Method::GET, "/v1/tools", None).await;
    assert_eq!(status, 401, "{body}");
    // `"crit": null` is a crit member too, signed like any header.
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT","crit":null}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &signing, jsonwebtoken::Algorithm::ES256)
            .unwrap();
    let null_crit = format!("{signing_input}.{signature}");
    let (status, body) = w.app.call_as(&null_crit, Method::GET, "/v1/tools", None).await;
    assert_error((status, &body), 401, "invalid_token", "crit");
    // Two workspaces claiming one new pair at once: one gets it, the other a 409 (not a 500).
    let (_, initech) = w.app.new_tenant("initech").await;
    let (_, umbrella) = w.app.new_tenant("umbrella").await;
    for round in 0..10 {
        let pair = json!({"issuer": "https://idp2.example.com", "audience": format!("shared-{round}"), "public_key_pem": pem});
        let claims = [&initech, &umbrella]
            .into_iter()
            .map(|key| w.app.as_key(key, Method::PUT, "/v1/token-issuer").json(&pair));
        assert_eq!(at_once(claims).await, [200, 409], "round {round}");
    }

    for (name, token) in [
        ("not yet valid", mint(&|c| c["nbf"] = (now + 3600).into())),
        ("expired", mint(&|c| c["exp"] = (now - 3600).into())),
        ("wrong audience", mint(&|c| c["aud"] = "other".into())),
        (
            "unknown issuer",
            mint(&|c| c["iss"] = "https://evil.example.com".into()),
        ),
        ("tampered", tamper(&good, |c| c["groups"] = json!(["admin"]))),
    ] {
        let (status, body) = w.app.call_as(&token, Method::GET, "/v1/tools", None).await;
        assert_eq!(status, 401, "{name}: {body}");
    }
}

/// An issuer whose keys come from a JWKS URL: the document is cached, and saving the issuer
/// (the way an admin picks up the identity provider's rotated key at once) forgets it.
async fn saving_the_issuer_refetches_its_jwks(backend: Backend) {
    const TEST: &str = "saving_the_issuer_refetches_its_jwks";
    let w = world(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let (Some((old_key, _)), Some((new_key, _))) = (
        ec_key_pair(TEST, dir.path(), "old"),
        ec_key_pair(TEST, dir.path(), "new"),
    ) else {
        return;
    };
    let idp = Idp::serving(&old_key).await;
    let issuer = json!({"issuer": IDP_ISSUER, "audience": "opsiq-acme", "jwks_url": idp.jwks_url()});
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/token-issuer", Some(issuer.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (old_token, new_token) = (
        external_token(&old_key, "opsiq-acme"),
        external_token(&new_key, "opsiq-acme"),
    );
    let status_of = |token: String| {
        let app = &w.app;
        async move { app.call_as(&token, Method::GET, "/v1/tools", None).await.0 }
    };
    assert_eq!(status_of(old_token.clone()).await, 200);
    assert_eq!(status_of(new_token.clone()).await, 401);
    assert_eq!(
        idp.received().len(),
        1,
        "the document is fetched once, then cached"
    );
    assert_eq!(idp.received()[0].method, "GET");

    // The identity provider rotates its key; saving the issuer drops the cached document.
    idp.rotate_to(&new_key);
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/token-issuer", Some(issuer.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(status_of(new_token.clone()).await, 200);
    assert_eq!(
        status_of(old_token).await,
        401,
        "the retired key no longer verifies"
    );
    assert_eq!(idp.received().len(), 2);

    // A key the document publishes for encryption, or for another algorithm, verifies nothing.
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&new_key, jsonwebtoken::Algorithm::ES256).unwrap();
    for (field, value) in [
        ("use", json!("enc")),
        ("alg", json!("ES384")),
        ("key_ops", json!(["encrypt"])),
    ] {
        let mut jwk = serde_json::to_value(&jwk).unwrap();
        jwk[field] = value.clone();
        *idp.document.lock().unwrap() = json!({ "keys": [jwk] }).to_string();
        let (status, body) = w
            .app
            .call(Method::PUT, "/v1/token-issuer", Some(issuer.clone()))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            status_of(new_token.clone()).await,
            401,
            "a key with {field} {value}"
        );
    }

    // Removing the issuer: none of its tokens works, whatever was fetched.
    let (status, body) = w.app.call(Method::DELETE, "/v1/token-issuer", None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(status_of(new_token).await, 401);
}

dual!(approvals_hold_calls_until_a_person_decides);

async fn approvals_hold_calls_until_a_person_decides(backend: Backend) {
    let w = world(backend).await;
    let (_, lookup) = w.app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    let mut wire = lookup.clone();
    wire["name"] = json!("refund_with_approval");
    wire["approval"] = json!("always");
    for f in [
        "id",
        "version",
        "content_hash",
        "source",
        "created_at",
        "updated_at",
    ] {
        wire.as_object_mut().unwrap().remove(f);
    }
    let declare = || w.app.call(Method::POST, "/v1/actions", Some(wire.clone()));
    assert_eq!(declare().await.0, 201);
    let alerts = Receiver::start().await;
    crate::delivery::endpoint(
        &w.app,
        &alerts.url("/approvals"),
        json!({"event_types": ["approval.*"]}),
    )
    .await;
    let billing = agent_token(&w.app, "agt_ap", &["billing"], &["invoke:*"]).await;

    let (status, first) = invoke(
        &w.app,
        &billing,
        "refund_with_approval",
        refund_args(),
        Some("ap-1"),
    )
    .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["status"], "pending_approval");
    let call_second = || {
        invoke(
            &w.app,
            &billing,
            "refund_with_approval",
            refund_args(),
            Some("ap-2"),
        )
    };
    let (status, second) = call_second().await;
    assert_eq!(status, 202, "{second}");
    let requested = alerts.wait_for(2).await;
    assert_eq!(requested[0].json()["type"], "approval.requested");
    assert!(w.rx.received().is_empty(), "nothing is sent before approval");
    // Another agent asking to wait for this pending call is told at once that there is none:
    // how long the answer takes says nothing about other agents' calls.
    let peer = agent_token(&w.app, "agt_peer", &["billing"], &["invoke:*"]).await;
    let asked = w
        .app
        .as_key(
            &peer,
            Method::GET,
            &format!(
                "/v1/invocations/{}?wait=30s",
                first["invocation_id"].as_str().unwrap()
            ),
        )
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .expect("answered without waiting out the 30 s");
    assert_eq!(asked.status(), 404);

    let (_, pending) = w
        .app
        .call(Method::GET, "/v1/approvals?status=pending", None)
        .await;
    let approvals: Vec<Value> = pending["data"].as_array().unwrap().clone();
    assert_eq!(approvals.len(), 2);
    let for_first = approvals
        .iter()
        .find(|a| a["invocation_id"] == first["invocation_id"])
        .unwrap();
    let for_second = approvals
        .iter()
        .find(|a| a["invocation_id"] == second["invocation_id"])
        .unwrap();

    let viewer = w.app.key_with_role("viewer").await;
    let approver = w.app.key_with_role("approver").await;
    let approve_path = format!("/v1/approvals/{}/approve", for_first["id"].as_str().unwrap());
    assert_eq!(
        w.app.call_as(&viewer, Method::POST, &approve_path, None).await.0,
        403
    );
    let (status, decided) = w
        .app
        .call_as(
            &approver,
            Method::POST,
            &approve_path,
            Some(json!({"comment": "checked"})),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["comment"], "checked");
    // Who decided: the key (`key:<id>`), and its name for people to read.
    assert!(
        decided["decided_by"]
            .as_str()
            .is_some_and(|by| by.starts_with("key:key_")),
        "{decided}"
    );
    assert_eq!(decided["decided_by_name"], "approver", "{decided}");
    let sent = w.rx.wait_for(1).await;
    assert_eq!(sent[0].json()["id"], first["invocation_id"]);
    let (status, again) = w.app.call(Method::POST, &approve_path, None).await;
    assert_error((status, &again), 409, "already_decided", "already approved");
    // Deny has no early check: a late deny is the decision that loses at the UPDATE, and the
    // conflict names the decision that won.
    let late_deny = format!("/v1/approvals/{}/deny", for_first["id"].as_str().unwrap());
    let (status, lost) = w.app.call(Method::POST, &late_deny, None).await;
    assert_eq!((status, error_code(&lost)), (409, "already_decided"), "{lost}");
    assert!(
        lost["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already approved"),
        "{lost}"
    );
    let id = first["invocation_id"].as_str().unwrap();
    let (_, settled) = w
        .app
        .call(Method::GET, &format!("/v1/invocations/{id}?wait=30s"), None)
        .await;
    assert_eq!(settled["status"], "succeeded", "{settled}");

    let deny_path = format!("/v1/approvals/{}/deny", for_second["id"].as_str().unwrap());
    let (status, _) = w
        .app
        .call(Method::POST, &deny_path, Some(json!({"comment": "not today"})))
        .await;
    assert_eq!(status, 200);
    let id = second["invocation_id"].as_str().unwrap();
    let (_, denied) = w
        .app
        .call(Method::GET, &format!("/v1/invocations/{id}"), None)
        .await;
    assert_eq!(denied["status"], "denied");
    assert!(denied["error"]["message"].as_str().unwrap().contains("not today"));
    // Its key now answers with the denial, as the contract's error.
    let (status, replayed) = call_second().await;
    assert_error((status, &replayed), 403, "approval_denied", "not today");
    assert_eq!(replayed["error"]["details"], json!([{"invocation_id": id}]));
    // Through MCP, the same key is a tool error that says why.
    let body = mcp_call(&w.app, &billing, "refund_with_approval", refund_args(), "ap-2").await;
    assert_eq!(body["result"]["isError"], true, "{body}");
    let text = body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("not today"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.rx.received().len(), 1, "a denied call is never sent");
    let (_, other) = w.app.new_tenant("globex").await;
    assert_eq!(
        w.app.call_as(&other, Method::POST, &approve_path, None).await.0,
        404
    );

    // A call waiting while its action is disabled, then deleted, cannot be approved into a
    // delivery; it can still be denied.
    let (status, third) = invoke(
        &w.app,
        &billing,
        "refund_with_approval",
        refund_args(),
        Some("ap-3"),
    )
    .await;
    assert_eq!(status, 202, "{third}");
    let (_, pending) = w
        .app
        .call(Method::GET, "/v1/approvals?status=pending", None)
        .await;
    let approval_id = pending["data"][0]["id"].as_str().unwrap().to_string();
    let approve_path = format!("/v1/approvals/{approval_id}/approve");
    let (_, mut declared) = w
        .app
        .call(Method::GET, "/v1/actions/refund_with_approval", None)
        .await;
    declared["enabled"] = json!(false);
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_with_approval", Some(declared))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = w.app.call(Method::POST, &approve_path, None).await;
    assert_eq!((status, error_code(&body)), (409, "action_unavailable"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("disabled"),
        "{body}"
    );
    let (status, _) = w
        .app
        .call(Method::DELETE, "/v1/actions/refund_with_approval", None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = w.app.call(Method::POST, &approve_path, None).await;
    assert_eq!((status, error_code(&body)), (409, "action_unavailable"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("deleted"),
        "{body}"
    );
    let (status, body) = w
        .app
        .call(Method::POST, &format!("/v1/approvals/{approval_id}/deny"), None)
        .await;
    assert_eq!(status, 200, "{body}");

    // Deleted and declared again under the same name, it is another action: a call made
    // against the deleted one cannot be approved into it.
    assert_eq!(declare().await.0, 201);
    // Makes a call that waits for approval; answers its approval's id.
    let pending_call = |token: String, key: &'static str| {
        let app = &w.app;
        async move {
            let (status, call) = invoke(app, &token, "refund_with_approval", refund_args(), Some(key)).await;
            assert_eq!(status, 202, "{call}");
            let (_, pending) = app.call(Method::GET, "/v1/approvals?status=pending", None).await;
            let data = pending["data"].as_array().unwrap();
            let found = data.iter().find(|a| a["invocation_id"] == call["invocation_id"]);
            found.unwrap()["id"].as_str().unwrap().to_string()
        }
    };
    let fourth_approval = pending_call(billing.clone(), "ap-4").await;
    assert_eq!(
        w.app
            .call(Method::DELETE, "/v1/actions/refund_with_approval", None)
            .await
            .0,
        204
    );
    assert_eq!(declare().await.0, 201);
    let (status, body) = w
        .app
        .call(
            Method::POST,
            &format!("/v1/approvals/{fourth_approval}/approve"),
            None,
        )
        .await;
    assert_error((status, &body), 409, "action_unavailable", "declared again");

    // Nor is a call of an agent revoked since it was made; a decision's comment has a limit.
    let revoked = agent_token(&w.app, "agt_gone", &["billing"], &["invoke:*"]).await;
    let fifth_approval = pending_call(revoked, "ap-5").await;
    assert_eq!(
        w.app.call(Method::DELETE, "/v1/agents/agt_gone", None).await.0,
        204
    );
    let fifth_path = format!("/v1/approvals/{fifth_approval}");
    let (status, body) = w
        .app
        .call(Method::POST, &format!("{fifth_path}/approve"), None)
        .await;
    assert_error((status, &body), 409, "agent_revoked", "agt_gone");
    let long = json!({"comment": "x".repeat(2001)});
    let (status, body) = w
        .app
        .call(Method::POST, &format!("{fifth_path}/deny"), Some(long))
        .await;
    assert_error((status, &body), 422, "validation_failed", "");
    assert_eq!(body["error"]["details"][0]["path"], "/comment", "{body}");

    // Nor one made with a token revoked since, nor one the policy has come to deny.
    agent_token(&w.app, "agt_tok", &["billing"], &["invoke:*"]).await;
    let (_, minted) = w
        .app
        .call(
            Method::POST,
            "/v1/agents/agt_tok/tokens",
            Some(json!({"scopes": ["invoke:*"], "ttl_seconds": 3600})),
        )
        .await;
    let sixth_approval = pending_call(minted["token"].as_str().unwrap().to_string(), "ap-6").await;
    let revoke = format!("/v1/agents/agt_tok/tokens/{}", minted["jti"].as_str().unwrap());
    assert_eq!(w.app.call(Method::DELETE, &revoke, None).await.0, 204);
    let (status, body) = w
        .app
        .call(
            Method::POST,
            &format!("/v1/approvals/{sixth_approval}/approve"),
            None,
        )
        .await;
    assert_error((status, &body), 409, "token_revoked", "revoked");
    let denied_later = agent_token(&w.app, "agt_pol", &["billing"], &["invoke:*"]).await;
    let seventh_approval = pending_call(denied_later, "ap-7").await;
    let deny =
        json!({"rows": [{"subject": "agent:agt_pol", "object": "*", "act": "invoke", "effect": "deny"}]});
    assert_eq!(w.app.call(Method::PUT, "/v1/policies", Some(deny)).await.0, 200);
    let (status, body) = w
        .app
        .call(
            Method::POST,
            &format!("/v1/approvals/{seventh_approval}/approve"),
            None,
        )
        .await;
    assert_error((status, &body), 409, "role_denied", "no longer allows");

    for decided in [
        &fourth_approval,
        &fifth_approval,
        &sixth_approval,
        &seventh_approval,
    ] {
        let (status, body) = w
            .app
            .call(Method::POST, &format!("/v1/approvals/{decided}/deny"), None)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        w.rx.received().len(),
        1,
        "only the first, approved call was ever sent"
    );
}

dual!(guards_allow_deny_or_hold_calls);

async fn guards_allow_deny_or_hold_calls(backend: Backend) {
    let w = world(backend).await;
    let (_, mut refund) = w.app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    refund["guards"] = json!([
        {"if": {"field": "arguments.amount", "op": "gt", "value": 100000}, "then": "deny", "reason": "refunds over 1,000 need finance"},
        {"if": {"all": [{"field": "arguments.amount", "op": "gt", "value": 50000},
                        {"not": {"field": "agent.roles", "op": "contains", "value": "senior"}}]}, "then": "require_approval",
         "reason": "large refunds by juniors"}
    ]);
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(refund.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    // Guards are checked like rule conditions: an empty group or a missing value is refused.
    let mut malformed = refund.clone();
    malformed["guards"] = json!([
        {"if": {"any": []}, "then": "allow"},
        {"if": {"field": "arguments.amount", "op": "gt"}, "then": "deny", "reason": 5}
    ]);
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(malformed))
        .await;
    assert_eq!((status, error_code(&body)), (422, "validation_failed"), "{body}");
    let paths = details(&body, "path");
    assert!(paths.iter().any(|p| p.starts_with("/guards/0/if")), "{body}");
    assert!(paths.iter().any(|p| p.starts_with("/guards/1")), "{body}");
    let billing = agent_token(&w.app, "agt_g", &["billing"], &["invoke:*"]).await;
    let with_amount = |n: i64| {
        let mut a = refund_args();
        a["amount"] = n.into();
        a
    };
    let (status, body) = invoke(
        &w.app,
        &billing,
        "refund_invoice",
        with_amount(200_000),
        Some("g1"),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "guard_denied");
    assert!(body["error"]["message"].as_str().unwrap().contains("finance"));
    let (status, body) = invoke(
        &w.app,
        &billing,
        "refund_invoice",
        with_amount(60_000),
        Some("g2"),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("pending_approval")),
        "{body}"
    );
    // The approval says which guard held the call.
    let (_, pending) = w
        .app
        .call(Method::GET, "/v1/approvals?status=pending", None)
        .await;
    assert_eq!(pending["data"][0]["invocation_id"], body["invocation_id"]);
    assert_eq!(
        pending["data"][0]["reason"], "large refunds by juniors",
        "{pending}"
    );
    // A used key with arguments a guard denies is a conflict with the first call, not a denial.
    let (status, body) = invoke(
        &w.app,
        &billing,
        "refund_invoice",
        with_amount(200_000),
        Some("g2"),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "idempotency_conflict"),
        "{body}"
    );
    let (status, body) = invoke(&w.app, &billing, "refund_invoice", with_amount(1_500), Some("g3")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    let senior = agent_token(&w.app, "agt_s2", &["billing", "senior"], &["invoke:*"]).await;
    let (status, _) = invoke(&w.app, &senior, "refund_invoice", with_amount(60_000), Some("g4")).await;
    assert_eq!(status, 200, "seniors skip the approval guard");

    refund["guards"] =
        json!([{"if": {"field": "arguments.amount", "op": "matches", "value": "("}, "then": "maybe"}]);
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(refund))
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["details"].to_string().contains("/guards/0/then"),
        "{body}"
    );

    // Guards stored before they were checked, that no longer compile (a broken regex), refuse
    // the call: a guard that cannot be evaluated must not let it through.
    let db = opsiq::db::Database::connect(&w.app.database_url).await.unwrap();
    let (declaration,): (String,) = db
        .fetch_optional(
            "SELECT declaration FROM actions WHERE tenant_id = $1 AND name = 'refund_invoice'",
            opsiq::args![&w.app.tenant_id],
        )
        .await
        .unwrap()
        .unwrap();
    let mut declaration: Value = serde_json::from_str(&declaration).unwrap();
    declaration["guards"] =
        json!([{"if": {"field": "arguments.reason", "op": "matches", "value": "("}, "then": "deny"}]);
    let edited = db
        .execute(
            // A version of its own: a stored version's guards are compiled once and kept.
            "UPDATE actions SET declaration = $1, version = version + 1 \
             WHERE tenant_id = $2 AND name = 'refund_invoice'",
            opsiq::args![declaration.to_string(), &w.app.tenant_id],
        )
        .await
        .unwrap();
    db.close().await;
    assert_eq!(edited, 1);
    let mut n = 0;
    wait_until(Duration::from_secs(30), || {
        n += 1;
        let (app, senior, key) = (&w.app, senior.clone(), format!("g-broken-{n}"));
        async move {
            let (status, body) = invoke(app, &senior, "refund_invoice", refund_args(), Some(&key)).await;
            status == 500 && error_code(&body) == "internal_error"
        }
    })
    .await;
}

dual!(policy_saves_never_mix_or_overwrite_unseen_changes);

async fn policy_saves_never_mix_or_overwrite_unseen_changes(backend: Backend) {
    let app = TestApp::start(backend).await;
    let rows_for = |role: &str| {
        json!({"rows": [{"subject": format!("role:{role}"), "object": "*", "effect": "allow"},
                        {"subject": format!("role:{role}"), "object": "wire_*", "effect": "deny"}]})
    };
    let put = |body: Value, if_match: Option<&str>| {
        let req = app
            .as_key(&app.admin_key, Method::PUT, "/v1/policies")
            .json(&body);
        match if_match {
            Some(tag) => req.header("if-match", tag),
            None => req,
        }
    };
    let read_policy = || async {
        let resp = app
            .as_key(&app.admin_key, Method::GET, "/v1/policies")
            .send()
            .await
            .unwrap();
        let tag = resp.headers()["etag"].to_str().unwrap().to_string();
        (tag, read(resp).await.1)
    };

    // Eight saves at once: one of them stands, whole; rows of two are never mixed.
    let roles: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    assert_eq!(
        at_once(roles.iter().map(|r| put(rows_for(r), None))).await,
        vec![200; 8]
    );
    let (tag, policy) = read_policy().await;
    let subjects: Vec<&str> = policy["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects.len(), 2, "{policy}");
    assert_eq!(subjects[0], subjects[1], "{policy}");

    // With the ETag a read gave: the first save applies, a second one made from the same read
    // is refused and changes nothing, and of eight made from one read exactly one applies.
    let resp = put(rows_for("first"), Some(&tag)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let new_tag = resp.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(new_tag, tag);
    let (status, body) = read(put(rows_for("second"), Some(&tag)).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (412, "version_mismatch"), "{body}");
    let (current, policy) = read_policy().await;
    assert_eq!(current, new_tag);
    assert_eq!(policy["rows"][0]["subject"], "role:first");
    let mut expected = vec![412; 8];
    expected[0] = 200;
    assert_eq!(
        at_once(roles.iter().map(|r| put(rows_for(r), Some(&current)))).await,
        expected
    );
    let (status, body) = read(put(rows_for("weak"), Some("W/\"abc\"")).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_if_match"), "{body}");
}

dual!(invocations_raise_action_events_and_can_be_previewed);

async fn invocations_raise_action_events_and_can_be_previewed(backend: Backend) {
    let w = world(backend).await;
    let watcher = Receiver::start().await;
    crate::delivery::endpoint(
        &w.app,
        &watcher.url("/audit"),
        json!({"event_types": ["action.*"]}),
    )
    .await;
    let billing = agent_token(&w.app, "agt_ev", &["billing"], &["invoke:*"]).await;
    let (_, body) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("ev-1")).await;
    // Two independent deliveries: webhooks promise no order, so find each by its type.
    let got = watcher.wait_for(2).await;
    let of_type = |t: &str| {
        got.iter()
            .map(|r| r.json())
            .find(|e| e["type"] == t)
            .unwrap_or_else(|| panic!("no {t} event"))
    };
    assert_eq!(
        of_type("action.invoked")["data"]["invocation_id"],
        body["invocation_id"]
    );
    assert_eq!(
        of_type("action.succeeded")["data"]["invocation_id"],
        body["invocation_id"]
    );
    assert_eq!(of_type("action.succeeded")["data"]["action"], "refund_invoice");

    // The exact signed request an action's endpoint would get, without sending it.
    let (status, preview) = w
        .app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"action": {"name": "refund_invoice", "arguments": refund_args()}})),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["headers"]["x-opsiq-action"], "refund_invoice");
    let sent: Value = serde_json::from_str(preview["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["arguments"], refund_args());
    // As a call would send it: a whole number spelled as a float is the integer.
    let mut respelled = refund_args();
    respelled["amount"] = serde_json::from_str("1.5e3").unwrap();
    let (status, preview) = w
        .app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"action": {"name": "refund_invoice", "arguments": respelled}})),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    assert!(
        preview["body"].as_str().unwrap().contains(r#""amount":1500,"#),
        "{preview}"
    );
    let mut bad = refund_args();
    bad["amount"] = json!("x");
    let (status, refused) = w
        .app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"action": {"name": "refund_invoice", "arguments": bad}})),
        )
        .await;
    // Pointed at where they are in this body.
    assert_eq!(status, 422);
    assert_eq!(
        details(&refused, "path"),
        ["/action/arguments/amount"],
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.rx.received().len(), 1, "the preview sent nothing");
}

dual!(overload_is_refused_at_once_not_queued);

async fn overload_is_refused_at_once_not_queued(backend: Backend) {
    let w = world_with(backend, |raw, _| raw.max_requests_in_flight = 1).await;
    // An endpoint that accepts connections and never answers keeps a sync call in progress.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hold", silent.local_addr().unwrap());
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    let (ep, _) = endpoint(&w.app, &silent_url, json!({"event_types": ["none.*"]})).await;
    let (_, mut action) = w.app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    action["endpoint_id"] = ep.into();
    action["timeout_ms"] = 5000.into();
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(action))
        .await;
    assert_eq!(status, 200, "{body}");
    let billing = agent_token(&w.app, "agt_busy", &["billing"], &["invoke:*"]).await;
    let call = spawn_refund(&w.app, &billing, "busy-1");

    // Once its request reached the endpoint the call is waiting for the answer, holding the only
    // slot: another request is refused at once; health checks still answer.
    tokio::time::timeout(Duration::from_secs(30), accepted.recv())
        .await
        .expect("the action request reached the silent endpoint");
    let refused = w.app.admin(Method::GET, "/v1/actions").send().await.unwrap();
    let retry_after = refused.headers().get("retry-after").cloned();
    let (status, refused) = read(refused).await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(error_code(&refused), "overloaded");
    assert_eq!(
        retry_after.as_ref().map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "a 503 says when to retry"
    );
    let health = w.app.http.get(w.app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // The waiting call ends (202: still delivering) and frees its slot.
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, _) = w.app.call(Method::GET, "/v1/actions", None).await;
    assert_eq!(status, 200);
}

/// A call whose action's endpoint is disabled cannot be delivered: an agent's call is refused
/// at once (409, a tool error over MCP) and a rule's call is recorded as failed, nothing sent,
/// as its dry run says; once the endpoint is enabled again, calls go through.
async fn calls_to_a_disabled_endpoint_are_refused_at_once(backend: Backend) {
    let w = world(backend).await;
    let support = agent_token(&w.app, "agt_off", &["support"], &["invoke:*"]).await;
    let (_, action) = w.app.call(Method::GET, "/v1/actions/lookup_customer", None).await;
    let endpoint_path = format!("/v1/endpoints/{}", action["endpoint_id"].as_str().unwrap());
    let set_enabled = |enabled: bool| {
        let (app, path) = (&w.app, endpoint_path.clone());
        async move {
            let (status, body) = app
                .call(Method::PATCH, &path, Some(json!({"enabled": enabled})))
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    set_enabled(false).await;
    let lookup = json!({"customer_id": "c_1"});
    let (status, body) = invoke(&w.app, &support, "lookup_customer", lookup.clone(), None).await;
    assert_error((status, &body), 409, "action_unavailable", "disabled or deleted");
    let mcp = mcp_call(&w.app, &support, "lookup_customer", lookup.clone(), "off-1").await;
    assert_eq!(mcp["result"]["isError"], true, "{mcp}");
    // Both refusals are recorded, like every call.
    let (_, mine) = w
        .app
        .call_as(&support, Method::GET, "/v1/invocations", None)
        .await;
    let refused: Vec<&Value> = mine["data"].as_array().unwrap().iter().collect();
    assert_eq!(refused.len(), 2, "{mine}");
    for call in refused {
        assert_eq!(
            (&call["status"], &call["error"]["code"]),
            (&json!("failed"), &json!("action_unavailable")),
            "{call}"
        );
    }

    let rule = json!({"name": "Look up", "when": {"event_type": "lookup.go"},
        "then": [{"invoke": {"action": "lookup_customer", "arguments": {"customer_id": "c_1"}}}]});
    let (status, created) = w.app.call(Method::POST, "/v1/rules", Some(rule)).await;
    assert_eq!(status, 201, "{created}");
    let test_path = format!("/v1/rules/{}/test", created["id"].as_str().unwrap());
    let (_, run) = w
        .app
        .call(
            Method::POST,
            &test_path,
            Some(json!({"event": {"type": "lookup.go", "data": {}}})),
        )
        .await;
    assert_eq!(
        (&run["outputs"][0]["status"], &run["outputs"][0]["code"]),
        (&json!("failed"), &json!("action_unavailable")),
        "{run}"
    );
    let event_id = crate::delivery::send_event(&w.app, "lookup.go", json!({})).await;
    let (_, event) = w
        .app
        .call(Method::GET, &format!("/v1/events/{event_id}"), None)
        .await;
    let output = &event["rules"][0]["outputs"][0];
    assert_eq!(
        (&output["status"], &output["error"]["code"]),
        (&json!("failed"), &json!("action_unavailable")),
        "{event}"
    );
    let (_, recorded) = w
        .app
        .call(
            Method::GET,
            &format!("/v1/invocations/{}", output["invocation_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(recorded["status"], "failed", "{recorded}");

    set_enabled(true).await;
    let (status, body) = invoke(&w.app, &support, "lookup_customer", lookup, None).await;
    assert_eq!(status, 200, "{body}");
    let sent = w.rx.wait_for(1).await;
    assert_eq!(
        sent.len(),
        1,
        "only the call made while the endpoint was enabled was sent"
    );
    assert_eq!(sent[0].json()["action"]["name"], "lookup_customer");
}

dual!(a_call_owed_to_a_deleted_endpoint_fails_without_an_alert);

/// An agent's call owed to an endpoint that is deleted before its retry fails at once, settling
/// the invocation as failed, and raises no `delivery.failed` alert: whoever deleted the endpoint
/// gave up what it owed.
async fn a_call_owed_to_a_deleted_endpoint_fails_without_an_alert(backend: Backend) {
    // A retry an hour away: only the deletion can make the call fail within the test.
    let w = world_with(backend, |raw, _| raw.retry_schedule = "1h".into()).await;
    let failing = Receiver::start().await;
    failing.always(500);
    let (ep, _) = endpoint(&w.app, &failing.url("/down"), json!({"event_types": ["none.*"]})).await;
    let (_, mut refund) = w.app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    refund["endpoint_id"] = ep.clone().into();
    refund["mode"] = "async".into();
    let (status, body) = w
        .app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(refund))
        .await;
    assert_eq!(status, 200, "{body}");
    let billing = agent_token(&w.app, "agt_del", &["billing"], &["invoke:*"]).await;
    let (status, call) = invoke(&w.app, &billing, "refund_invoice", refund_args(), Some("del-1")).await;
    assert_eq!(status, 202, "{call}");
    let record = format!("/v1/invocations/{}", call["invocation_id"].as_str().unwrap());
    // The first attempt failed and the retry waits: then the endpoint goes.
    wait_until(Duration::from_secs(30), || async {
        let delivery = w
            .app
            .call(Method::GET, "/v1/deliveries?status=pending", None)
            .await
            .1;
        delivery["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["endpoint_id"] == ep.as_str()))
    })
    .await;
    let status = w
        .app
        .admin(Method::DELETE, &format!("/v1/endpoints/{ep}"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    let settled = crate::harness::eventually(Duration::from_secs(30), || async {
        let record = w.app.call(Method::GET, &record, None).await.1;
        (record["status"] == "failed").then_some(record)
    })
    .await;
    assert!(
        settled["error"].to_string().contains("deleted"),
        "the invocation says why: {settled}"
    );
    let (_, alerts) = w
        .app
        .call(Method::GET, "/v1/events?type=delivery.failed", None)
        .await;
    assert_eq!(alerts["data"].as_array().unwrap().len(), 0, "{alerts}");
    let (_, failed) = w
        .app
        .call(Method::GET, "/v1/events?type=action.failed", None)
        .await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 1, "{failed}");
    assert_eq!(failing.received().len(), 1, "nothing was sent after the deletion");
}

/// A call made before its action was deleted is still answered as its key says: the same call
/// gets the record as it stands, other arguments a 409; a new key finds no action (404).
async fn a_used_key_outlives_its_deleted_action(backend: Backend) {
    let w = world(backend).await;
    let support = agent_token(&w.app, "agt_del", &["support"], &["invoke:*"]).await;
    let lookup = json!({"customer_id": "c_del"});
    let (status, first) = invoke(&w.app, &support, "lookup_customer", lookup.clone(), Some("k-del")).await;
    assert_eq!(status, 200, "{first}");
    let (status, body) = w
        .app
        .call(Method::DELETE, "/v1/actions/lookup_customer", None)
        .await;
    assert!(status == 200 || status == 204, "{status} {body}");

    let (status, again) = invoke(&w.app, &support, "lookup_customer", lookup.clone(), Some("k-del")).await;
    assert_eq!(
        (status, &again["invocation_id"], &again["status"]),
        (200, &first["invocation_id"], &json!("succeeded")),
        "{again}"
    );
    assert_eq!(again["result"], first["result"]);
    // The same agent's token whose scopes do not cover the action is not answered by the key.
    let (status, narrow) = w
        .app
        .call(
            Method::POST,
            "/v1/agents/agt_del/tokens",
            Some(json!({"scopes": ["invoke:refund_*"], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{narrow}");
    let narrow = narrow["token"].as_str().unwrap();
    let (status, body) = invoke(&w.app, narrow, "lookup_customer", lookup.clone(), Some("k-del")).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    let (status, body) = invoke(
        &w.app,
        &support,
        "lookup_customer",
        json!({"customer_id": "c_other"}),
        Some("k-del"),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "idempotency_conflict"),
        "{body}"
    );
    let (status, body) = invoke(&w.app, &support, "lookup_customer", lookup, Some("k-new")).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    assert_eq!(w.rx.received().len(), 1, "one delivery in all");
}
