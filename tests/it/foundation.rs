//! The foundation: registry CRUD and versions, declarative files, bad input, authentication and
//! roles, tenant isolation, operations routes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::dual;
use crate::harness::{Backend, TestApp, at_once, details, error_code, read};

fn refund_action() -> Value {
    json!({
        "name": "refund_invoice",
        "title": "Refund an invoice",
        "description": "Refund part or all of a paid invoice.",
        "input_schema": {
            "type": "object",
            "properties": {
                "invoice_id": {"type": "string"},
                "amount": {"type": "integer", "minimum": 1}
            },
            "required": ["invoice_id", "amount"],
            "additionalProperties": false
        },
        "annotations": {"destructive": true}
    })
}

dual!(
    registry_create_read_update_delete,
    actions_change_only_at_the_version_read,
    registry_versions_and_hashes,
    registry_rejects_bad_declarations,
    action_files_are_applied_at_start,
    bad_input_gets_contract_errors,
    authentication_and_roles,
    api_keys_are_shown_once_and_revocable,
    tenants_never_see_each_other,
    operations_routes,
);

async fn registry_create_read_update_delete(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, created) = app.call(Method::POST, "/v1/actions", Some(refund_action())).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    assert!(created["id"].as_str().unwrap().starts_with("act_"));
    assert_eq!(created["mode"], "sync", "defaults are filled in");

    let (status, again) = app.call(Method::POST, "/v1/actions", Some(refund_action())).await;
    assert_eq!(status, 409);
    assert_eq!(error_code(&again), "already_exists");

    let (status, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(status, 200);
    assert_eq!(got["input_schema"], refund_action()["input_schema"]);

    let mut changed = refund_action();
    changed["description"] = json!("Refund an invoice, fully or partly.");
    let (status, updated) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(changed))
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["id"], created["id"], "the id is stable across versions");

    let (status, list) = app.call(Method::GET, "/v1/actions", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["next_cursor"], Value::Null);

    let (status, _) = app.call(Method::DELETE, "/v1/actions/refund_invoice", None).await;
    assert_eq!(status, 204);
    let (status, gone) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&gone), "not_found");
    let (status, _) = app.call(Method::DELETE, "/v1/actions/refund_invoice", None).await;
    assert_eq!(status, 404);
    let (status, _) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(refund_action()))
        .await;
    assert_eq!(status, 404, "PUT does not create");

    // Re-creating a deleted name continues its history instead of reusing version numbers.
    let (status, revived) = app.call(Method::POST, "/v1/actions", Some(refund_action())).await;
    assert_eq!(status, 201);
    assert_eq!(revived["version"], 3);

    // Pagination walks every action exactly once.
    for i in 0..5 {
        let mut a = refund_action();
        a["name"] = json!(format!("action_{i}"));
        assert_eq!(app.call(Method::POST, "/v1/actions", Some(a)).await.0, 201);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/actions?limit=2&cursor={c}"),
            None => "/v1/actions?limit=2".into(),
        };
        let (_, page) = app.call(Method::GET, &path, None).await;
        for a in page["data"].as_array().unwrap() {
            seen.push(a["name"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen);
}

/// `If-Match` with the `ETag` a read gave: a change made meanwhile is a 412, not overwritten.
async fn actions_change_only_at_the_version_read(backend: Backend) {
    let app = TestApp::start(backend).await;
    let path = "/v1/actions/refund_invoice";
    let created = app
        .as_key(&app.admin_key, Method::POST, "/v1/actions")
        .json(&refund_action())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["etag"], "\"1\"");
    let read_at = app
        .as_key(&app.admin_key, Method::GET, path)
        .send()
        .await
        .unwrap();
    let etag = read_at.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, "\"1\"");

    let put = |if_match: &str, description: &str| {
        let mut declaration = refund_action();
        declaration["description"] = json!(description);
        app.as_key(&app.admin_key, Method::PUT, path)
            .header("if-match", if_match)
            .json(&declaration)
    };
    // Two people read version 1; the first to save wins, the second learns of it.
    let first = put(&etag, "First edit.").send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["etag"], "\"2\"");
    let (status, lost) = read(put(&etag, "Second edit.").send().await.unwrap()).await;
    assert_eq!((status, error_code(&lost)), (412, "version_mismatch"), "{lost}");
    assert!(
        lost["error"]["message"].as_str().unwrap().contains("version 2"),
        "{lost}"
    );
    let (_, now) = app.call(Method::GET, path, None).await;
    assert_eq!(
        (now["version"].clone(), now["description"].clone()),
        (json!(2), json!("First edit."))
    );

    // `*` is accepted; a weak or malformed ETag is a 400 that changes nothing.
    assert_eq!(put("\"2\"", "Third edit.").send().await.unwrap().status(), 200);
    assert_eq!(put("*", "Fourth edit.").send().await.unwrap().status(), 200);
    for bad in ["3", "W/\"3\"", "\"4\", \"5\"", "\"+4\""] {
        let (status, body) = read(put(bad, "Bad edit.").send().await.unwrap()).await;
        assert_eq!((status, error_code(&body)), (400, "invalid_if_match"), "{bad}");
    }
    // Tags compare as text: one this server never gave matches nothing, even "04" at version 4.
    for other in ["\"04\"", "\"three\"", "\"99999999999999999999\"", "\"0\""] {
        let (status, body) = read(put(other, "Odd edit.").send().await.unwrap()).await;
        assert_eq!((status, error_code(&body)), (412, "version_mismatch"), "{other}");
    }
    let (_, now) = app.call(Method::GET, path, None).await;
    assert_eq!(
        (now["version"].clone(), now["description"].clone()),
        (json!(4), json!("Fourth edit."))
    );

    // A delete at an old version is refused too; at the current one it deletes.
    crate::harness::delete_checks_version(&app, path, "\"3\"", "\"4\"").await;
    let (status, _) = read(put("\"4\"", "After delete.").send().await.unwrap()).await;
    assert_eq!(status, 404);

    // Concurrent saves: of eight creates of a new name, or of a deleted one, one wins and seven
    // find it exists; of eight saves made at version 5 exactly one wins; eight made without
    // If-Match all land, one version each.
    let mut fresh = refund_action();
    fresh["name"] = json!("made_at_once");
    let create = |declaration: &Value| {
        app.as_key(&app.admin_key, Method::POST, "/v1/actions")
            .json(declaration)
    };
    let one_wins = |rest: u16| {
        let mut expected = vec![rest; 8];
        expected[0] = if rest == 409 { 201 } else { 200 };
        expected
    };
    assert_eq!(at_once((0..8).map(|_| create(&fresh))).await, one_wins(409));
    assert_eq!(
        at_once((0..8).map(|_| create(&refund_action()))).await,
        one_wins(409)
    );
    assert_eq!(
        at_once((0..8).map(|i| put("\"5\"", &format!("Edit {i}.")))).await,
        one_wins(412)
    );
    let blind = |i: usize| {
        let mut declaration = refund_action();
        declaration["description"] = json!(format!("Blind edit {i}."));
        app.as_key(&app.admin_key, Method::PUT, path).json(&declaration)
    };
    assert_eq!(at_once((0..8).map(blind)).await, vec![200; 8]);
    let (_, versions) = app
        .call(Method::GET, &format!("{path}/versions?limit=200"), None)
        .await;
    let numbers: Vec<i64> = versions["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=14).rev().collect::<Vec<i64>>());
}

