//! Several `opsiq serve` processes on one PostgreSQL: a change made through one replica is seen
//! by the others at once, not when their caches expire.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Backend, http_client, read, wait_until};
use crate::process;
use crate::receiver::Receiver;

/// Both replicas keep cached configuration for an hour: only the change feed can refresh it.
fn long_caches(cmd: &mut tokio::process::Command) {
    cmd.env("OPSIQ_CACHE_TTL", "1h");
}

/// A fresh PostgreSQL database for test `name`, initialised by `opsiq init`: its directory,
/// URL and owner key (`None`: PostgreSQL is not configured, and the test is skipped).
async fn initialised_database(name: &str) -> Option<(tempfile::TempDir, String, String)> {
    let backend = Backend::postgres(name)?;
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    Some((dir, url, key))
}

async fn call(base: &str, key: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http_client()
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    read(req.send().await.unwrap()).await
}

/// Declares `action`, lets the role `support` invoke anything, and makes an agent `agent_id`
/// with that role; answers its token (scope `invoke:*`).
pub(crate) async fn action_and_agent(base: &str, key: &str, action: Value, agent_id: &str) -> String {
    let (status, body) = call(base, key, Method::POST, "/v1/actions", Some(action)).await;
    assert_eq!(status, 201, "{body}");
    let rows =
        json!({"rows": [{"subject": "role:support", "object": "*", "act": "invoke", "effect": "allow"}]});
    let (status, body) = call(base, key, Method::PUT, "/v1/policies", Some(rows)).await;
    assert_eq!(status, 200, "{body}");
    let agent = json!({"id": agent_id, "name": agent_id, "roles": ["support"]});
    let (status, body) = call(base, key, Method::POST, "/v1/agents", Some(agent)).await;
    assert_eq!(status, 201, "{body}");
    let (status, token) = call(
        base,
        key,
        Method::POST,
        &format!("/v1/agents/{agent_id}/tokens"),
        Some(json!({"scopes": ["invoke:*"], "ttl_seconds": 600})),
    )
    .await;
    assert_eq!(status, 201, "{token}");
    token["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_through_one_replica_reach_the_others_at_once() {
    let Some((dir, url, key)) =
        initialised_database("changes_made_through_one_replica_reach_the_others_at_once").await
    else {
        return;
    };
    let rx = Receiver::start().await;
    let a = process::serve_with(dir.path(), &url, &["--dev"], long_caches).await;
    let b = process::serve_with(dir.path(), &url, &["--dev"], long_caches).await;
    let deadline = Duration::from_secs(30);

    // Endpoints: B caches who subscribes to an event; an endpoint added through A is sent
    // B's next events.
    let (status, first) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/first")})),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let send = |n: usize| {
        let (base, key) = (b.base.clone(), key.clone());
        async move {
            let body = json!({"type": "order.placed", "data": {"n": n}});
            let (status, sent) = call(&base, &key, Method::POST, "/v1/events", Some(body)).await;
            assert_eq!(status, 202, "{sent}");
        }
    };
    send(0).await;
    rx.wait_until(deadline, |r| r.iter().any(|r| r.target == "/first"))
        .await;
    let (status, second) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/second")})),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    let mut n = 1;
    wait_until(deadline, || {
        n += 1;
        let send = send(n);
        let rx = &rx;
        async move {
            send.await;
            rx.received().iter().any(|r| r.target == "/second")
        }
    })
    .await;

    // Event types: B caches a tenant's custom types; one declared through A (with a schema
    // `order.placed` events must now meet) is checked by B.
    let declared = json!({"name": "order.placed", "description": "An order was placed",
        "schema": {"type": "object", "required": ["order_id"]}});
    let (status, body) = call(&a.base, &key, Method::POST, "/v1/event-types", Some(declared)).await;
    assert_eq!(status, 201, "{body}");
    wait_until(deadline, || async {
        let body = json!({"type": "order.placed", "data": {"n": 0}});
        call(&b.base, &key, Method::POST, "/v1/events", Some(body))
            .await
            .0
            == 422
    })
    .await;

    // A changed event type: its schema removed through A, B takes such events free-form again.
    let (status, body) = call(
        &a.base,
        &key,
        Method::PATCH,
        "/v1/event-types/order.placed",
        Some(json!({"schema": null})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_until(deadline, || async {
        let body = json!({"type": "order.placed", "data": {"n": 0}});
        call(&b.base, &key, Method::POST, "/v1/events", Some(body))
            .await
            .0
            == 202
    })
    .await;

    // Actions: B caches an action's declaration for its agents' calls; one disabled through A
    // is refused by B.
    let declaration = json!({
        "name": "look_up",
        "description": "Look something up.",
        "input_schema": {"type": "object"},
        "endpoint_id": second["id"],
        "mode": "async",
        "annotations": {"read_only": true},
    });
    let (status, body) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/actions",
        Some(declaration.clone()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let rows = json!({"rows": [{"subject": "role:ops", "object": "*", "act": "invoke", "effect": "allow"}]});
    assert_eq!(
        call(&a.base, &key, Method::PUT, "/v1/policies", Some(rows))
            .await
            .0,
        200
    );
    let agent = json!({"id": "agt_r", "name": "r", "roles": ["ops"]});
    assert_eq!(
        call(&a.base, &key, Method::POST, "/v1/agents", Some(agent))
            .await
            .0,
        201
    );
    let (_, minted) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/agents/agt_r/tokens",
        Some(json!({"scopes": ["invoke:*"]})),
    )
    .await;
    let token = minted["token"].as_str().unwrap().to_string();
    let invoke = || {
        let (base, token) = (b.base.clone(), token.clone());
        async move {
            call(
                &base,
                &token,
                Method::POST,
                "/v1/actions/look_up/invoke",
                Some(json!({"arguments": {}})),
            )
            .await
        }
    };
    let (status, body) = invoke().await;
    assert_eq!(status, 202, "{body}");
    let mut disabled = declaration.clone();
    disabled["enabled"] = json!(false);
    assert_eq!(
        call(&a.base, &key, Method::PUT, "/v1/actions/look_up", Some(disabled))
            .await
            .0,
        200
    );
    wait_until(deadline, || async { invoke().await.0 == 404 }).await;

    // API keys: B caches a key it has seen; one revoked through A stops working on B.
    let (_, viewer) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/api-keys",
        Some(json!({"name": "v", "role": "viewer"})),
    )
    .await;
    let viewer_key = viewer["key"].as_str().unwrap().to_string();
    assert_eq!(
        call(&b.base, &viewer_key, Method::GET, "/v1/rules", None).await.0,
        200
    );
    let path = format!("/v1/api-keys/{}", viewer["id"].as_str().unwrap());
    assert_eq!(call(&a.base, &key, Method::DELETE, &path, None).await.0, 204);
    wait_until(deadline, || async {
        call(&b.base, &viewer_key, Method::GET, "/v1/rules", None).await.0 == 401
    })
    .await;

    // An external issuer: B caches its JWKS document; the issuer saved again through A (its
    // identity provider rotated the key) makes B fetch the document anew.
    let keys_dir = tempfile::tempdir().unwrap();
    const TEST: &str = "changes_made_through_one_replica_reach_the_others_at_once";
    let (Some((old_key, _)), Some((new_key, _))) = (
        crate::gateway::ec_key_pair(TEST, keys_dir.path(), "old"),
        crate::gateway::ec_key_pair(TEST, keys_dir.path(), "new"),
    ) else {
        return;
    };
    let idp = crate::gateway::Idp::serving(&old_key).await;
    let issuer = json!({"issuer": crate::gateway::IDP_ISSUER, "audience": "opsiq-replicas",
                        "jwks_url": idp.jwks_url()});
    let (status, body) = call(
        &a.base,
        &key,
        Method::PUT,
        "/v1/token-issuer",
        Some(issuer.clone()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (old_token, new_token) = (
        crate::gateway::external_token(&old_key, "opsiq-replicas"),
        crate::gateway::external_token(&new_key, "opsiq-replicas"),
    );
    assert_eq!(
        call(&b.base, &old_token, Method::GET, "/v1/tools", None).await.0,
        200
    );
    assert_eq!(
        call(&b.base, &new_token, Method::GET, "/v1/tools", None).await.0,
        401
    );
    idp.rotate_to(&new_key);
    let (status, body) = call(&a.base, &key, Method::PUT, "/v1/token-issuer", Some(issuer)).await;
    assert_eq!(status, 200, "{body}");
    wait_until(deadline, || async {
        call(&b.base, &new_token, Method::GET, "/v1/tools", None).await.0 == 200
    })
    .await;
    assert_eq!(
        call(&b.base, &old_token, Method::GET, "/v1/tools", None).await.0,
        401
    );

    a.kill_9().await;
    b.kill_9().await;
}

/// A sync call waits for its endpoint's answer even when another replica sends it: here the
/// replica taking the call sends nothing (`worker = false`), so only the record can tell it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_call_answers_when_another_replica_delivers_it() {
    let Some((dir, url, key)) =
        initialised_database("a_sync_call_answers_when_another_replica_delivers_it").await
    else {
        return;
    };
    let rx = Receiver::start().await;
    rx.answer_json(json!({"ticket_id": "tk_1"}));
    let front = process::serve_with(dir.path(), &url, &["--dev"], |cmd| {
        cmd.env("OPSIQ_WORKER", "false");
    })
    .await;
    let sender = process::serve(dir.path(), &url, &["--dev"]).await;

    let (status, endpoint) = call(
        &front.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/actions"), "event_types": ["none.*"]})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let action = json!({"name": "open_ticket", "input_schema": {"type": "object"}, "mode": "sync",
        "timeout_ms": 60_000, "endpoint_id": endpoint["id"]});
    let token = &action_and_agent(&front.base, &key, action, "agt_s").await;

    let started = std::time::Instant::now();
    let resp = http_client()
        .post(format!("{}/v1/actions/open_ticket/invoke", front.base))
        .bearer_auth(token)
        .header("Idempotency-Key", "t-1")
        .json(&json!({"arguments": {}}))
        .send()
        .await
        .unwrap();
    let (status, answer) = read(resp).await;
    let waited = started.elapsed();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("succeeded")),
        "{answer}"
    );
    assert_eq!(answer["result"], json!({"ticket_id": "tk_1"}));
    assert_eq!(rx.received().len(), 1);
    // Answered once the record said so, not when the 60-second wait ran out.
    assert!(waited < Duration::from_secs(30), "answered after {waited:?}");
    front.kill_9().await;
    sender.kill_9().await;
}

