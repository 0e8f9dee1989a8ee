//! The MCP server with the official SDKs as clients (Python `mcp` in both protocol eras,
//! TypeScript `@modelcontextprotocol/sdk`), plus the transport rules checked on the wire.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::dual;
use crate::gateway::{World, agent_token, world, world_with};
use crate::harness::{Backend, TestApp, read, repo_path, skip_or_fail};

async fn python_client(app: &TestApp, token: &str, mode: &str, tool: &str, args: Value) -> Option<Value> {
    let Some(python) = crate::external::python() else {
        skip_or_fail(
            "MCP Python SDK client",
            "run .ci/setup-external to install the mcp package",
        );
        return None;
    };
    let out = tokio::process::Command::new(python)
        .arg(repo_path("tests/mcp/client.py"))
        .arg(app.url("/mcp"))
        .args([
            "--token",
            token,
            "--mode",
            mode,
            "--tool",
            tool,
            "--args",
            &args.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python MCP client ({mode}) failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("client prints JSON"))
}

async fn typescript_client(app: &TestApp, token: &str, tool: &str, args: Value) -> Option<Value> {
    if !repo_path("tests/mcp/node_modules/@modelcontextprotocol/sdk").exists() {
        skip_or_fail(
            "MCP TypeScript SDK client",
            "run .ci/setup-external to install the npm package",
        );
        return None;
    }
    let out = tokio::process::Command::new("node")
        .arg(repo_path("tests/mcp/client.mjs"))
        .args([app.url("/mcp").as_str(), token, tool, &args.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "TypeScript MCP client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("client prints JSON"))
}

fn tool_names(out: &Value) -> Vec<String> {
    let mut names: Vec<String> = out["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

dual!(
    official_sdks_in_both_eras,
    mcp_wire_rules,
    sessions_are_shared_by_replicas
);

async fn official_sdks_in_both_eras(backend: Backend) {
    let World { app, rx } = world(backend).await;
    let support = agent_token(&app, "agt_mcp", &["support"], &["invoke:*"]).await;
    let expected = vec![
        "create_ticket".to_string(),
        "escalate_to_human".into(),
        "lookup_customer".into(),
    ];

    for (mode, version) in [
        ("legacy", "2025-11-25"),
        ("auto", "2026-07-28"),
        ("2026-07-28", "2026-07-28"),
    ] {
        let Some(out) = python_client(
            &app,
            &support,
            mode,
            "lookup_customer",
            json!({"customer_id": "c_77"}),
        )
        .await
        else {
            return;
        };
        assert_eq!(out["protocolVersion"], version, "{mode}: {out}");
        assert_eq!(tool_names(&out), expected, "{mode}: tools are filtered per token");
        let result = &out["call"]["result"];
        assert_eq!(result["isError"], false, "{mode}: {out}");
        assert_eq!(result["structuredContent"]["customer_id"], "c_77");
        assert_eq!(result["structuredContent"]["tier"], "enterprise");
    }
    assert_eq!(rx.received().len(), 3, "each tools/call became one delivery");

    // A schema failure comes back as a tool error the model can read.
    let bad = json!({"customer_id": "", "subject": "x", "body": "b", "priority": "whenever"});
    for mode in ["legacy", "2026-07-28"] {
        let Some(out) = python_client(&app, &support, mode, "create_ticket", bad.clone()).await else {
            return;
        };
        let result = &out["call"]["result"];
        assert_eq!(result["isError"], true, "{out}");
        let text = result["content"][0]["text"].as_str().unwrap();
        assert!(text.contains("/priority") && text.contains("/subject"), "{text}");
    }
    // Denied by role: also a readable tool error, and nothing is delivered.
    let Some(out) = python_client(&app, &support, "legacy", "refund_invoice", json!({})).await else {
        return;
    };
    assert_eq!(out["call"]["result"]["isError"], true);
    assert!(
        out["call"]["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("role_denied")
    );

    let Some(out) =
        typescript_client(&app, &support, "lookup_customer", json!({"customer_id": "c_88"})).await
    else {
        return;
    };
    assert_eq!(out["protocolVersion"], "2025-11-25");
    assert_eq!(tool_names(&out), expected);
    assert_eq!(out["call"]["result"]["structuredContent"]["customer_id"], "c_88");
    assert_eq!(rx.received().len(), 4);
}

async fn post_mcp(app: &TestApp, token: &str, headers: &[(&str, &str)], body: Value) -> reqwest::Response {
    let mut req = app
        .as_key(token, Method::POST, "/mcp")
        .header("accept", "application/json, text/event-stream")
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Reads an event stream into `seen` until it holds `what` (within 30 s), or fails.
async fn read_stream_until(seen: &mut String, stream: &mut reqwest::Response, what: &str) {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(what) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {what} on the stream: {seen}");
}

/// A stateless-era `tools/list` request.
fn stateless_tools_list() -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": meta()}})
}

fn meta() -> Value {
    json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}})
}

async fn mcp_wire_rules(backend: Backend) {
    let World { app, rx: _rx } = world_with(backend, |raw, _| {
        raw.mcp_allowed_origins = "http://console.example:8443".into();
    })
    .await;
    let token = agent_token(&app, "agt_wire", &["support"], &["invoke:*"]).await;

    let resp = app
        .http
        .post(app.url("/mcp"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));

    // Legacy: initialize makes a session; requests without it are refused.
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2024-10-07", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let resp = post_mcp(&app, &token, &[], init).await;
    assert_eq!(resp.status(), 200);
    let session = resp.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let (_, body) = read(resp).await;
    assert_eq!(body["id"], 0);
    assert_eq!(
        body["result"]["protocolVersion"], "2025-11-25",
        "unknown versions get the latest handshake one"
    );
    let legacy = |s: &'static str| vec![("mcp-protocol-version", "2025-11-25"), ("mcp-session-id", s)];
    let session_static: &'static str = Box::leak(session.clone().into_boxed_str());
    let resp = post_mcp(
        &app,
        &token,
        &legacy(session_static),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &legacy(session_static),
            json!({"jsonrpc": "2.0", "id": "p", "method": "ping"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!({})));
    // A browser page may call only from an origin the operator listed (DNS rebinding).
    let ping = json!({"jsonrpc": "2.0", "id": "o", "method": "ping"});
    for (origin, expected) in [
        ("http://evil.example", 403),
        ("null", 403),
        ("http://console.example:8443", 200),
        ("HTTP://Console.Example:8443", 200),
    ] {
        let mut headers = legacy(session_static);
        headers.push(("origin", origin));
        let resp = post_mcp(&app, &token, &headers, ping.clone()).await;
        assert_eq!(resp.status(), expected, "{origin}");
        if expected == 200 {
            let allowed = resp.headers().get("access-control-allow-origin");
            assert_eq!(allowed.unwrap(), origin, "{origin}");
            let exposed = resp.headers()["access-control-expose-headers"].to_str().unwrap();
            assert!(exposed.contains("mcp-session-id"), "{exposed}");
        }
    }
    // The listed origin's preflight is answered; another's is not allowed.
    for (origin, allowed) in [
        ("http://console.example:8443", true),
        ("http://evil.example", false),
    ] {
        let resp = app
            .http
            .request(Method::OPTIONS, app.url("/mcp"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, mcp-session-id",
            )
            .send()
            .await
            .unwrap();
        let granted = resp.headers().get("access-control-allow-origin").is_some();
        assert_eq!(granted, allowed, "{origin}: {:?}", resp.headers());
        if !allowed {
            assert_eq!(
                resp.status(),
                403,
                "an unlisted origin's preflight is refused too"
            );
        }
        if allowed {
            assert_eq!(resp.status(), 200);
            let headers = resp.headers()["access-control-allow-headers"].to_str().unwrap();
            assert!(
                headers.contains("authorization") && headers.contains("mcp-session-id"),
                "{headers}"
            );
        }
    }
    // One version header, the one the session negotiated, and text.
    let mut two = legacy(session_static);
    two.push(("mcp-protocol-version", "bogus"));
    let other = vec![
        ("mcp-protocol-version", "2025-06-18"),
        ("mcp-session-id", session_static),
    ];
    for headers in [two, other] {
        let resp = post_mcp(&app, &token, &headers, ping.clone()).await;
        assert_eq!(resp.status(), 400, "{headers:?}");
    }
    let not_text = app
        .as_key(&token, Method::POST, "/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session_static)
        .header(
            "mcp-protocol-version",
            reqwest::header::HeaderValue::from_bytes(b"2025-11-25\xe9").unwrap(),
        )
        .json(&ping)
        .send()
        .await
        .unwrap();
    assert_eq!(not_text.status(), 400);
    // A stateless request that left out its version header is told so.
    let (status, body) = read(post_mcp(&app, &token, &[], stateless_tools_list()).await).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MCP-Protocol-Version header"),
        "{body}"
    );
    let bad_meta = json!({"jsonrpc": "2.0", "id": "m", "method": "tools/call",
        "params": {"name": "lookup_customer", "arguments": {"customer_id": "c"}, "_meta": "x"}});
    let (_, body) = read(post_mcp(&app, &token, &legacy(session_static), bad_meta).await).await;
    assert_eq!(
        (&body["id"], &body["error"]["code"]),
        (&json!("m"), &json!(-32602)),
        "{body}"
    );
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &legacy(session_static),
            json!({"jsonrpc": "2.0", "id": 5, "method": "foo/bar"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_i64()), (200, Some(-32601)));
    let (status, _) = read(
        post_mcp(
            &app,
            &token,
            &[("mcp-protocol-version", "2025-11-25")],
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "missing session");
    let (status, _) = read(
        post_mcp(
            &app,
            &token,
            &legacy("nope"),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404, "unknown session");
    // Another agent cannot ride this session.
    let other = agent_token(&app, "agt_wire2", &["support"], &["invoke:*"]).await;
    let (status, _) = read(
        post_mcp(
            &app,
            &other,
            &legacy(session_static),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = read(post_mcp(&app, &token, &legacy(session_static), json!([1])).await).await;
    assert_eq!(status, 400);

    // A request on the session with a method and a version header.
    let on_session = |method: Method, version: &str| {
        app.as_key(&token, method, "/mcp")
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", version.to_string())
    };
    // The GET stream announces tool list changes.
    let mut stream = on_session(Method::GET, "2025-11-25").send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let (_, mut ticket) = app.call(Method::GET, "/v1/actions/create_ticket", None).await;
    ticket["description"] = "Open a ticket (changed)".into();
    assert_eq!(
        app.call(Method::PUT, "/v1/actions/create_ticket", Some(ticket))
            .await
            .0,
        200
    );
    let mut seen = String::new();
    read_stream_until(&mut seen, &mut stream, "notifications/tools/list_changed").await;
    drop(stream);

    // A version spoken in neither era is a 400, whatever the method.
    for method in [Method::GET, Method::DELETE] {
        let resp = on_session(method.clone(), "1999-01-01").send().await.unwrap();
        assert_eq!(resp.status(), 400, "{method}");
    }
    let resp = on_session(Method::DELETE, "2025-11-25").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _) = read(
        post_mcp(
            &app,
            &token,
            &legacy(session_static),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 404, "a deleted session is gone");

    // A session lasts a day; then it is unknown, the client starts another, and the purge
    // deletes both rows.
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let resp = post_mcp(&app, &token, &[], init).await;
    let aged: &'static str = Box::leak(resp.headers()["mcp-session-id"].to_str().unwrap().into());
    let ping = json!({"jsonrpc": "2.0", "id": "a", "method": "ping"});
    assert_eq!(
        post_mcp(&app, &token, &legacy(aged), ping.clone()).await.status(),
        200
    );
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let day_and_a_bit = 24 * 3600 * 1000 + 60_000;
    db.execute(
        "UPDATE mcp_sessions SET created_at = created_at - $1 WHERE id = $2",
        opsiq::args![day_and_a_bit, aged],
    )
    .await
    .unwrap();
    assert_eq!(post_mcp(&app, &token, &legacy(aged), ping).await.status(), 404);
    let count = |db: &opsiq::db::Database| {
        let (db, session) = (db.clone(), session.clone());
        async move {
            let rows: Vec<(String,)> = db
                .fetch_all(
                    "SELECT id FROM mcp_sessions WHERE id IN ($1, $2)",
                    opsiq::args![aged, &session],
                )
                .await
                .unwrap();
            rows.len()
        }
    };
    assert_eq!(count(&db).await, 2);
    opsiq::delivery::retention::purge_once(&db, 0).await.unwrap();
    assert_eq!(count(&db).await, 0, "the ended and the aged session are purged");
    db.close().await;

    // Discover names every revision spoken on this endpoint, the handshake ones too.
    let discover =
        json!({"jsonrpc": "2.0", "id": 10, "method": "server/discover", "params": {"_meta": meta()}});
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "server/discover"),
    ];
    let (status, body) = read(post_mcp(&app, &token, &headers, discover).await).await;
    assert_eq!(status, 200, "{body}");
    let versions = body["result"]["supportedVersions"].as_array().unwrap();
    for version in ["2026-07-28", "2025-11-25", "2025-06-18"] {
        assert!(versions.contains(&json!(version)), "{version}: {body}");
    }
    // Discover without the version header is told what it lacks, not asked for a session.
    let discover =
        json!({"jsonrpc": "2.0", "id": 13, "method": "server/discover", "params": {"_meta": meta()}});
    let (status, body) =
        read(post_mcp(&app, &token, &[("mcp-method", "server/discover")], discover).await).await;
    assert_eq!((status, &body["id"]), (400, &json!(13)), "{body}");
    assert_eq!(body["error"]["code"], -32020, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mcp-protocol-version"),
        "{body}"
    );
    // Sent with a handshake revision, it is that era's request: not refused as a version the
    // server speaks after all.
    let discover = json!({"jsonrpc": "2.0", "id": 15, "method": "server/discover", "params": {}});
    let (_, body) =
        read(post_mcp(&app, &token, &[("mcp-protocol-version", "2025-06-18")], discover).await).await;
    assert_ne!(body["error"]["code"], -32022, "{body}");
    // `params: null` is read as absent: initialize then says what it lacks, as with `{}`.
    for params in [json!(null), json!({})] {
        let init = json!({"jsonrpc": "2.0", "id": 14, "method": "initialize", "params": params});
        let (status, body) = read(post_mcp(&app, &token, &[], init).await).await;
        assert_eq!(status, 200, "{params}: {body}");
        assert_eq!(body["error"]["code"], -32602, "{params}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("protocolVersion"),
            "{body}"
        );
    }
    // A revision spoken nowhere here is named as such, with those that are; initialize says
    // which version it wants.
    let (_, body) = read(
        post_mcp(
            &app,
            &token,
            &[("mcp-protocol-version", "1999-01-01")],
            json!({"jsonrpc": "2.0", "id": 11, "method": "tools/list", "params": {}}),
        )
        .await,
    )
    .await;
    assert_eq!(body["error"]["code"], -32022, "{body}");
    assert!(
        body["error"]["data"]["supported"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-11-25")),
        "{body}"
    );
    let bare = json!({"jsonrpc": "2.0", "id": 12, "method": "initialize"});
    let (_, body) = read(post_mcp(&app, &token, &[], bare).await).await;
    assert_eq!(
        (&body["id"], &body["error"]["code"]),
        (&json!(12), &json!(-32602)),
        "{body}"
    );
    // Params that are not an object are answered to the request's id; a body nested past the
    // limit is refused before it is read, as on every other route.
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &[],
            json!({"jsonrpc": "2.0", "id": 77, "method": "ping", "params": [1]}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, &body["id"], &body["error"]["code"]),
        (400, &json!(77), &json!(-32602)),
        "{body}"
    );
    let deep = (0..100).fold(json!(1), |inner, _| json!([inner]));
    let nested = json!({"jsonrpc": "2.0", "id": 78, "method": "ping", "params": {"x": deep}});
    let (status, body) = read(post_mcp(&app, &token, &[], nested).await).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!(-32600)), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nested deeper"),
        "{body}"
    );
    // A NUL is refused before anything reads it (PostgreSQL could not store one).
    let nul = r#"{"jsonrpc": "2.0", "id": 79, "method": "tools/call", "params": {"name": "look\u0000up"}}"#;
    let (status, body) = read(
        app.as_key(&token, Method::POST, "/mcp")
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(nul)
            .send()
            .await
            .unwrap(),
    )
    .await;
    // ... and a tool call learns it as a tool error its model can act on, for its own id; so
    // does an integer that 64 bits cannot hold. Another request gets an error for its id.
    let raw = |body: &'static str| {
        app.as_key(&token, Method::POST, "/mcp")
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body)
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["id"], &body["result"]["isError"]),
        (&json!(79), &json!(true)),
        "{body}"
    );
    assert!(
        body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("NUL"),
        "{body}"
    );
    let huge = r#"{"jsonrpc": "2.0", "id": "h1", "method": "tools/call", "params": {"name": "lookup_customer", "arguments": {"n": 99999999999999999999999}}}"#;
    // A tool error's text, for request `id`.
    let tool_error_text = |(status, body): (u16, Value), id: &str| {
        assert_eq!(
            (status, &body["id"], &body["result"]["isError"]),
            (200, &json!(id), &json!(true)),
            "{body}"
        );
        body["result"]["content"][0]["text"].as_str().unwrap().to_string()
    };
    let text = tool_error_text(read(raw(huge).send().await.unwrap()).await, "h1");
    assert!(
        text.contains("99999999999999999999999") && text.contains("64-bit"),
        "{text}"
    );
    let twice = r#"{"jsonrpc": "2.0", "id": "d1", "method": "tools/call", "params": {"name": "lookup_customer", "arguments": {"customer_id": "c_1", "customer_id": "c_2"}}}"#;
    let text = tool_error_text(read(raw(twice).send().await.unwrap()).await, "d1");
    assert!(
        text.contains("twice") && text.contains("/params/arguments/customer_id"),
        "{text}"
    );
    // An envelope naming its id twice has no id to answer for; broken text is a parse error.
    let two_ids = r#"{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "ping"}"#;
    let (status, body) = read(raw(two_ids).send().await.unwrap()).await;
    assert_eq!(
        (status, &body["id"], &body["error"]["code"]),
        (400, &Value::Null, &json!(-32600)),
        "{body}"
    );
    let (status, body) = read(raw(r#"{"id": 1, "id": 2"#).send().await.unwrap()).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!(-32700)), "{body}");
    let other = r#"{"jsonrpc": "2.0", "id": 80, "method": "ping", "params": {"n": 99999999999999999999999}}"#;
    let (status, body) = read(raw(other).send().await.unwrap()).await;
    assert_eq!(
        (status, &body["id"], &body["error"]["code"]),
        (400, &json!(80), &json!(-32602)),
        "{body}"
    );

    // Modern: headers must agree with the body.
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "lookup_customer", "arguments": {"customer_id": "c"}, "_meta": meta()}});
    let modern = |method: &'static str, name: &'static str| {
        vec![
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", method),
            ("mcp-name", name),
        ]
    };
    let (status, body) =
        read(post_mcp(&app, &token, &modern("tools/call", "create_ticket"), call.clone()).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_i64()),
        (400, Some(-32020)),
        "{body}"
    );
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &modern("tools/list", "lookup_customer"),
            call.clone(),
        )
        .await,
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_i64()), (400, Some(-32020)));
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &modern("tools/call", "=?base64?bG9va3VwX2N1c3RvbWVy?="),
            call.clone(),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "a base64-encoded Mcp-Name matches: {body}");
    assert_eq!(body["result"]["resultType"], "complete");
    let mut future = call.clone();
    future["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = "2099-01-01".into();
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &[
                ("mcp-protocol-version", "2099-01-01"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "lookup_customer"),
            ],
            future,
        )
        .await,
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_i64()), (400, Some(-32022)));
    assert_eq!(
        body["error"]["data"]["supported"],
        json!([
            "2026-07-28",
            "2025-11-25",
            "2025-06-18",
            "2025-03-26",
            "2024-11-05"
        ])
    );
    let no_meta = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}});
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/list"),
            ],
            no_meta,
        )
        .await,
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_i64()), (400, Some(-32602)));
    let list = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {"_meta": meta()}});
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/list"),
            ],
            list,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["cacheScope"], "private");
    assert!(body["result"]["ttlMs"].is_number());
    let ping = json!({"jsonrpc": "2.0", "id": 6, "method": "ping", "params": {"_meta": meta()}});
    let (status, _) = read(
        post_mcp(
            &app,
            &token,
            &[("mcp-protocol-version", "2026-07-28"), ("mcp-method", "ping")],
            ping,
        )
        .await,
    )
    .await;
    assert_eq!(status, 404, "ping is gone in the stateless era");
    let resp = app
        .as_key(&token, Method::GET, "/mcp")
        .header("mcp-protocol-version", "2026-07-28")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    let (_, body) = read(resp).await;
    assert_eq!(crate::harness::error_code(&body), "method_not_allowed", "{body}");
    // A client that cannot read JSON is told so in a body, not only by the status.
    let resp = app
        .as_key(&token, Method::POST, "/mcp")
        .header("accept", "text/html")
        .header("mcp-protocol-version", "2026-07-28")
        .json(&stateless_tools_list())
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 406, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json"),
        "{body}"
    );
    // A body that is not declared as JSON is refused, as in the other era.
    let resp = app
        .as_key(&token, Method::POST, "/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("content-type", "text/plain")
        .body(stateless_tools_list().to_string())
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = read(
        post_mcp(
            &app,
            &token,
            &[("mcp-protocol-version", "2026-07-28")],
            json!("{not json"),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // subscriptions/listen: acknowledged, then told when this agent's tools change, and ended
    // once its token no longer holds.
    let listen = json!({"jsonrpc": "2.0", "id": "sub-1", "method": "subscriptions/listen",
        "params": {"notifications": {"toolsListChanged": true}, "_meta": meta()}});
    let mut stream = post_mcp(
        &app,
        &token,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "subscriptions/listen"),
        ],
        listen,
    )
    .await;
    assert_eq!(stream.status(), 200);
    let mut seen = String::new();
    read_stream_until(&mut seen, &mut stream, "notifications/subscriptions/acknowledged").await;
    let (_, mut ticket) = app.call(Method::GET, "/v1/actions/create_ticket", None).await;
    ticket["description"] = "Open a ticket (changed again)".into();
    let (status, _) = app
        .call(Method::PUT, "/v1/actions/create_ticket", Some(ticket))
        .await;
    assert_eq!(status, 200);
    read_stream_until(&mut seen, &mut stream, "notifications/tools/list_changed").await;
    assert_eq!(app.call(Method::DELETE, "/v1/agents/agt_wire", None).await.0, 204);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its revoked token");
}