async fn registry_versions_and_hashes(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (_, v1) = app.call(Method::POST, "/v1/actions", Some(refund_action())).await;
    // The same declaration with keys in another order is not a change.
    let reordered: Value = serde_json::from_str(
        r#"{"input_schema":{"additionalProperties":false,"required":["invoice_id","amount"],
            "properties":{"amount":{"minimum":1,"type":"integer"},"invoice_id":{"type":"string"}},"type":"object"},
            "annotations":{"destructive":true},"description":"Refund part or all of a paid invoice.",
            "title":"Refund an invoice","name":"refund_invoice"}"#,
    )
    .unwrap();
    let (status, same) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(reordered))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        same["version"], 1,
        "an identical declaration is not a new version"
    );
    assert_eq!(same["content_hash"], v1["content_hash"]);

    // A GET body can be edited and PUT back as is (server fields are ignored).
    let mut edited = same.clone();
    edited["timeout_ms"] = json!(2500);
    let (status, v2) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(edited))
        .await;
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["version"], 2);
    assert_ne!(v2["content_hash"], v1["content_hash"]);
    assert!(v2["content_hash"].as_str().unwrap().starts_with("sha256:"));

    let (status, versions) = app
        .call(Method::GET, "/v1/actions/refund_invoice/versions", None)
        .await;
    assert_eq!(status, 200);
    let list = versions["data"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[1]["version"], 1);
    assert_eq!(list[1]["content_hash"], v1["content_hash"]);
    assert_eq!(list[1]["declaration"]["timeout_ms"], 10000);
    assert_eq!(list[0]["declaration"]["timeout_ms"], 2500);

    let (status, one) = app
        .call(Method::GET, "/v1/actions/refund_invoice/versions/1", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["content_hash"], v1["content_hash"]);
    let (status, _) = app
        .call(Method::GET, "/v1/actions/refund_invoice/versions/9", None)
        .await;
    assert_eq!(status, 404);

    // Versions stay readable after the action is deleted.
    app.call(Method::DELETE, "/v1/actions/refund_invoice", None).await;
    let (status, versions) = app
        .call(Method::GET, "/v1/actions/refund_invoice/versions", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(versions["data"].as_array().unwrap().len(), 2);

    // Renaming through PUT is refused.
    let (status, body) = app
        .call(
            Method::PUT,
            "/v1/actions/refund_invoice",
            Some(json!({"name": "other", "input_schema": {"type": "object"}})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["details"][0]["path"], "/name");
}

async fn registry_rejects_bad_declarations(backend: Backend) {
    let app = TestApp::start(backend).await;
    let cases = [
        (
            json!({"name": "has space", "input_schema": {"type": "object"}}),
            "/name",
        ),
        (
            json!({"name": &"x".repeat(65), "input_schema": {"type": "object"}}),
            "/name",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "string"}}),
            "/input_schema/type",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object", "properties": {"n": {"type": "integr"}}}}),
            "/input_schema/properties/n/type",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object", "properties": {"n": {"$ref": "https://example.com/s.json"}}}}),
            "/input_schema",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object"}, "output_schema": {"minimum": "ten"}}),
            "/output_schema",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object"}, "timeout_ms": 5}),
            "/timeout_ms",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object"}, "endpoint_id": "ep_nope"}),
            "/endpoint_id",
        ),
        (
            json!({"name": "a", "input_schema": {"type": "object"}, "mode": "later"}),
            "/mode",
        ),
        (json!({"name": "a"}), "/"),
        (
            json!({"name": "a", "input_schema": {"type": "object"}, "surprise": 1}),
            "/",
        ),
    ];
    for (body, path) in cases {
        let (status, err) = app.call(Method::POST, "/v1/actions", Some(body.clone())).await;
        assert_eq!(status, 422, "{body} → {err}");
        let details = err["error"]["details"].as_array().unwrap();
        assert!(
            details
                .iter()
                .any(|d| d["path"].as_str().unwrap().starts_with(path)),
            "{body}: expected a detail at {path}, got {err}"
        );
    }
    let (_, list) = app.call(Method::GET, "/v1/actions", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing half-written");
}