/// Replicas started together on an empty database all come up: one makes the `default`
/// workspace, the others find it made (they used to exit on the unique name they lost to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_an_empty_database_all_come_up() {
    let Some(backend) = Backend::postgres("replicas_starting_together_on_an_empty_database_all_come_up")
    else {
        return;
    };
    for _round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let url = backend.fresh_database_url(dir.path()).await;
        let (a, b, c) = tokio::join!(
            process::serve(dir.path(), &url, &[]),
            process::serve(dir.path(), &url, &[]),
            process::serve(dir.path(), &url, &[]),
        );
        for server in [&a, &b, &c] {
            let resp = http_client()
                .get(format!("{}/readyz", server.base))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let (tenants,): (i64,) = sqlx::query_as("SELECT count(*) FROM tenants WHERE name = 'default'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(tenants, 1);
        // Its audit chain starts with its creation, by the first `serve`, once.
        let first: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, actor, action FROM audit_log WHERE action = 'create tenant' ORDER BY seq",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            first,
            [(1, "cli:opsiq serve".to_string(), "create tenant".to_string())]
        );
        conn.close().await.unwrap();
        for server in [a, b, c] {
            server.kill_9().await;
        }
    }
}

/// Replicas share each rate limit's bucket: two of them allow an agent what one would, and an
/// endpoint's deliveries are spaced at its rate whichever replica sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_replicas() {
    let Some((dir, url, key)) = initialised_database("rate_limits_hold_across_replicas").await else {
        return;
    };
    let rx = Receiver::start().await;
    let one_call_a_second = |cmd: &mut tokio::process::Command| {
        cmd.env("OPSIQ_AGENT_RATE_PER_S", "1");
    };
    let a = process::serve_with(dir.path(), &url, &["--dev"], one_call_a_second).await;
    let b = process::serve_with(dir.path(), &url, &["--dev"], one_call_a_second).await;

    let (status, endpoint) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/actions"), "event_types": ["none.*"]})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let (status, limited) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/hooks"), "event_types": ["order.*"], "rate_limit_per_s": 2})),
    )
    .await;
    assert_eq!(status, 201, "{limited}");
    let action = json!({"name": "note", "input_schema": {"type": "object"}, "mode": "async",
        "endpoint_id": endpoint["id"]});
    let token = action_and_agent(&a.base, &key, action, "agt_r").await;

    // The agent's bucket holds one call and refills one a second, on both replicas together:
    // over a span of t seconds at most 1 + ⌊t⌋ calls are accepted, where each replica alone
    // would accept one more.
    let started = std::time::Instant::now();
    let mut accepted = 0;
    for n in 0..12 {
        let base = if n % 2 == 0 { &a.base } else { &b.base };
        let resp = http_client()
            .post(format!("{base}/v1/actions/note/invoke"))
            .bearer_auth(&token)
            .header("Idempotency-Key", format!("note-{n}"))
            .json(&json!({"arguments": {"n": n}}))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 | 202 => accepted += 1,
            429 => {
                let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok());
                assert!(matches!(retry_after, Some("1" | "2")), "{retry_after:?}");
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    }
    let span = started.elapsed().as_secs();
    assert!(accepted >= 1, "nothing accepted");
    assert!(
        accepted <= 1 + span,
        "{accepted} calls accepted in {span} whole seconds by two replicas sharing one a second"
    );

    // The endpoint takes two requests a second (bursts of one): eight events sent through
    // both replicas (each hands its own events to its own worker) arrive over at least 3.5
    // seconds, where each replica on its own would send its four in 1.5.
    for n in 0..8 {
        let base = if n % 2 == 0 { &a.base } else { &b.base };
        let body = json!({"type": "order.placed", "data": {"n": n}});
        let (status, sent) = call(base, &key, Method::POST, "/v1/events", Some(body)).await;
        assert_eq!(status, 202, "{sent}");
    }
    rx.wait_until(Duration::from_secs(60), |r| {
        r.iter().filter(|r| r.target == "/hooks").count() >= 8
    })
    .await;
    let arrivals: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.target == "/hooks")
        .map(|r| r.at)
        .collect();
    let first = arrivals.iter().min().unwrap();
    let last = arrivals.iter().max().unwrap();
    // 3.5 s, less what the first request's own trip may have taken longer than the last's.
    assert!(
        *last - *first >= Duration::from_secs(3),
        "eight deliveries at two a second arrived within {:?}",
        *last - *first
    );

    // Retention drops buckets idle for an hour (full again, as a missing one is), not live ones.
    let db = opsiq::db::Database::connect(&url).await.unwrap();
    db.execute(
        "INSERT INTO rate_buckets (key, tokens_milli, refilled_at_us) \
         VALUES ('idle', 0, (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT - 7200000000)",
        opsiq::args![],
    )
    .await
    .unwrap();
    opsiq::delivery::retention::purge_once(&db, 0).await.unwrap();
    let keys: Vec<(String,)> = db
        .fetch_all("SELECT key FROM rate_buckets", opsiq::args![])
        .await
        .unwrap();
    assert!(!keys.iter().any(|(k,)| k == "idle"), "{keys:?}");
    assert!(keys.iter().any(|(k,)| k.starts_with("agent/")), "{keys:?}");
    assert!(keys.iter().any(|(k,)| k.starts_with("endpoint/")), "{keys:?}");
    db.close().await;

    // A bucket's row held elsewhere is a prompt 503 with Retry-After, not a wait that keeps the
    // caller (and a connection of the replica); once it is free, calls go through again.
    use sqlx::Connection;
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT key FROM rate_buckets WHERE key LIKE 'agent/%/agt_r' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let invoke_note = |n: usize| {
        let (base, token) = (a.base.clone(), token.clone());
        async move {
            let started = std::time::Instant::now();
            let resp = http_client()
                .post(format!("{base}/v1/actions/note/invoke"))
                .bearer_auth(&token)
                .header("Idempotency-Key", format!("held-{n}"))
                .json(&json!({"arguments": {}}))
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").is_some();
            (resp.status().as_u16(), retry_after, started.elapsed())
        }
    };
    let mut n = 0;
    wait_until(Duration::from_secs(30), || {
        n += 1;
        let call = invoke_note(n);
        async move {
            let (status, retry_after, took) = call.await;
            assert!(
                took < Duration::from_secs(10),
                "a call waited {took:?} for a held bucket"
            );
            assert!(matches!(status, 429 | 503), "{status}");
            assert!(retry_after, "{status} without Retry-After");
            status == 503
        }
    })
    .await;
    // Over MCP the same refusal is a tool error saying when to retry, not a protocol error.
    let mut retried = 0;
    wait_until(Duration::from_secs(30), || {
        retried += 1;
        let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "note", "arguments": {},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                          "io.modelcontextprotocol/clientCapabilities": {},
                          "io.opsiq/idempotency-key": format!("held-mcp-{retried}")}}});
        let request = http_client()
            .post(format!("{}/mcp", a.base))
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "note")
            .json(&call)
            .send();
        async move {
            let (status, body) = read(request.await.unwrap()).await;
            assert_eq!(status, 200, "{body}");
            let result = &body["result"];
            assert_eq!(result["isError"], true, "{body}");
            let text = result["content"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(text.contains("Retry after"), "{body}");
            text.contains("cannot be checked")
        }
    })
    .await;
    // Given up by the database too (lock_timeout), so no connection is left waiting for it.
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND query LIKE '%opsiq_take_tokens%'",
    )
    .fetch_one(&mut holder)
    .await
    .unwrap();
    assert_eq!(waiting, 0, "takes still waiting for the held bucket");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    // A lasting fault (the function gone) is a 500 for every caller, not a "retry shortly"
    // for all but the one that asked.
    let gone = "ALTER FUNCTION opsiq_take_tokens(text, bigint, bigint, bigint) RENAME TO opsiq_gone";
    sqlx::query(gone).execute(&mut holder).await.unwrap();
    // Once the refusal the held row left is over, a call meets the fault...
    wait_until(Duration::from_secs(30), || {
        n += 1;
        let call = invoke_note(n);
        async move { call.await.0 == 500 }
    })
    .await;
    // ...and so do those refused for a moment after it, without asking the database.
    for _ in 0..3 {
        n += 1;
        assert_eq!(invoke_note(n).await.0, 500);
    }
    let back = "ALTER FUNCTION opsiq_gone(text, bigint, bigint, bigint) RENAME TO opsiq_take_tokens";
    sqlx::query(back).execute(&mut holder).await.unwrap();
    wait_until(Duration::from_secs(30), || {
        n += 1;
        let call = invoke_note(n);
        async move { call.await.0 == 202 }
    })
    .await;
    a.kill_9().await;
    b.kill_9().await;
}