async fn sessions_are_shared_by_replicas(backend: Backend) {
    let World { app, rx: _rx } = world(backend).await;
    let replica = app.replica().await;
    let token = agent_token(&app, "agt_rep", &["support"], &["invoke:*"]).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let resp = post_mcp(&app, &token, &[], init).await;
    let session = resp.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let resp = replica
        .as_key(&token, Method::POST, "/mcp")
        .header("accept", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&list)
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["tools"].as_array().unwrap().len(), 3);
}

const METADATA: &str = "/.well-known/oauth-protected-resource/mcp";

/// The challenge of a 401 from `/mcp` without a token, after checking its start.
async fn challenge_of_refusal(app: &TestApp, token: Option<&str>) -> String {
    let mut request = app
        .http
        .post(app.url("/mcp"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let resp = request.send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Bearer realm=\"opsiq\""), "{challenge}");
    assert_eq!(
        challenge.contains("error=\"invalid_token\""),
        token.is_some(),
        "{challenge}"
    );
    challenge
}

/// Without authorization servers to name, no resource metadata is published (the MCP rules
/// require it to name one), and a refusal points at none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resource_metadata_is_published_unless_configured() {
    let app = TestApp::start(Backend::Sqlite).await;
    let challenge = challenge_of_refusal(&app, None).await;
    assert!(!challenge.contains("resource_metadata"), "{challenge}");
    for path in [METADATA, "/.well-known/oauth-protected-resource"] {
        let (status, body) = read(app.http.get(app.url(path)).send().await.unwrap()).await;
        crate::harness::assert_error((status, &body), 404, "not_found", "public_url");
    }
}