async fn action_files_are_applied_at_start(backend: Backend) {
    let mut app = TestApp::on(backend)
        .with(|raw, dir| {
            let actions = dir.join("actions");
            std::fs::create_dir_all(&actions).unwrap();
            std::fs::write(actions.join("refund_invoice.json"), refund_action().to_string()).unwrap();
            raw.actions_dir = actions;
        })
        .start()
        .await;
    let (status, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["source"], "file");
    assert_eq!(got["version"], 1);
    // Each change a file makes is in the audit log, by that file; a file that changes nothing
    // leaves no row.
    let by_file = |app: &TestApp| {
        let request = app.admin(Method::GET, "/v1/audit?limit=200");
        async move {
            let (status, page) = read(request.send().await.unwrap()).await;
            assert_eq!(status, 200, "{page}");
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|row| row["actor"] == "file:refund_invoice.json")
                .cloned()
                .collect::<Vec<Value>>()
        }
    };
    let rows = by_file(&app).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (&rows[0]["action"], &rows[0]["target"]),
        (
            &json!("PUT /v1/actions/{name}"),
            &json!("/v1/actions/refund_invoice")
        )
    );

    // Unchanged file: a restart changes nothing, and an API edit stands.
    let mut edited = got.clone();
    edited["timeout_ms"] = json!(3000);
    assert_eq!(
        app.call(Method::PUT, "/v1/actions/refund_invoice", Some(edited))
            .await
            .0,
        200
    );
    app.restart().await;
    let (_, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(got["version"], 2);
    assert_eq!(got["timeout_ms"], 3000);
    assert_eq!(by_file(&app).await.len(), 1);

    // A changed file becomes a new version at the next start.
    let mut file = refund_action();
    file["description"] = json!("Changed in the file");
    std::fs::write(
        app.dir.path().join("actions/refund_invoice.json"),
        file.to_string(),
    )
    .unwrap();
    app.restart().await;
    let (_, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(got["version"], 3);
    assert_eq!(got["description"], "Changed in the file");
    assert_eq!(got["source"], "file");
    assert_eq!(by_file(&app).await.len(), 2);
    let (verified, stdout, stderr) = crate::audit::audit_verify(&app).await;
    assert!(verified, "{stdout}\n{stderr}");

    // An admin's edit later written into the file too is that file's content: the next API
    // edit stands until the file changes again.
    let mut both = refund_action();
    both["description"] = json!("Same in the API and the file");
    let (status, body) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(both.clone()))
        .await;
    assert_eq!((status, &body["version"]), (200, &json!(4)), "{body}");
    std::fs::write(
        app.dir.path().join("actions/refund_invoice.json"),
        both.to_string(),
    )
    .unwrap();
    app.restart().await;
    let (_, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(got["version"], 4, "{got}");
    let mut edited = got.clone();
    edited["timeout_ms"] = json!(4000);
    let (status, _) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(edited))
        .await;
    assert_eq!(status, 200);
    app.restart().await;
    let (_, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(
        (&got["version"], &got["timeout_ms"]),
        (&json!(5), &json!(4000)),
        "{got}"
    );

    // An endpoint a file names belongs to one tenant; the others' copies of the action have
    // none (their calls are refused, never sent to that tenant's endpoint).
    let (status, ep) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://hooks.example.com/refunds"})),
        )
        .await;
    assert_eq!(status, 201, "{ep}");
    let mut with_endpoint = both.clone();
    with_endpoint["endpoint_id"] = ep["id"].clone();
    std::fs::write(
        app.dir.path().join("actions/refund_invoice.json"),
        with_endpoint.to_string(),
    )
    .unwrap();
    app.restart().await;
    let (_, got) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(got["endpoint_id"], ep["id"], "{got}");

    // A tenant added later gets the files too.
    let (_, key_b) = app.new_tenant("globex").await;
    let (status, theirs) = app
        .call_as(&key_b, Method::GET, "/v1/actions/refund_invoice", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(theirs["endpoint_id"], Value::Null, "{theirs}");
}

async fn bad_input_gets_contract_errors(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, _| raw.body_limit = 4096)
        .start()
        .await;
    // An event's id stands in for an Idempotency-Key and is held to its length.
    for id in [String::new(), "e".repeat(256)] {
        let (status, body) = app
            .call(
                Method::POST,
                "/v1/events",
                Some(json!({"type": "ticket.note", "data": {}, "id": id})),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["details"][0]["path"], "/id", "{body}");
    }
    // A cursor no list gave is refused; an empty one starts at the newest item.
    for list in [
        "/v1/deliveries",
        "/v1/events",
        "/v1/invocations",
        "/v1/approvals",
        "/v1/rules",
        "/v1/endpoints",
        "/v1/api-keys",
    ] {
        let (status, body) = app
            .call(Method::GET, &format!("{list}?cursor=garbage"), None)
            .await;
        assert_eq!((status, error_code(&body)), (400, "invalid_cursor"), "{list}");
        // Only the prefix right is not an id either.
        let prefix = match list {
            "/v1/deliveries" => "dlv_",
            "/v1/events" => "evt_",
            "/v1/invocations" => "inv_",
            "/v1/approvals" => "apr_",
            "/v1/rules" => "rul_",
            "/v1/endpoints" => "ep_",
            _ => "key_",
        };
        let (status, body) = app
            .call(Method::GET, &format!("{list}?cursor={prefix}zz"), None)
            .await;
        assert_eq!((status, error_code(&body)), (400, "invalid_cursor"), "{list}");
        let (status, first) = app.call(Method::GET, list, None).await;
        assert_eq!(status, 200, "{list}");
        let (status, empty) = app.call(Method::GET, &format!("{list}?cursor="), None).await;
        assert_eq!((status, &empty["data"]), (200, &first["data"]), "{list}");
        // A page size outside 1–200 is refused, not quietly changed.
        for limit in ["0", "201", "-1", "ten", "4294967296"] {
            let (status, body) = app
                .call(Method::GET, &format!("{list}?limit={limit}"), None)
                .await;
            assert_eq!(
                (status, error_code(&body)),
                (400, "invalid_query"),
                "{list} {limit}"
            );
        }
        for limit in ["1", "200"] {
            let (status, _) = app
                .call(Method::GET, &format!("{list}?limit={limit}"), None)
                .await;
            assert_eq!(status, 200, "{list} {limit}");
        }
    }
    for list in [
        "/v1/actions",
        "/v1/actions/refund_invoice/versions",
        "/v1/agents",
        "/v1/audit",
        "/v1/event-types",
    ] {
        let (status, body) = app.call(Method::GET, &format!("{list}?limit=201"), None).await;
        assert_eq!((status, error_code(&body)), (400, "invalid_query"), "{list}");
    }
    let (_, keys) = app.call(Method::GET, "/v1/api-keys?cursor=", None).await;
    assert!(!keys["data"].as_array().unwrap().is_empty());
    let post = |body: reqwest::Body, ctype: Option<&str>| {
        let mut req = app.admin(Method::POST, "/v1/actions").body(body);
        if let Some(ctype) = ctype {
            req = req.header("content-type", ctype);
        }
        req
    };
    let json = Some("application/json");

    let (status, body) = read(post("{\"name\": ".into(), json).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "malformed_json"));

    let (status, body) = read(
        post(vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'].into(), json)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, error_code(&body)), (400, "invalid_utf8"));

    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let (status, body) = read(post(deep.into(), json).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "nesting_too_deep"));

    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(10_000));
    let (status, body) = read(post(huge.into(), json).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));

    // An oversized head gets the contract's body too, below hyper's own empty answers.
    let long_query = format!("/v1/endpoints?cursor={}", "c".repeat(9_000));
    let (status, body) = app.call(Method::GET, &long_query, None).await;
    assert_eq!((status, error_code(&body)), (414, "uri_too_long"), "{body}");
    let with_header_of = |bytes: usize| {
        let request = app
            .admin(Method::GET, "/v1/endpoints")
            .header("x-pasted", "t".repeat(bytes));
        async move { read(request.send().await.unwrap()).await }
    };
    let (status, body) = with_header_of(40_000).await;
    assert_eq!((status, error_code(&body)), (431, "headers_too_large"), "{body}");
    let (status, body) = with_header_of(20_000).await;
    assert_eq!(status, 200, "a 20 KB header is within the limits: {body}");

    let (status, body) = read(post("{}".into(), Some("text/plain")).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (415, "unsupported_media_type"));
    let (status, body) = read(post("{}".into(), None).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (415, "unsupported_media_type"));
    // JSON is UTF-8: another declared charset is refused; UTF-8 said any way is fine.
    for (content_type, expected) in [
        ("application/json; charset=latin1", 415),
        ("application/json;charset=\"ISO-8859-1\"", 415),
        ("application/json; charset=UTF-8", 400),
        ("application/json; charset=\"utf-8\"", 400),
    ] {
        let (status, body) = read(post("{".into(), Some(content_type)).send().await.unwrap()).await;
        assert_eq!(status, expected, "{content_type}: {body}");
    }
    let gzipped = post(vec![0x1f, 0x8b, 0x08, 0x00].into(), json).header("content-encoding", "gzip");
    let (status, body) = read(gzipped.send().await.unwrap()).await;
    assert_eq!(
        (status, error_code(&body)),
        (415, "unsupported_media_type"),
        "{body}"
    );

    let (status, body) = read(post("[1, 2]".into(), json).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (422, "validation_failed"));
    // Truncated JSON is malformed even when its start already has the wrong shape.
    let (status, body) = read(post("{\"surprise\":".into(), json).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "malformed_json"));
    // A sequence is not accepted for an object.
    let keys = app
        .admin(Method::POST, "/v1/api-keys")
        .header("content-type", "application/json");
    let (status, _) = read(keys.body(r#"["k", "viewer"]"#).send().await.unwrap()).await;
    assert_eq!(status, 422);
    // A NUL in a path or a query is refused alike on both databases (PostgreSQL cannot even
    // compare text with one).
    for (method, path, code) in [
        (Method::GET, "/v1/actions/a%00b", "invalid_path"),
        (Method::DELETE, "/v1/event-types/a%00b", "invalid_path"),
        (Method::GET, "/v1/endpoints/ep_a%00b", "invalid_path"),
        (Method::GET, "/v1/deliveries?endpoint_id=a%00b", "invalid_query"),
        (Method::GET, "/v1/invocations?status=a%00b", "invalid_query"),
    ] {
        let (status, body) = app.call(method, path, None).await;
        assert_eq!((status, error_code(&body)), (400, code), "{path}: {body}");
    }
    // A NUL in any text is refused alike on both databases (PostgreSQL cannot store one); an
    // escaped backslash before `u0000` is no NUL.
    for (name, expected) in [(r"a\u0000b", 422), (r"a\\u0000b", 201)] {
        let keys = app
            .admin(Method::POST, "/v1/api-keys")
            .header("content-type", "application/json");
        let body = format!(r#"{{"name": "{name}", "role": "viewer"}}"#);
        let (status, answer) = read(keys.body(body).send().await.unwrap()).await;
        assert_eq!(status, expected, "{name}: {answer}");
    }
    // An integer 64 bits cannot hold would be kept, sent on and compared as another number:
    // refused, with what to do instead. One that fits is kept exactly.
    let event = |amount: &str| {
        let body = format!(
            r#"{{"type": "invoice.paid", "data": {{"invoice_id": "i", "amount": {amount}, "currency": "eur"}}}}"#
        );
        app.admin(Method::POST, "/v1/events")
            .header("content-type", "application/json")
            .body(body)
    };
    for too_large in [
        "99999999999999999999999",
        "18446744073709551616",
        "-9223372036854775809",
    ] {
        let (status, body) = read(event(too_large).send().await.unwrap()).await;
        assert_eq!(
            (status, error_code(&body)),
            (422, "validation_failed"),
            "{too_large}: {body}"
        );
        let message = body["error"]["details"][0]["message"].as_str().unwrap();
        assert!(
            message.contains(too_large) && message.contains("send it as a string"),
            "{message}"
        );
    }
    // Text that is not JSON at all is told so first.
    let broken = app
        .admin(Method::POST, "/v1/events")
        .header("content-type", "application/json")
        .body(r#"{"type": "x.y", "data": {"n": +99999999999999999999}}"#);
    let (status, body) = read(broken.send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "malformed_json"), "{body}");
    // A key named twice in one object means one thing to one parser and another to the next:
    // refused with its pointer, and nothing is recorded.
    let events_before = app.call(Method::GET, "/v1/events", None).await.1["data"].clone();
    assert!(events_before.is_array(), "{events_before}");
    let twice = app
        .admin(Method::POST, "/v1/events")
        .header("content-type", "application/json")
        .body(r#"{"type": "invoice.paid", "data": {"invoice_id": "i", "amount": 1, "currency": "eur", "\u0061mount": 1000}}"#);
    let (status, body) = read(twice.send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "duplicate_key"), "{body}");
    assert_eq!(details(&body, "path"), ["/data/amount"], "{body}");
    let events_after = app.call(Method::GET, "/v1/events", None).await.1["data"].clone();
    assert_eq!(events_before, events_after);
    let (status, body) = read(event("18446744073709551615").send().await.unwrap()).await;
    assert_eq!(status, 202, "{body}");
    let path = format!("/v1/events/{}", body["event_id"].as_str().unwrap());
    let stored = app
        .admin(Method::GET, &path)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(stored.contains(r#""amount":18446744073709551615"#), "{stored}");

    let (status, body) = read(app.admin(Method::GET, "/v1/nothing-here").send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = read(app.admin(Method::PATCH, "/v1/actions").send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    let (status, body) = read(
        app.admin(Method::GET, "/v1/actions?limit=lots")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, error_code(&body)), (400, "invalid_query"));
    // A parameter a list does not take is refused: a filter that was silently ignored would
    // answer everything. So is a filter value nothing can have: it would only ever answer an
    // empty list.
    for (path, named) in [
        ("/v1/events?endpoint_id=ep_1", "unknown field"),
        ("/v1/actions?cursor=&sort=name", "unknown field"),
        ("/v1/invocations?status=bogus", "pending_approval"),
        ("/v1/deliveries?status=bogus", "pending"),
        ("/v1/deliveries?event_type=**", "invoice.paid"),
    ] {
        let (status, body) = app.call(Method::GET, path, None).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_query"),
            "{path}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(named),
            "{body}"
        );
    }

    // A route that reads no query parameters refuses any, and does nothing: a `dry_run` that
    // was ignored would have recorded (and delivered) the event.
    let (_, before) = app.call(Method::GET, "/v1/events", None).await;
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/events?dry_run=true",
            Some(json!({"type": "invoice.paid", "data": {}})),
        ),
        (Method::GET, "/v1/policies?format=csv", None),
        (Method::DELETE, "/v1/actions/refund_invoice?force=1", None),
    ] {
        let (status, body) = app.call(method.clone(), path, body).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_query"),
            "{method} {path}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("takes no query parameters"), "{body}");
    }
    let (_, after) = app.call(Method::GET, "/v1/events", None).await;
    assert_eq!(before["data"], after["data"]);
    let (status, _) = app.call(Method::GET, "/v1/policies", None).await;
    assert_eq!(status, 200);
    // An empty query string is no parameter.
    let (status, _) = app.call(Method::GET, "/v1/policies?", None).await;
    assert_eq!(status, 200);

    // Every answer carries a request id.
    let resp = app.admin(Method::GET, "/v1/actions").send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
}

async fn authentication_and_roles(backend: Backend) {
    let app = TestApp::start(backend).await;
    let resp = app.http.get(app.url("/v1/actions")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());
    let (_, body) = read(resp).await;
    assert_eq!(error_code(&body), "unauthorized");

    for bad in [
        "opsiq_sk_unknown",
        "not-a-key",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
    ] {
        let (status, body) = app.call_as(bad, Method::GET, "/v1/actions", None).await;
        assert_eq!(status, 401, "{bad}");
        assert_eq!(error_code(&body), "invalid_api_key");
    }

    let (_, viewer) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "ro", "role": "viewer"})),
        )
        .await;
    let viewer_key = viewer["key"].as_str().unwrap().to_string();
    assert_eq!(
        app.call_as(&viewer_key, Method::GET, "/v1/actions", None).await.0,
        200
    );
    let (status, body) = app
        .call_as(&viewer_key, Method::POST, "/v1/actions", Some(refund_action()))
        .await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "forbidden");
    assert!(body["error"]["message"].as_str().unwrap().contains("viewer"));
    // A body of the wrong shape is still 403, not a lesson in what the body should be.
    for (method, path) in [
        (Method::POST, "/v1/actions"),
        (Method::POST, "/v1/agents"),
        (Method::POST, "/v1/event-types"),
        (Method::PATCH, "/v1/event-types/order.placed"),
        (Method::POST, "/v1/api-keys"),
        (Method::POST, "/v1/preview"),
        (Method::POST, "/v1/endpoints"),
        (Method::PATCH, "/v1/endpoints/ep_x"),
        (Method::POST, "/v1/endpoints/ep_x/rotate-secret"),
        (Method::POST, "/v1/endpoints/ep_x/test"),
        (Method::POST, "/v1/endpoints/ep_x/recover"),
        (Method::POST, "/v1/deliveries/dlv_x/replay"),
        (Method::POST, "/v1/approvals/apr_x/approve"),
        (Method::PUT, "/v1/policies"),
        (Method::PUT, "/v1/actions/refund_invoice"),
        (Method::POST, "/v1/rules"),
        (Method::PUT, "/v1/rules/rul_x"),
    ] {
        let (status, body) = app
            .call_as(&viewer_key, method.clone(), path, Some(json!({"bogus": 1})))
            .await;
        assert_eq!(status, 403, "{path}: {body}");
        // Nor what a body must be: not JSON, and not sent as JSON, it is refused the same way.
        let raw = app
            .as_key(&viewer_key, method, path)
            .header("content-type", "text/plain")
            .body("not json");
        let (status, body) = read(raw.send().await.unwrap()).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, _) = app
        .call_as(
            &viewer_key,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "x", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 403);

    let (_, admin) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "adm", "role": "admin"})),
        )
        .await;
    let admin_key = admin["key"].as_str().unwrap().to_string();
    assert_eq!(
        app.call_as(&admin_key, Method::POST, "/v1/actions", Some(refund_action()))
            .await
            .0,
        201
    );
    let (status, _) = app
        .call_as(
            &admin_key,
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "o", "role": "owner"})),
        )
        .await;
    assert_eq!(status, 403, "only owners make owners");

    // Owner keys are the owners' to revoke, and the last one cannot go.
    let (_, keys) = app.call(Method::GET, "/v1/api-keys", None).await;
    let owner_id = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "owner")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = app
        .call_as(
            &admin_key,
            Method::DELETE,
            &format!("/v1/api-keys/{owner_id}"),
            None,
        )
        .await;
    assert_eq!(status, 403, "an admin cannot revoke an owner key");
    let (status, body) = app
        .call(Method::DELETE, &format!("/v1/api-keys/{owner_id}"), None)
        .await;
    assert_eq!((status, error_code(&body)), (409, "last_owner_key"));

    // Revocation takes effect on the next request.
    let id = admin["id"].as_str().unwrap();
    assert_eq!(
        app.call(Method::DELETE, &format!("/v1/api-keys/{id}"), None)
            .await
            .0,
        204
    );
    let (status, body) = app.call_as(&admin_key, Method::GET, "/v1/actions", None).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "invalid_api_key");
}