/// An endpoint's `max_in_flight` holds for all replicas together: two replicas each sending
/// their own events keep at most the cap open at the receiver at once, where each alone would
/// open the cap's worth. Slots held by a replica that died lapse, and every slot is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_in_flight_cap_holds_across_replicas() {
    let Some((dir, url, key)) =
        initialised_database("an_endpoints_in_flight_cap_holds_across_replicas").await
    else {
        return;
    };
    let rx = Receiver::start().await;
    let hold = Duration::from_secs(1);
    rx.hold(hold);
    let a = process::serve_with(dir.path(), &url, &["--dev"], |_| {}).await;
    let b = process::serve_with(dir.path(), &url, &["--dev"], |_| {}).await;
    let (status, endpoint) = call(
        &a.base,
        &key,
        Method::POST,
        "/v1/endpoints",
        Some(json!({"url": rx.url("/jobs"), "event_types": ["job.*"], "max_in_flight": 2})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let endpoint_id = endpoint["id"].as_str().unwrap();

    // A replica that died holding both slots: its slots lapse after their time, and only then
    // is the endpoint sent to.
    let db = opsiq::db::Database::connect(&url).await.unwrap();
    for slot in ["slot_dead_1", "slot_dead_2"] {
        db.execute(
            "INSERT INTO endpoint_slots (slot_id, endpoint_id, holder, expires_at_us) \
             VALUES ($1, $2, 'node_dead', (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT + 2000000)",
            opsiq::args![slot, endpoint_id],
        )
        .await
        .unwrap();
    }
    let sent_at = std::time::Instant::now();
    let first = json!({"type": "job.started", "data": {"n": 0}});
    let (status, body) = call(&a.base, &key, Method::POST, "/v1/events", Some(first)).await;
    assert_eq!(status, 202, "{body}");
    let arrived = rx.wait_for(1).await;
    assert!(
        arrived[0].at - sent_at >= Duration::from_secs(1),
        "sent {:?} after the event, while a dead replica's slots had not lapsed",
        arrived[0].at - sent_at
    );

    // Four events through each replica (each hands its own to its own worker).
    for n in 1..=8 {
        let base = if n % 2 == 0 { &a.base } else { &b.base };
        let body = json!({"type": "job.started", "data": {"n": n}});
        let (status, sent) = call(base, &key, Method::POST, "/v1/events", Some(body)).await;
        assert_eq!(status, 202, "{sent}");
    }
    // A change of the endpoint wakes the attempts waiting for a slot on both replicas to read
    // it again; what they had asked for is not left taken.
    let path = format!("/v1/endpoints/{endpoint_id}");
    let change = json!({"description": "jobs"});
    let (status, body) = call(&a.base, &key, Method::PATCH, &path, Some(change)).await;
    assert_eq!(status, 200, "{body}");
    let received = rx.wait_for(9).await;
    let mut arrivals: Vec<_> = received.iter().map(|r| r.at).collect();
    arrivals.sort();
    // A request is certainly still open `hold` after it arrived: the receiver answers only then.
    let most_open = (0..arrivals.len())
        .map(|i| {
            arrivals[..=i]
                .iter()
                .filter(|at| arrivals[i] - **at < hold)
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(
        most_open, 2,
        "{most_open} requests open at once to an endpoint capped at 2 across replicas"
    );

    // Every slot is given back once its attempt is over.
    wait_until(Duration::from_secs(30), || async {
        let held: Vec<(String,)> = db
            .fetch_all("SELECT slot_id FROM endpoint_slots", opsiq::args![])
            .await
            .unwrap();
        held.is_empty()
    })
    .await;

    // Retention drops lapsed slots of endpoints nobody sends to any more, not live ones.
    for (slot, lifetime_us) in [("slot_lapsed", -1_000_000i64), ("slot_live", 60_000_000)] {
        db.execute(
            "INSERT INTO endpoint_slots (slot_id, endpoint_id, holder, expires_at_us) \
             VALUES ($1, 'ep_gone', 'node_gone', (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT + $2)",
            opsiq::args![slot, lifetime_us],
        )
        .await
        .unwrap();
    }
    opsiq::delivery::retention::purge_once(&db, 0).await.unwrap();
    let left: Vec<(String,)> = db
        .fetch_all("SELECT slot_id FROM endpoint_slots", opsiq::args![])
        .await
        .unwrap();
    assert_eq!(left, vec![("slot_live".to_string(),)]);
    db.close().await;
    a.kill_9().await;
    b.kill_9().await;
}