/// With authorization servers listed, a refused MCP client learns where the resource metadata
/// is, and the document names `/mcp` at the configured `public_url` as the resource (the server
/// itself at the bare well-known name) and the servers as written; pages from listed origins can
/// read the challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_finds_the_resource_metadata() {
    let app = TestApp::on(Backend::Sqlite)
        .with(|raw, _| {
            raw.public_url = "https://gateway.example.com/".into();
            raw.mcp_authorization_servers = "https://login.example.com/, https://idp.example.org".into();
            raw.mcp_allowed_origins = "https://console.example.com".into();
        })
        .start()
        .await;
    for token in [None, Some("not.a.jwt")] {
        let challenge = challenge_of_refusal(&app, token).await;
        let named = format!("resource_metadata=\"https://gateway.example.com{METADATA}\"");
        assert!(challenge.ends_with(&named), "{challenge}");
    }
    for (path, resource) in [
        (METADATA, "https://gateway.example.com/mcp"),
        (
            "/.well-known/oauth-protected-resource",
            "https://gateway.example.com",
        ),
    ] {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        assert!(
            resp.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("max-age=")
        );
        let (_, doc) = read(resp).await;
        assert_eq!(doc["resource"], resource, "{doc}");
        assert_eq!(
            doc["authorization_servers"],
            json!(["https://login.example.com/", "https://idp.example.org"])
        );
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    }
    let resp = app
        .http
        .post(app.url("/mcp"))
        .header("origin", "https://console.example.com")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("www-authenticate"), "{exposed}");
}