async fn api_keys_are_shown_once_and_revocable(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, created) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "ci", "role": "developer"})),
        )
        .await;
    assert_eq!(status, 201);
    let secret = created["key"].as_str().unwrap();
    assert!(secret.starts_with("opsiq_sk_"));
    assert!(secret.len() > 40);
    let (_, list) = app.call(Method::GET, "/v1/api-keys", None).await;
    let text = list.to_string();
    assert!(!text.contains(secret), "a listing never shows a secret");
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == created["id"] && k["role"] == "developer")
    );
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "x", "role": "root"})),
        )
        .await;
    assert_eq!(status, 422);

    // Keys are stored only as hashes: the secret does not appear in the database.
    let stored = dump_api_key_hashes(&app.database_url).await;
    assert!(!stored.iter().any(|h| h.contains(secret)));
    assert!(stored.contains(&opsiq::crypto::sha256_hex(secret.as_bytes())));

    // Two owners revoking each other at once: one revocation stands, one owner remains.
    let (_, second) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "second owner", "role": "owner"})),
        )
        .await;
    let second_key = second["key"].as_str().unwrap();
    let (_, list) = app.call(Method::GET, "/v1/api-keys", None).await;
    let owner_ids: Vec<String> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "owner")
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(owner_ids.len(), 2, "{list}");
    let first_id = owner_ids.iter().find(|id| **id != second["id"]).unwrap();
    let statuses = at_once(
        [
            app.as_key(
                &app.admin_key,
                Method::DELETE,
                &format!("/v1/api-keys/{}", second["id"].as_str().unwrap()),
            ),
            app.as_key(second_key, Method::DELETE, &format!("/v1/api-keys/{first_id}")),
        ]
        .into_iter(),
    )
    .await;
    // The loser is refused as the last owner, or (if it came in after) no longer authenticates.
    assert!(statuses == [204, 409] || statuses == [204, 401], "{statuses:?}");
    let mut working = 0;
    for key in [app.admin_key.as_str(), second_key] {
        if app.call_as(key, Method::GET, "/v1/api-keys", None).await.0 == 200 {
            working += 1;
        }
    }
    assert_eq!(working, 1, "exactly one owner key remains");
}