/// An open MCP event stream does not hold a stopping server: it ends, and the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_open_event_streams() {
    let World { mut app, rx: _rx } = world(Backend::Sqlite).await;
    let token = agent_token(&app, "agt_stream", &["support"], &["invoke:*"]).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let resp = post_mcp(&app, &token, &[], init).await;
    let session = resp.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let mut stream = app
        .as_key(&token, Method::GET, "/mcp")
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stopped = tokio::time::timeout(Duration::from_secs(60), app.stop()).await;
    assert!(stopped.is_ok(), "the server waited for the stream's client");
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived the server");
}

/// A 2025-03-26 session takes JSON-RPC batches, as that revision's transport requires: each
/// request answered in order, notifications not at all, `initialize` refused inside one; a
/// session of a later revision refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_taken_on_sessions_of_the_revision_that_has_them() {
    let World { app, rx: _rx } = world(Backend::Sqlite).await;
    let token = agent_token(&app, "agt_batch", &["support"], &["invoke:*"]).await;
    let open = |version: &'static str| {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
        let (app, token) = (&app, &token);
        async move {
            let resp = post_mcp(app, token, &[], init).await;
            assert_eq!(resp.status(), 200);
            resp.headers()["mcp-session-id"].to_str().unwrap().to_string()
        }
    };
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": "two", "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "no/such"},
        {"jsonrpc": "2.0", "id": 4, "method": "initialize", "params": {}},
    ]);
    let old = open("2025-03-26").await;
    let on_old = [
        ("mcp-session-id", old.as_str()),
        ("mcp-protocol-version", "2025-03-26"),
    ];
    let (status, body) = read(post_mcp(&app, &token, &on_old, batch.clone()).await).await;
    assert_eq!(status, 200, "{body}");
    let answers = body.as_array().expect("an array of answers");
    let ids: Vec<&Value> = answers.iter().map(|a| &a["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!("two"), &json!(3), &json!(4)], "{body}");
    assert_eq!(answers[0]["result"], json!({}));
    assert!(
        answers[1]["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(answers[2]["error"]["code"], -32601);
    assert_eq!(answers[3]["error"]["code"], -32600);
    // A message whose text is at fault spoils only its own answer: a duplicate key in a tool
    // call's arguments is that call's tool error; its neighbour is answered.
    let raw = r#"[{"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "lookup_customer", "arguments": {"customer_id": "a", "customer_id": "b"}}}]"#;
    let resp = app
        .as_key(&token, Method::POST, "/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-session-id", &old)
        .header("mcp-protocol-version", "2025-03-26")
        .body(raw)
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body[0],
        json!({"jsonrpc": "2.0", "id": 1, "result": {}}),
        "{body}"
    );
    assert_eq!(
        (&body[1]["id"], &body[1]["result"]["isError"]),
        (&json!(2), &json!(true)),
        "{body}"
    );
    let only_notes = json!([{"jsonrpc": "2.0", "method": "notifications/initialized"}]);
    let resp = post_mcp(&app, &token, &on_old, only_notes).await;
    assert_eq!(resp.status(), 202);

    let new = open("2025-11-25").await;
    let on_new = [
        ("mcp-session-id", new.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (status, body) = read(post_mcp(&app, &token, &on_new, batch).await).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!(-32600)), "{body}");
}