async fn dump_api_key_hashes(url: &str) -> Vec<String> {
    let db = opsiq::db::Database::connect(url).await.unwrap();
    let rows: Vec<(String,)> = db
        .fetch_all("SELECT key_hash FROM api_keys", Vec::new())
        .await
        .unwrap();
    db.close().await;
    rows.into_iter().map(|r| r.0).collect()
}

async fn tenants_never_see_each_other(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (_, other_key) = app.new_tenant("globex").await;
    app.call(Method::POST, "/v1/actions", Some(refund_action())).await;
    let (_, key) = app
        .call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": "k", "role": "viewer"})),
        )
        .await;
    let key_id = key["id"].as_str().unwrap();

    let as_other = |m: Method, p: String, b: Option<Value>| {
        let k = other_key.clone();
        let app = &app;
        async move { app.call_as(&k, m, &p, b).await }
    };
    for (method, path, body) in [
        (Method::GET, "/v1/actions/refund_invoice".to_string(), None),
        (
            Method::PUT,
            "/v1/actions/refund_invoice".to_string(),
            Some(refund_action()),
        ),
        (Method::DELETE, "/v1/actions/refund_invoice".to_string(), None),
        (
            Method::GET,
            "/v1/actions/refund_invoice/versions".to_string(),
            None,
        ),
        (
            Method::GET,
            "/v1/actions/refund_invoice/versions/1".to_string(),
            None,
        ),
        (Method::GET, format!("/v1/api-keys/{key_id}"), None),
        (Method::DELETE, format!("/v1/api-keys/{key_id}"), None),
    ] {
        let (status, body) = as_other(method.clone(), path.clone(), body).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(error_code(&body), "not_found");
    }
    let (_, list) = as_other(Method::GET, "/v1/actions".into(), None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (_, keys) = as_other(Method::GET, "/v1/api-keys".into(), None).await;
    assert!(!keys.to_string().contains(key_id));
    // The other tenant may use the same action name independently.
    assert_eq!(
        as_other(Method::POST, "/v1/actions".into(), Some(refund_action()))
            .await
            .0,
        201
    );
    let (_, mine) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    assert_eq!(mine["version"], 1);
}

async fn operations_routes(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, body) = read(app.http.get(app.url("/healthz")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = read(app.http.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    app.call(Method::GET, "/v1/actions", None).await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("opsiq_http_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"/v1/actions\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_example_actions_are_valid_and_load() {
    let app = TestApp::on(Backend::Sqlite)
        .with(|raw, _| raw.actions_dir = crate::harness::repo_path("schemas/actions"))
        .start()
        .await;
    let (status, list) = app.call(Method::GET, "/v1/actions", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "create_ticket",
        "escalate_to_human",
        "extend_license",
        "lookup_customer",
        "refund_invoice",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
}

/// Whether `tx` failed: when its last queued statement did (PostgreSQL runs each at once), or
/// else at its commit (SQLite sends deferred statements with it).
async fn ends_in_failure(tx: opsiq::db::Tx, queued: Result<(), sqlx::Error>) -> bool {
    match queued {
        Ok(()) => tx.commit().await.is_err(),
        Err(_) => {
            tx.rollback().await;
            true
        }
    }
}

dual!(write_transactions_leave_nothing_behind_when_they_fail);

/// The storage layer's write transactions: a statement that fails (sent with the commit, or on
/// its own) undoes the whole transaction, nothing more runs in it, and a transaction dropped
/// part way is rolled back before the next write.
async fn write_transactions_leave_nothing_behind_when_they_fail(backend: Backend) {
    let app = TestApp::start(backend).await;
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let insert = "INSERT INTO change_counters (name, version) VALUES ($1, 1)";

    // Deferred statements go with the commit; the duplicate key fails it, and the first is undone.
    let mut tx = db.begin().await.unwrap();
    tx.defer(insert, opsiq::args!["t.a"]).await.unwrap();
    let duplicate = tx.defer(insert, opsiq::args!["t.a"]).await;
    let failed = ends_in_failure(tx, duplicate).await;
    assert!(failed, "a duplicate key must fail the transaction");
    assert_eq!(opsiq::db::counter(&db, "t.a").await.unwrap(), 0);

    // A failed statement ends the transaction's usefulness; dropping it rolls back what it wrote.
    let mut tx = db.begin().await.unwrap();
    tx.execute(insert, opsiq::args!["t.b"]).await.unwrap();
    assert!(tx.execute(insert, opsiq::args!["t.b"]).await.is_err());
    assert!(
        tx.execute(insert, opsiq::args!["t.c"]).await.is_err(),
        "nothing more runs in it"
    );
    drop(tx);
    db.execute(insert, opsiq::args!["t.d"]).await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "t.b").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "t.c").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "t.d").await.unwrap(), 1);
    db.close().await;
}

dual!(long_write_transactions_commit_or_fail_whole);

/// The head of a multi-row insert of change counters, for [`counter_rows`].
const COUNTER_ROWS: &str = "INSERT INTO change_counters (name, version) VALUES";

/// `n` change counters' rows, `<prefix>.<i>` at version `i`.
fn counter_rows(prefix: &str, n: usize) -> Vec<Vec<opsiq::db::Arg>> {
    (0..n)
        .map(|i| opsiq::args![format!("{prefix}.{i}"), i as i64])
        .collect()
}

/// A transaction whose queued statements are too long to send as one cached script (SQLite sends
/// them one by one then): multi-row inserts of odd sizes, a read at the end that sees them all,
/// and a failure in the middle of a later one that undoes everything.
async fn long_write_transactions_commit_or_fail_whole(backend: Backend) {
    let app = TestApp::start(backend).await;
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let (head, rows) = (COUNTER_ROWS, counter_rows);

    let mut tx = db.begin().await.unwrap();
    opsiq::db::insert_rows(&mut tx, head, 2, rows("long", 523))
        .await
        .unwrap();
    opsiq::db::insert_rows(&mut tx, head, 2, rows("more", 37))
        .await
        .unwrap();
    let (count, total): (i64, i64) = tx
        .fetch_optional(
            "SELECT COUNT(*), CAST(SUM(version) AS BIGINT) FROM change_counters WHERE name LIKE $1 OR name LIKE $2",
            opsiq::args!["long.%", "more.%"],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (count, total),
        (560, (0..523).sum::<i64>() + (0..37).sum::<i64>())
    );
    tx.commit().await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "long.522").await.unwrap(), 522);

    // The 477th row repeats a committed name: the whole transaction goes.
    let mut failing = rows("fresh", 476);
    failing.push(opsiq::args!["long.5", 1i64]);
    failing.extend(rows("later", 40));
    let mut tx = db.begin().await.unwrap();
    let queued = opsiq::db::insert_rows(&mut tx, head, 2, failing).await;
    let failed = ends_in_failure(tx, queued).await;
    assert!(failed, "a duplicate key must fail the transaction");
    assert_eq!(opsiq::db::counter(&db, "fresh.0").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "later.39").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "long.5").await.unwrap(), 5);

    // A name repeated within one transaction, rows apart (in different statements), fails it too.
    let mut repeated = rows("twice", 60);
    repeated.push(opsiq::args!["twice.3", 1i64]);
    let mut tx = db.begin().await.unwrap();
    let queued = opsiq::db::insert_rows(&mut tx, head, 2, repeated).await;
    assert!(
        ends_in_failure(tx, queued).await,
        "a key repeated in one transaction fails it"
    );
    assert_eq!(opsiq::db::counter(&db, "twice.0").await.unwrap(), 0);
    db.close().await;
}

dual!(write_transactions_count_read_and_fail_the_same_whatever_carries_them);

/// What a write transaction reports does not depend on how its statements travel (on SQLite,
/// run directly by the task holding the writer, or through sqlx when they read typed rows, bind
/// many arguments or hold two statements in one): a statement's changed rows are its own even
/// right after `BEGIN`, `fetch_texts` returns `RETURNING` values, reads see the transaction's
/// earlier writes, a unique violation is one, and a failure leaves nothing behind.
async fn write_transactions_count_read_and_fail_the_same_whatever_carries_them(backend: Backend) {
    let sqlite = matches!(backend, Backend::Sqlite);
    let app = TestApp::start(backend).await;
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let (head, rows) = (COUNTER_ROWS, counter_rows);

    let mut tx = db.begin().await.unwrap();
    let three = tx
        .execute(
            "INSERT INTO change_counters (name, version) VALUES ($1, 1), ($2, 2), ($3, 3)",
            opsiq::args!["c.1", "c.2", "c.3"],
        )
        .await
        .unwrap();
    assert_eq!(three, 3);
    tx.commit().await.unwrap();

    // A count is the statement's own, not the last one SQLite kept from an earlier statement.
    let mut tx = db.begin().await.unwrap();
    let none = tx
        .execute(
            "UPDATE change_counters SET version = version + 1 WHERE name = $1",
            opsiq::args!["c.none"],
        )
        .await
        .unwrap();
    assert_eq!(none, 0, "an update that matched nothing changed nothing");
    tx.defer(
        "UPDATE change_counters SET version = version + 10 WHERE name = $1",
        opsiq::args!["c.1"],
    )
    .await
    .unwrap();
    let mut moved = tx
        .fetch_texts(
            "UPDATE change_counters SET version = version + 100 WHERE name IN ($1, $2, $3) RETURNING name",
            opsiq::args!["c.1", "c.2", "c.none"],
        )
        .await
        .unwrap();
    moved.sort();
    assert_eq!(moved, ["c.1", "c.2"]);
    // A typed read, then more writes and the commit, in the same transaction.
    let (seen,): (i64,) = tx
        .fetch_optional(
            "SELECT version FROM change_counters WHERE name = $1",
            opsiq::args!["c.1"],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen, 111,
        "a read sees the transaction's own deferred and direct writes"
    );
    opsiq::db::insert_rows(&mut tx, head, 2, rows("after", 3))
        .await
        .unwrap();
    let two = tx
        .execute(
            "UPDATE change_counters SET version = 0 WHERE name IN ($1, $2)",
            opsiq::args!["after.1", "after.2"],
        )
        .await
        .unwrap();
    assert_eq!(two, 2);
    tx.commit().await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "c.1").await.unwrap(), 111);
    assert_eq!(opsiq::db::counter(&db, "c.2").await.unwrap(), 102);
    assert_eq!(opsiq::db::counter(&db, "after.0").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "after.2").await.unwrap(), 0);

    // A transaction binding thousands of arguments (on SQLite, too many to run directly).
    let mut tx = db.begin().await.unwrap();
    opsiq::db::insert_rows(&mut tx, head, 2, rows("many", 1500))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "many.1499").await.unwrap(), 1499);

    // Returned texts of a statement binding thousands of arguments (on SQLite, through sqlx),
    // and a value that is not text, refused.
    let names: Vec<opsiq::db::Arg> = (0..2100).map(|i| format!("many.{i}").into()).collect();
    let sql = format!(
        "UPDATE change_counters SET version = version + 1 WHERE name IN ({}) RETURNING name",
        opsiq::db::in_list(names.len())
    );
    let mut tx = db.begin().await.unwrap();
    let bumped = tx.fetch_texts(sqlx::AssertSqlSafe(sql), names).await.unwrap();
    assert_eq!(bumped.len(), 1500);
    assert!(bumped.iter().any(|name| name == "many.1499"));
    let not_text = tx
        .fetch_texts(
            "SELECT version FROM change_counters WHERE name = $1",
            opsiq::args!["many.0"],
        )
        .await;
    assert!(not_text.is_err(), "an integer read as text: {not_text:?}");
    tx.rollback().await;
    assert_eq!(opsiq::db::counter(&db, "many.1499").await.unwrap(), 1499);

    // More distinct statements than are kept prepared, in one transaction and the next.
    for round in 0..2 {
        let mut tx = db.begin().await.unwrap();
        for i in 0..300 {
            let sql = format!("INSERT INTO change_counters (name, version) VALUES ($1, {i})");
            tx.defer(
                sqlx::AssertSqlSafe(sql),
                opsiq::args![format!("distinct.{round}.{i}")],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        assert_eq!(
            opsiq::db::counter(&db, &format!("distinct.{round}.299"))
                .await
                .unwrap(),
            299
        );
    }

    if sqlite {
        // Two statements in one deferred part: sent through sqlx, both run.
        let mut tx = db.begin().await.unwrap();
        tx.defer(
            "INSERT INTO change_counters (name, version) VALUES ($1, 1); \
             INSERT INTO change_counters (name, version) VALUES ($2, 2)",
            opsiq::args!["pair.1", "pair.2"],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(opsiq::db::counter(&db, "pair.2").await.unwrap(), 2);
    }

    // A unique violation is reported as one, and the transaction's writes go with it.
    let mut tx = db.begin().await.unwrap();
    tx.defer(
        "INSERT INTO change_counters (name, version) VALUES ($1, 1)",
        opsiq::args!["gone.1"],
    )
    .await
    .unwrap();
    let duplicate = tx
        .fetch_texts(
            "INSERT INTO change_counters (name, version) VALUES ($1, 1) RETURNING name",
            opsiq::args!["c.3"],
        )
        .await
        .expect_err("the name is taken");
    assert!(
        opsiq::db::DbError::from(duplicate).is_unique_violation(),
        "a duplicate key is a unique violation"
    );
    tx.rollback().await;
    assert_eq!(opsiq::db::counter(&db, "gone.1").await.unwrap(), 0);
    assert_eq!(opsiq::db::counter(&db, "c.3").await.unwrap(), 3);
    db.close().await;
}

/// A fresh SQLite database file, opened, in a temporary directory (kept while the first value
/// lives).
async fn sqlite_in_a_temporary_directory() -> (tempfile::TempDir, std::path::PathBuf, opsiq::db::Database) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsiq.db");
    let db = opsiq::db::Database::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    (dir, path, db)
}

/// A write that finds SQLite's write lock held by another connection waits for it without
/// holding up the runtime (the wait is sqlx's thread's, not the task's), and then succeeds. The
/// test runs on a single-threaded runtime, which a write waiting on its thread would stall.
#[tokio::test]
async fn a_sqlite_write_waiting_for_another_writer_leaves_the_runtime_free() {
    use sqlx::{ConnectOptions, Connection, Executor};
    let (_dir, path, db) = sqlite_in_a_temporary_directory().await;
    let insert = "INSERT INTO change_counters (name, version) VALUES ($1, 1)";
    // Written once first, so the writer is in its usual state (statements run directly).
    let mut tx = db.begin().await.unwrap();
    tx.defer(insert, opsiq::args!["first"]).await.unwrap();
    tx.commit().await.unwrap();

    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    other.execute("BEGIN IMMEDIATE").await.unwrap();
    other
        .execute("INSERT INTO change_counters (name, version) VALUES ('other', 1)")
        .await
        .unwrap();

    let writes = db.clone();
    let write = tokio::spawn(async move {
        let mut tx = writes.begin().await?;
        tx.defer(insert, opsiq::args!["second"]).await?;
        tx.commit().await
    });
    let started = std::time::Instant::now();
    // The spawned write runs at the first yield; a timer that fires on time shows the runtime's
    // one thread was not held by it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the runtime was held for {:?} while a write waited for the lock",
        started.elapsed()
    );
    assert!(
        !write.is_finished(),
        "the write cannot finish while the other writer holds the lock"
    );

    other.execute("COMMIT").await.unwrap();
    write.await.unwrap().unwrap();
    assert_eq!(opsiq::db::counter(&db, "other").await.unwrap(), 1);
    assert_eq!(opsiq::db::counter(&db, "second").await.unwrap(), 1);
    let _ = other.close().await;
    db.close().await;
}

/// The writer connection closes cleanly (SQLite deletes the WAL at the last close) whether it
/// was last lent to sqlx (`close` checkpoints through it) or in direct use when dropped: the
/// statements kept prepared for direct use are finalized first, which closing needs.
#[tokio::test]
async fn the_sqlite_writer_closes_cleanly_after_direct_and_sqlx_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsiq.db");
    let url = format!("sqlite://{}", path.display());
    let wal = dir.path().join("opsiq.db-wal");
    let insert = "INSERT INTO change_counters (name, version) VALUES ($1, 1)";
    for (round, closed_first) in [(0, true), (1, false)] {
        let db = opsiq::db::Database::connect(&url).await.unwrap();
        // An autocommit statement (through sqlx), then transactions (direct, the last use).
        db.execute(insert, opsiq::args![format!("single.{round}")])
            .await
            .unwrap();
        for i in 0..3 {
            let mut tx = db.begin().await.unwrap();
            tx.defer(insert, opsiq::args![format!("direct.{round}.{i}")])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        assert!(wal.exists(), "an open database in WAL mode has its WAL");
        if closed_first {
            db.close().await;
        }
        drop(db);
        crate::harness::wait_until(Duration::from_secs(30), || async { !wal.exists() }).await;
    }
    let db = opsiq::db::Database::connect(&url).await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "direct.1.2").await.unwrap(), 1);
    assert_eq!(opsiq::db::counter(&db, "single.0").await.unwrap(), 1);
    db.close().await;

    // An in-memory database (shared cache, written through sqlx alone) takes writes too.
    let db = opsiq::db::Database::connect("sqlite::memory:").await.unwrap();
    let mut tx = db.begin().await.unwrap();
    tx.defer(insert, opsiq::args!["memory"]).await.unwrap();
    tx.commit().await.unwrap();
    db.execute(insert, opsiq::args!["memory.single"]).await.unwrap();
    assert_eq!(opsiq::db::counter(&db, "memory").await.unwrap(), 1);
    assert_eq!(opsiq::db::counter(&db, "memory.single").await.unwrap(), 1);
    db.close().await;
}

/// SQLite commits do not checkpoint (that would make a commit wait for two fsyncs): a task of
/// its own copies committed pages into the database file, and the WAL is reused from its start
/// instead of growing.
#[tokio::test]
async fn sqlite_checkpoints_in_the_background_and_reuses_the_wal() {
    use sqlx::{ConnectOptions, Connection};
    let (dir, path, db) = sqlite_in_a_temporary_directory().await;
    db.execute(
        "INSERT INTO change_counters (name, version) VALUES ($1, 7)",
        opsiq::args!["checkpointed"],
    )
    .await
    .unwrap();

    // An immutable connection reads the database file alone, ignoring the WAL.
    let file_only = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .immutable(true)
        .read_only(true);
    let in_file = |name: String, version: i64| {
        let file_only = file_only.clone();
        async move {
            let mut conn = file_only.connect().await.unwrap();
            // Until the first checkpoint even the tables are only in the WAL.
            let found: Option<i64> =
                sqlx::query_scalar("SELECT version FROM change_counters WHERE name = $1")
                    .bind(&name)
                    .fetch_optional(&mut conn)
                    .await
                    .ok()
                    .flatten();
            let _ = conn.close().await;
            found == Some(version)
        }
    };
    crate::harness::wait_until(Duration::from_secs(30), || in_file("checkpointed".into(), 7)).await;

    // 40 MiB in 4 MiB steps, each waited for until it is in the file: once a checkpoint has
    // copied the whole WAL, the next commit writes it from the start again.
    let chunk = "x".repeat(256 * 1024);
    for i in 0..160 {
        db.execute(
            "INSERT INTO change_counters (name, version) VALUES ($1, length($2))",
            opsiq::args![format!("bulk-{i}"), &chunk],
        )
        .await
        .unwrap();
        if i % 16 == 15 {
            crate::harness::wait_until(Duration::from_secs(30), || {
                in_file(format!("bulk-{i}"), chunk.len() as i64)
            })
            .await;
        }
    }
    let wal = dir.path().join("opsiq.db-wal");
    let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(
        wal_bytes < 20 * 1024 * 1024,
        "40 MiB were committed but the WAL holds {wal_bytes} bytes: it is not reused"
    );
    db.close().await;
}

/// PostgreSQL drops every connection the server holds (a restart, a failover, an idle
/// timeout): the requests that follow still succeed, on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_after_postgres_drops_every_connection() {
    use sqlx::Connection;
    let Some(backend) = Backend::postgres("requests_succeed_after_postgres_drops_every_connection") else {
        return;
    };
    let app = TestApp::start(backend).await;
    let endpoint = json!({"url": "https://hooks.example.com/x", "event_types": ["none.*"]});
    let (status, _) = app
        .call(Method::POST, "/v1/endpoints", Some(endpoint.clone()))
        .await;
    assert_eq!(status, 201);

    let mut admin = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    terminate_server_connections(&mut admin).await;
    // The scenario, not a wait for a condition: the pool's connections sit idle past the
    // point where they are checked before use (one second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    for i in 0..20 {
        let (status, body) = app
            .call(
                Method::POST,
                "/v1/events",
                Some(json!({"type": "invoice.updated", "data": {"n": i}})),
            )
            .await;
        assert_eq!(status, 202, "event {i}: {body}");
        let (status, body) = app.call(Method::GET, "/v1/endpoints", None).await;
        assert_eq!(status, 200, "list {i}: {body}");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    }
}

/// Has PostgreSQL end every connection to the test database but `admin`'s own.
async fn terminate_server_connections(admin: &mut sqlx::PgConnection) {
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(admin)
    .await
    .unwrap();
    assert!(!dropped.is_empty(), "the server held connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_connections_postgres_just_dropped_are_refused_retryably() {
    use sqlx::Connection;
    let Some(backend) =
        Backend::postgres("requests_on_connections_postgres_just_dropped_are_refused_retryably")
    else {
        return;
    };
    let app = TestApp::start(backend).await;
    let mut admin = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let mut refusals = 0;
    let mut accepted = 0;
    // A connection idle for over a second is pinged (and replaced) before use, so a stall on a
    // busy machine can hide the dead ones; a few rounds make sure some request meets one.
    for round in 0..5 {
        // Warm the pool with several connections, all of which PostgreSQL then drops.
        let warm = (0..8).map(|_| app.call(Method::GET, "/v1/endpoints", None));
        for (status, body) in futures_util::future::join_all(warm).await {
            assert_eq!(status, 200, "{body}");
        }
        terminate_server_connections(&mut admin).await;

        // At once: a request may land on a dead connection. It is then a 503 the client can
        // retry with its key, never a 500, and the retries record each event exactly once.
        for i in 0..8 {
            let key = format!("dropped-{round}-{i}");
            let mut event_id = None;
            for _ in 0..20 {
                let resp = app
                    .admin(Method::POST, "/v1/events")
                    .header("Idempotency-Key", &key)
                    .json(&json!({"type": "invoice.updated", "data": {"n": i}}))
                    .send()
                    .await
                    .unwrap();
                let retry_after = resp.headers().get("retry-after").cloned();
                let (status, body) = read(resp).await;
                match status {
                    202 => {
                        event_id = Some(body["event_id"].as_str().unwrap().to_string());
                        break;
                    }
                    503 => {
                        assert_eq!(error_code(&body), "unavailable", "{body}");
                        assert!(retry_after.is_some(), "a 503 says when to retry");
                        refusals += 1;
                    }
                    other => panic!("round {round}, event {i}: {other} {body}"),
                }
            }
            assert!(event_id.is_some(), "round {round}, event {i} accepted on a retry");
            accepted += 1;
        }
        if refusals > 0 {
            break;
        }
    }
    assert!(refusals > 0, "no request met a dropped connection in five rounds");
    let (status, body) = app.call(Method::GET, "/v1/events?limit=100", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"].as_array().map(Vec::len),
        Some(accepted),
        "each event once: {body}"
    );
}

/// Whether an answer came from the router's fallbacks (no such route, or not that method)
/// rather than from a handler.
fn unrouted(status: u16, body: &Value) -> bool {
    let message = body["error"]["message"].as_str().unwrap_or("");
    (status == 404 && message == "no such route")
        || (status == 405 && message == "this route does not accept that method")
}

/// The paths of every `.route("…", …)` in the Rust sources under `dir`.
fn declared_routes(dir: &std::path::Path) -> Vec<String> {
    let mut routes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            routes.extend(declared_routes(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices(".route(") {
                let rest = text[at + ".route(".len()..].trim_start();
                if let Some(quoted) = rest.strip_prefix('"') {
                    let end = quoted.find('"').unwrap();
                    routes.push(quoted[..end].to_string());
                }
            }
        }
    }
    routes
}

/// Every `$ref` in `value` that does not resolve within `doc`.
fn dangling_refs(doc: &Value, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                let resolves = target
                    .strip_prefix('#')
                    .is_some_and(|pointer| doc.pointer(pointer).is_some());
                if !resolves {
                    out.push(target.clone());
                }
            }
            map.values().for_each(|v| dangling_refs(doc, v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| dangling_refs(doc, v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_only_routes_the_server_serves() {
    let app = TestApp::start(Backend::Sqlite).await;
    let resp = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut dangling = Vec::new();
    dangling_refs(&doc, &doc, &mut dangling);
    assert!(dangling.is_empty(), "unresolved references: {dangling:?}");

    // The probe tells a missing route from a handler's own 404 and 405.
    let probe = |method: Method, path: &str| {
        let req = app.admin(method.clone(), path);
        let req = if [Method::POST, Method::PUT, Method::PATCH].contains(&method) {
            req.json(&json!({}))
        } else {
            req
        };
        async move { read(req.send().await.unwrap()).await }
    };
    let (status, body) = probe(Method::GET, "/v1/no-such-thing").await;
    assert!(unrouted(status, &body), "{status} {body}");
    let (status, body) = probe(Method::PATCH, "/v1/actions").await;
    assert!(unrouted(status, &body), "{status} {body}");
    let (status, body) = probe(Method::GET, "/v1/actions/doc-probe").await;
    assert!(!unrouted(status, &body), "{status} {body}");

    let paths = doc["paths"].as_object().expect("paths");
    // And the other way: every route the source declares is documented.
    let declared = declared_routes(&crate::harness::repo_path("src"));
    assert!(declared.len() >= 40, "found only {declared:?}");
    for route in declared {
        assert!(
            paths.contains_key(&route),
            "{route} is served but not in schemas/openapi.json"
        );
    }

    let mut operation_ids = std::collections::HashSet::new();
    assert!(paths.len() >= 40, "{} paths", paths.len());
    for (path, operations) in paths {
        let concrete = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "doc-probe" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for (method, operation) in operations.as_object().expect("operations") {
            let id = operation["operationId"].as_str().expect("operationId");
            assert!(operation_ids.insert(id.to_string()), "operationId {id} twice");
            assert!(
                operation["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} lists no responses"
            );
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = probe(method.clone(), &concrete).await;
            assert!(
                !unrouted(status, &body),
                "{method} {path} is documented but not served: {status} {body}"
            );
            assert!(status < 500, "{method} {concrete}: {status} {body}");
            assert!(
                operation["responses"].get(status.to_string()).is_some(),
                "{method} {concrete} answered {status}, which the document does not list: {body}"
            );
        }
    }
}

/// Reads one HTTP/1.1 response head (up to the blank line) from `stream`, within 30 s.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(30), async {
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "the connection closed");
            head.push(byte[0]);
        }
    })
    .await
    .expect("a response head within 30 s");
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// An answer given before the request's body was read says the connection closes, so a client
/// does not reuse it and find it gone; one whose body was read keeps the connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_closes_the_connection_and_says_so() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::start(Backend::Sqlite).await;
    let address = app.base.trim_start_matches("http://").to_string();
    let body = r#"{"name": "read_first"}"#;

    // Refused by its token, with the body still to come.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/endpoints HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer not-a-key\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut stream).await;
    assert!(answer.starts_with("http/1.1 401"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");

    // A Content-Length of 00 is no body: nothing is left unread.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {address}\r\ncontent-length: 00\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_head(&mut stream).await;
    assert!(
        answer.starts_with("http/1.1 200") && !answer.contains("connection: close"),
        "{answer}"
    );

    // Read, and answered: the connection serves the next request too.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    for _ in 0..2 {
        let request = format!(
            "POST /v1/endpoints HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            app.admin_key,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_head(&mut stream).await;
        assert!(answer.starts_with("http/1.1 422"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");
        use tokio::io::AsyncReadExt;
        let length: usize = answer
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.trim().parse().ok())
            .expect("a content-length");
        let mut rest = vec![0u8; length];
        stream.read_exact(&mut rest).await.unwrap();
    }
}

/// Writes `head` (and nothing more) on a new connection to `app` and returns what the server
/// sends before it closes the connection, or `None` if it keeps it open past `wait`.
async fn send_and_stall(app: &TestApp, head: String, wait: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    read.ok().map(|_| String::from_utf8_lossy(&answer).into_owned())
}

/// A client that trickles a request is cut off at `read_timeout`: the headers' deadline closes
/// the connection, the body's answers 408; a stranger's stalled body is not even waited for.
/// None of them keeps the one request slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_too_slowly_are_cut_off() {
    let app = TestApp::on(Backend::Sqlite)
        .with(|raw, _| {
            raw.read_timeout = "1s".into();
            raw.max_requests_in_flight = 1;
        })
        .start()
        .await;
    // Far past the deadline: a connection still open then was not cut off.
    let generous = Duration::from_secs(30);
    let slot_is_free = || async {
        let (status, body) = app.call(Method::GET, "/v1/actions", None).await;
        assert_eq!(status, 200, "{body}");
    };
    let headers_only = send_and_stall(&app, "POST /v1/events HTTP/1.1\r\nHost: x\r\n".into(), generous).await;
    assert_eq!(headers_only.as_deref(), Some(""), "closed without an answer");
    slot_is_free().await;

    let body = r#"{"type": "invoice.paid", "data""#;
    let admin_body = send_and_stall(
        &app,
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{body}",
            app.admin_key
        ),
        generous,
    )
    .await
    .expect("the connection was closed");
    assert!(
        admin_body.starts_with("HTTP/1.1 408") && admin_body.contains("\"request_timeout\""),
        "{admin_body}"
    );
    slot_is_free().await;

    let stranger_mcp = send_and_stall(
        &app,
        format!(
            "POST /mcp HTTP/1.1\r\nHost: x\r\nAccept: application/json, text/event-stream\r\n\
             Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{body}"
        ),
        generous,
    )
    .await
    .expect("the connection was closed");
    assert!(stranger_mcp.starts_with("HTTP/1.1 401"), "{stranger_mcp}");
    slot_is_free().await;
}
