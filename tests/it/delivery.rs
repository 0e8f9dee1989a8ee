//! Signed delivery: endpoints, signatures on the wire, retries, the delivery log, replay and
//! recover, secret rotation, the SSRF guard and retention.

use std::collections::HashSet;
use std::time::Duration;

use opsiq::config::RawConfig;
use opsiq::delivery::verify;
use reqwest::Method;
use serde_json::{Value, json};

use crate::dual;
use crate::harness::{
    Backend, TestApp, assert_error, at_once, delete_checks_version, details, error_code, eventually, read,
    wait_until,
};
use crate::receiver::Receiver;

/// Loopback delivery allowed and a compressed retry schedule.
pub fn fast_delivery(raw: &mut RawConfig, _: &std::path::Path) {
    raw.dev = true;
    raw.retry_schedule = "200ms,200ms,200ms".into();
    raw.poll_interval = "50ms".into();
}

/// [`fast_delivery`] with a single retry after 100 ms.
fn one_quick_retry(raw: &mut RawConfig, dir: &std::path::Path) {
    fast_delivery(raw, dir);
    raw.retry_schedule = "100ms".into();
}

/// Creates an endpoint and returns (id, secret).
pub async fn endpoint(app: &TestApp, url: &str, extra: Value) -> (String, String) {
    let mut body = json!({"url": url, "description": "test"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let (status, ep) = app.call(Method::POST, "/v1/endpoints", Some(body)).await;
    assert_eq!(status, 201, "{ep}");
    (
        ep["id"].as_str().unwrap().to_string(),
        ep["secret"].as_str().unwrap().to_string(),
    )
}

/// Sends an event and returns its id.
pub async fn send_event(app: &TestApp, event_type: &str, data: Value) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": event_type, "data": data})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["event_id"].as_str().unwrap().to_string()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn headers_of(r: &crate::receiver::Received) -> Vec<(String, String)> {
    r.headers.clone()
}

dual!(
    signing_vectors_through_the_api,
    an_event_arrives_signed_with_every_header,
    endpoints_crud_secrets_and_isolation,
    event_ingestion_is_idempotent,
    a_delivery_life_retries_then_gives_up,
    retry_after_is_honoured,
    gone_disables_the_endpoint,
    replay_and_recover,
    rotation_overlap,
    redirects_are_not_followed,
    ssrf_guard_without_dev,
    retention_purges_old_deliveries,
    preview_and_test_send,
    standard_webhooks_scheme,
    action_client_errors_are_final_but_event_ones_retry,
    an_answer_with_many_headers_is_still_an_answer,
);

async fn signing_vectors_through_the_api(backend: Backend) {
    let app = TestApp::start(backend).await;
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(crate::harness::repo_path("tests/fixtures/signing-vectors.json")).unwrap(),
    )
    .unwrap();
    for case in vectors["cases"].as_array().unwrap() {
        let body = json!({
            "secrets": case["secrets"],
            "request_target": case["request_target"],
            "headers": case["headers"],
            "body": case["body"],
            "now": case["now"],
        });
        let (status, got) = app.call(Method::POST, "/v1/signatures/verify", Some(body)).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["valid"], case["valid"], "{}: {got}", case["name"]);
        if case["valid"] == false {
            assert_eq!(got["reason"], case["reason"], "{}", case["name"]);
        }
    }
    // A request the check cannot be asked about is pointed out, not answered `valid: false`.
    let case = &vectors["cases"][0];
    let mut headers = case["headers"].clone();
    headers["X-OpsIQ-Timestamp"] = json!(5);
    for (change, path) in [
        (json!({"secrets": [], "secret": " "}), "/secret"),
        (json!({"secrets": ["whsec_x", ""]}), "/secrets/1"),
        (json!({"headers": headers}), "/headers/X-OpsIQ-Timestamp"),
    ] {
        let mut body = json!({
            "secrets": case["secrets"],
            "request_target": case["request_target"],
            "headers": case["headers"],
            "body": case["body"],
            "now": case["now"],
        });
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, got) = app.call(Method::POST, "/v1/signatures/verify", Some(body)).await;
        assert_eq!((status, details(&got, "path")), (422, vec![path]), "{got}");
    }
}

async fn an_event_arrives_signed_with_every_header(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    // An answer with a NUL in it is logged (PostgreSQL's text cannot hold a NUL as it is).
    rx.answer(|_, _| (200, vec![], "ok\u{0}done".into()));
    let (endpoint_id, secret) = endpoint(&app, &rx.url("/hooks/opsiq?tenant=acme&v=2"), json!({})).await;
    let data =
        json!({"invoice_id": "in_123", "amount": 4200, "currency": "eur", "note": "Zahlung – prüfen ✓"});
    let event_id = send_event(&app, "invoice.paid", data.clone()).await;

    let got = rx.wait_for(1).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/hooks/opsiq?tenant=acme&v=2");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("OpsIQ-Webhooks/"));
    let delivery_id = r.header("x-opsiq-id").unwrap();
    assert!(delivery_id.starts_with("dlv_"));
    assert_eq!(r.header("x-opsiq-event"), Some("invoice.paid"));
    assert_eq!(r.header("x-opsiq-attempt"), Some("1"));
    assert!(r.header("x-opsiq-nonce").is_some());
    assert!(r.header("idempotency-key").is_some());
    let ts: i64 = r.header("x-opsiq-timestamp").unwrap().parse().unwrap();
    assert!((now_secs() - ts).abs() < 60);
    let body = r.json();
    assert_eq!(body["id"], event_id.as_str());
    assert_eq!(body["type"], "invoice.paid");
    assert_eq!(body["data"], data);
    assert!(body["created_at"].is_string());

    // The signature holds over the raw bytes, the path and the query, with the endpoint's secret.
    let headers = headers_of(r);
    let verifier = verify::Verifier::new([secret.clone()]);
    verifier
        .verify(headers.as_slice(), &r.target, &r.body, now_secs())
        .expect("signature verifies");
    assert_eq!(
        verifier
            .verify(headers.as_slice(), &r.target, &r.body, now_secs())
            .unwrap_err()
            .reason(),
        "duplicate_nonce"
    );
    assert!(
        verify::verify_opsiq_v1(
            &[secret.as_str()],
            headers.as_slice(),
            "/hooks/other",
            &r.body,
            now_secs()
        )
        .is_err()
    );

    // The log shows the delivery and its attempt with the exact request.
    let path = format!("/v1/deliveries/{delivery_id}");
    let log = eventually(Duration::from_secs(30), || async {
        let log = app.call(Method::GET, &path, None).await.1;
        (log["status"] == "succeeded").then_some(log)
    })
    .await;
    assert_eq!(log["endpoint_id"], endpoint_id.as_str());
    assert_eq!(log["event_id"], event_id.as_str());
    assert!(log["last_error"].is_null(), "a success is no error: {log}");
    let attempt = &log["attempts_log"][0];
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["response"]["status"], 200);
    assert_eq!(attempt["response"]["body"], "ok\u{FFFD}done");
    assert_eq!(
        attempt["request"]["body"],
        String::from_utf8(r.body.to_vec()).unwrap()
    );
    // Every header the receiver got is in the log, as it got it: the client's own ones too.
    let logged = attempt["request"]["headers"].as_object().unwrap();
    for (name, value) in &r.headers {
        assert_eq!(
            logged.get(name.as_str()),
            Some(&json!(value)),
            "{name} in {logged:?}"
        );
    }
    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{event_id}"), None)
        .await;
    assert_eq!(event["deliveries"][0]["id"], delivery_id);
    let (_, list) = app
        .call(
            Method::GET,
            "/v1/deliveries?status=succeeded&event_type=invoice.paid",
            None,
        )
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

async fn endpoints_crud_secrets_and_isolation(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let (status, created) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://example.com/hook", "event_types": ["invoice.*"], "rate_limit_per_s": 5})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(id.starts_with("ep_"));
    assert!(secret.starts_with("whsec_"));
    assert_eq!(created["signature_scheme"], "opsiq-v1");
    let (_, got) = app.call(Method::GET, &format!("/v1/endpoints/{id}"), None).await;
    assert!(got.get("secret").is_none(), "reads never show the secret");
    let (_, shown) = app
        .call(Method::GET, &format!("/v1/endpoints/{id}/secret"), None)
        .await;
    assert_eq!(shown["secret"], secret);

    let (status, patched) = app
        .call(
            Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"enabled": false, "rate_limit_per_s": null})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["enabled"], false);
    assert_eq!(patched["rate_limit_per_s"], Value::Null);
    assert_eq!(patched["event_types"], json!(["invoice.*"]));

    for bad in [
        json!({"url": "ftp://example.com"}),
        json!({"url": "not a url"}),
        json!({"url": "https://example.com", "event_types": ["in voice"]}),
        json!({"url": "https://example.com", "rate_limit_per_s": 0}),
        json!({"url": "https://example.com", "signature_scheme": "md5"}),
        json!({"url": "https://example.com", "secret": "plaintext"}),
        json!({}),
    ] {
        let (status, body) = app.call(Method::POST, "/v1/endpoints", Some(bad.clone())).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }

    // Secrets are encrypted at rest: the plaintext is nowhere in the row.
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let rows: Vec<(String,)> = db
        .fetch_all("SELECT secret_enc FROM endpoints", vec![])
        .await
        .unwrap();
    db.close().await;
    assert!(rows.iter().all(|(enc,)| !enc.contains(&secret[6..])));

    // Another tenant sees none of it.
    let (_, other) = app.new_tenant("globex").await;
    for (m, p) in [
        (Method::GET, format!("/v1/endpoints/{id}")),
        (Method::PATCH, format!("/v1/endpoints/{id}")),
        (Method::DELETE, format!("/v1/endpoints/{id}")),
        (Method::GET, format!("/v1/endpoints/{id}/secret")),
        (Method::POST, format!("/v1/endpoints/{id}/rotate-secret")),
        (Method::POST, format!("/v1/endpoints/{id}/test")),
    ] {
        let body = (m == Method::PATCH).then(|| json!({"enabled": true}));
        let (status, resp) = app.call_as(&other, m.clone(), &p, body).await;
        assert_eq!(status, 404, "{m} {p}: {resp}");
    }
    let (status, _) = app
        .call_as(
            &other,
            Method::POST,
            &format!("/v1/endpoints/{id}/recover"),
            Some(json!({"since": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 404);
    let (_, list) = app.call_as(&other, Method::GET, "/v1/endpoints", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);

    assert_eq!(
        app.call(Method::DELETE, &format!("/v1/endpoints/{id}"), None)
            .await
            .0,
        204
    );
    assert_eq!(
        app.call(Method::GET, &format!("/v1/endpoints/{id}"), None)
            .await
            .0,
        404
    );
}

async fn event_ingestion_is_idempotent(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    endpoint(&app, &rx.url("/a"), json!({"event_types": ["ticket.*"]})).await;
    endpoint(&app, &rx.url("/b"), json!({"event_types": ["invoice.paid"]})).await;
    let send = |key: &'static str, data: Value| {
        let app = &app;
        async move {
            let resp = app
                .admin(Method::POST, "/v1/events")
                .header("Idempotency-Key", key)
                .json(&json!({"type": "ticket.updated", "data": data}))
                .send()
                .await
                .unwrap();
            crate::harness::read(resp).await
        }
    };
    let (s1, first) = send("k-1", json!({"ticket_id": "t1"})).await;
    let (s2, second) = send("k-1", json!({"ticket_id": "t1"})).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["event_id"], second["event_id"]);
    assert_eq!(first["deliveries"], 1, "only the ticket.* endpoint subscribes");
    let (s3, conflict) = send("k-1", json!({"ticket_id": "t2"})).await;
    assert_eq!(s3, 409);
    assert_eq!(error_code(&conflict), "idempotency_conflict");
    // Numbers are their values, however spelled: 7.0 and -0.0 repeat 7 and 0.
    let (_, counted) = send("k-7", json!({"ticket_id": "t7", "n": [7, 0]})).await;
    let respelled: Value = serde_json::from_str(r#"{"ticket_id": "t7", "n": [7.0, -0.0]}"#).unwrap();
    let (status, again) = send("k-7", respelled).await;
    assert_eq!(
        (status, &again["event_id"]),
        (202, &counted["event_id"]),
        "{again}"
    );
    let (status, _) = send("k-7", json!({"ticket_id": "t7", "n": [7.5, 0]})).await;
    assert_eq!(status, 409);
    // A key is visible ASCII: a tab or a space inside it is refused, not stored.
    for bad in ["k\t1", "k 1"] {
        let (status, body) = send(bad, json!({"ticket_id": "t1"})).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_idempotency_key"),
            "{bad:?}"
        );
    }
    // Two keys: which one counts would be a guess.
    let resp = app
        .admin(Method::POST, "/v1/events")
        .header("Idempotency-Key", "k-1")
        .header("Idempotency-Key", "k-9")
        .json(&json!({"type": "ticket.updated", "data": {"ticket_id": "t1"}}))
        .send()
        .await
        .unwrap();
    let (status, body) = crate::harness::read(resp).await;
    assert_error((status, &body), 400, "invalid_idempotency_key", "not several");

    // Concurrent duplicates still make one event.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, url, key) = (app.http.clone(), app.url("/v1/events"), app.admin_key.clone());
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", "k-2")
                .json(&json!({"type": "ticket.updated", "data": {"ticket_id": "t3"}}))
                .send()
                .await
                .unwrap();
            crate::harness::read(resp).await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 202, "{body}");
        ids.insert(body["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    rx.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 3, "one delivery per distinct event");

    // A developer key may send events; a viewer may not.
    let dev = app.key_with_role("developer").await;
    let viewer = app.key_with_role("viewer").await;
    let body =
        json!({"type": "customer.signed_up", "data": {"customer_id": "c1", "email": "c1@example.com"}});
    assert_eq!(
        app.call_as(&dev, Method::POST, "/v1/events", Some(body.clone()))
            .await
            .0,
        202
    );
    assert_eq!(
        app.call_as(&viewer, Method::POST, "/v1/events", Some(body))
            .await
            .0,
        403
    );
    // Whatever it sends: a viewer learns nothing of the body's rules.
    assert_eq!(
        app.call_as(&viewer, Method::POST, "/v1/events", Some(json!({})))
            .await
            .0,
        403
    );
    for bad in [
        json!({"type": "bad type", "data": {}}),
        json!({"type": "x.y", "data": [1]}),
        json!({"type": "x.y"}),
        json!({"type": "delivery.failed", "data": {"delivery_id": "d", "endpoint_id": "e"}}),
        json!({"type": "Delivery.Failed", "data": {}}),
        json!({"type": "opsiq.test", "data": {}}),
        json!({"type": "x.y", "data": {}, "id": "a b"}),
    ] {
        assert_eq!(
            app.call(Method::POST, "/v1/events", Some(bad.clone())).await.0,
            422,
            "{bad}"
        );
    }

    // A body's id is the same key as the header: either way round, one event.
    let (s1, by_header) = send("k-3", json!({"ticket_id": "t4"})).await;
    let (s2, by_id) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": "ticket.updated", "id": "k-3", "data": {"ticket_id": "t4"}})),
        )
        .await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(by_header["event_id"], by_id["event_id"]);
    let (_, by_id) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": "ticket.updated", "id": "k-4", "data": {"ticket_id": "t5"}})),
        )
        .await;
    let (_, by_header) = send("k-4", json!({"ticket_id": "t5"})).await;
    assert_eq!(by_header["event_id"], by_id["event_id"]);

    // An event an earlier version stored under a body id (as `id:<id>`) is still that id's.
    let first = json!({"type": "ticket.updated", "id": "legacy-1", "data": {"ticket_id": "t6"}});
    let (_, stored) = app.call(Method::POST, "/v1/events", Some(first.clone())).await;
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    db.execute(
        "UPDATE events SET idempotency_key = $1 WHERE idempotency_key = $2",
        opsiq::args!["id:legacy-1", "legacy-1"],
    )
    .await
    .unwrap();
    db.close().await;
    let (status, again) = app.call(Method::POST, "/v1/events", Some(first)).await;
    assert_eq!(
        (status, &again["event_id"]),
        (202, &stored["event_id"]),
        "{again}"
    );
}

/// An `invoice.*` endpoint whose receiver answers 500 to everything, and a second receiver
/// subscribed to `alert_type`; returns both receivers and the failing endpoint's id.
async fn failing_endpoint_and_alerts(app: &TestApp, alert_type: &str) -> (Receiver, Receiver, String) {
    let rx = Receiver::start().await;
    let alerts = Receiver::start().await;
    rx.always(500);
    let (id, _) = endpoint(app, &rx.url("/fail"), json!({"event_types": ["invoice.*"]})).await;
    endpoint(app, &alerts.url("/alerts"), json!({"event_types": [alert_type]})).await;
    (rx, alerts, id)
}

async fn a_delivery_life_retries_then_gives_up(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let (rx, alerts, endpoint_id) = failing_endpoint_and_alerts(&app, "delivery.failed").await;
    send_event(&app, "invoice.updated", json!({"invoice_id": "in_1"})).await;

    // One first attempt plus one per schedule step (3), then give up.
    let got = rx.wait_for(4).await;
    let ids: HashSet<_> = got
        .iter()
        .map(|r| r.header("x-opsiq-id").unwrap().to_string())
        .collect();
    let keys: HashSet<_> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    let nonces: HashSet<_> = got
        .iter()
        .map(|r| r.header("x-opsiq-nonce").unwrap().to_string())
        .collect();
    let attempts: Vec<_> = got
        .iter()
        .map(|r| r.header("x-opsiq-attempt").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "same delivery id on every attempt");
    assert_eq!(keys.len(), 1, "same idempotency key on every attempt");
    assert_eq!(nonces.len(), 4, "fresh nonce per attempt");
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    for pair in got.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(150),
            "backoff between attempts"
        );
    }

    let alert = alerts.wait_for(1).await;
    let body = alert[0].json();
    assert_eq!(body["type"], "delivery.failed");
    assert_eq!(body["data"]["endpoint_id"], endpoint_id.as_str());
    assert_eq!(body["data"]["attempts"], 4);
    assert_eq!(body["data"]["last_status"], 500);

    let delivery_id = ids.into_iter().next().unwrap();
    let (_, log) = app
        .call(Method::GET, &format!("/v1/deliveries/{delivery_id}"), None)
        .await;
    assert_eq!(log["status"], "failed");
    assert_eq!(log["attempts_log"].as_array().unwrap().len(), 4);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rx.received().len(), 4, "no attempt after giving up");
    let metrics = app.metrics().await;
    assert!(metrics.contains("opsiq_deliveries_failed_total"));
}

async fn retry_after_is_honoured(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    rx.answer(|_, i| {
        if i == 0 {
            (429, vec![("retry-after", "2".into())], String::new())
        } else {
            (200, vec![], String::new())
        }
    });
    endpoint(&app, &rx.url("/slow-down"), json!({})).await;
    send_event(&app, "invoice.updated", json!({})).await;
    let got = rx.wait_for(2).await;
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "waited {gap:?} instead of the 2 s asked for"
    );
}

/// A 2xx is a success however many headers come with it (not a failed attempt to send again);
/// the log keeps the first 64 KiB of them.
async fn an_answer_with_many_headers_is_still_an_answer(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let names: Vec<&'static str> = (0..300)
        .map(|i| &*Box::leak(format!("x-header-{i}").into_boxed_str()))
        .collect();
    rx.answer(move |_, _| {
        let headers = names.iter().map(|name| (*name, "v".repeat(400))).collect();
        (200, headers, "ok".into())
    });
    endpoint(&app, &rx.url("/chatty"), json!({})).await;
    let event_id = send_event(&app, "invoice.updated", json!({})).await;
    rx.wait_for(1).await;
    let delivery = crate::harness::eventually(Duration::from_secs(30), || async {
        let (_, event) = app
            .call(Method::GET, &format!("/v1/events/{event_id}"), None)
            .await;
        let id = event["deliveries"][0]["id"].as_str()?.to_string();
        let (_, delivery) = app.call(Method::GET, &format!("/v1/deliveries/{id}"), None).await;
        (delivery["status"] == "succeeded").then_some(delivery)
    })
    .await;
    let attempts = delivery["attempts_log"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{delivery}");
    let response = &attempts[0]["response"];
    assert_eq!(response["status"], 200);
    let kept = response["headers"].to_string();
    assert!(
        kept.contains("x-header-0") && !kept.contains("x-header-299"),
        "all 120 KB kept"
    );
    assert!(kept.len() < 80 * 1024, "{} bytes of headers kept", kept.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1, "sent once");
}

async fn gone_disables_the_endpoint(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let alerts = Receiver::start().await;
    rx.always(410);
    let (id, _) = endpoint(&app, &rx.url("/gone"), json!({"event_types": ["invoice.*"]})).await;
    endpoint(
        &app,
        &alerts.url("/alerts"),
        json!({"event_types": ["endpoint.disabled"]}),
    )
    .await;
    send_event(&app, "invoice.updated", json!({})).await;
    let alert = alerts.wait_for(1).await;
    assert_eq!(alert[0].json()["data"]["endpoint_id"], id.as_str());
    let (_, ep) = app.call(Method::GET, &format!("/v1/endpoints/{id}"), None).await;
    assert_eq!(ep["enabled"], false);
    assert!(ep["disabled_reason"].as_str().unwrap().contains("410"));
    // Disabling is a change of the endpoint: an edit based on the version before it is refused.
    assert_eq!(ep["version"], 2, "{ep}");
    assert_eq!(rx.received().len(), 1, "410 is not retried");
    let (_, accepted) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": "invoice.updated", "data": {}})),
        )
        .await;
    assert_eq!(accepted["deliveries"], 0, "a disabled endpoint gets nothing new");
}

async fn replay_and_recover(backend: Backend) {
    let app = TestApp::on(backend).with(one_quick_retry).start().await;
    let rx = Receiver::start().await;
    rx.always(503);
    let (endpoint_id, _) = endpoint(&app, &rx.url("/r"), json!({"event_types": ["invoice.*"]})).await;
    let since = opsiq::db::rfc3339(opsiq::db::now_ms() - 1000);
    for i in 0..3 {
        send_event(&app, "invoice.updated", json!({"n": i})).await;
    }
    wait_until(Duration::from_secs(30), || async {
        let (_, l) = app.call(Method::GET, "/v1/deliveries?status=failed", None).await;
        l["data"].as_array().unwrap().len() == 3
    })
    .await;
    let before = rx.received().len();
    assert_eq!(before, 6, "two attempts each");
    rx.always(200);

    let (_, failed) = app
        .call(Method::GET, "/v1/deliveries?status=failed&limit=1", None)
        .await;
    let first = failed["data"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = app
        .call(Method::POST, &format!("/v1/deliveries/{first}/replay"), None)
        .await;
    assert_eq!(status, 202);
    let got = rx.wait_for(before + 1).await;
    let replayed = got.last().unwrap();
    assert_eq!(replayed.header("x-opsiq-id"), Some(first.as_str()));
    let earlier: Vec<_> = got[..before]
        .iter()
        .filter(|r| r.header("x-opsiq-id") == Some(first.as_str()))
        .collect();
    assert_eq!(
        replayed.header("idempotency-key"),
        earlier[0].header("idempotency-key")
    );
    assert!(
        earlier
            .iter()
            .all(|r| r.header("x-opsiq-nonce") != replayed.header("x-opsiq-nonce"))
    );
    assert_eq!(replayed.header("x-opsiq-attempt"), Some("3"));
    wait_until(Duration::from_secs(30), || async {
        app.call(Method::GET, &format!("/v1/deliveries/{first}"), None)
            .await
            .1["status"]
            == "succeeded"
    })
    .await;

    let (status, recovered) = app
        .call(
            Method::POST,
            &format!("/v1/endpoints/{endpoint_id}/recover"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(recovered["recovered"], 2);
    rx.wait_for(before + 3).await;
    wait_until(Duration::from_secs(30), || async {
        let (_, l) = app
            .call(Method::GET, "/v1/deliveries?status=succeeded", None)
            .await;
        l["data"].as_array().unwrap().len() == 3
    })
    .await;
    let (status, _) = app
        .call(Method::POST, "/v1/deliveries/dlv_nope/replay", None)
        .await;
    assert_eq!(status, 404);
}

async fn rotation_overlap(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, dir| {
            fast_delivery(raw, dir);
            raw.secret_overlap = "5s".into();
        })
        .start()
        .await;
    let rx = Receiver::start().await;
    let (id, old) = endpoint(&app, &rx.url("/rot"), json!({})).await;
    // Rotated twice within the overlap: every secret handed out in the window still signs.
    let mut handed_out = vec![old.clone()];
    for _ in 0..2 {
        let (status, rotated) = app
            .call(Method::POST, &format!("/v1/endpoints/{id}/rotate-secret"), None)
            .await;
        assert_eq!(status, 200, "{rotated}");
        handed_out.push(rotated["secret"].as_str().unwrap().to_string());
    }
    let (old, mid, new) = (&handed_out[0], &handed_out[1], &handed_out[2]);
    assert!(old != mid && mid != new && old != new);
    let (_, shown) = app
        .call(Method::GET, &format!("/v1/endpoints/{id}/secret"), None)
        .await;
    assert_eq!(shown["secret"], new.as_str());
    assert_eq!(shown["previous_secret"], mid.as_str());
    let previous: Vec<&str> = shown["previous_secrets"]
        .as_array()
        .unwrap_or_else(|| panic!("previous_secrets listed: {shown}"))
        .iter()
        .map(|p| p["secret"].as_str().unwrap())
        .collect();
    assert_eq!(previous, [mid.as_str(), old.as_str()], "newest first");

    send_event(&app, "invoice.updated", json!({})).await;
    let r = rx.wait_for(1).await.remove(0);
    let sig = r.header("x-opsiq-signature").unwrap();
    assert_eq!(
        sig.split(", ").count(),
        3,
        "all three secrets sign during the overlap: {sig}"
    );
    let h = headers_of(&r);
    for secret in [old, mid, new] {
        verify::verify_opsiq_v1(&[secret.as_str()], h.as_slice(), &r.target, &r.body, now_secs())
            .unwrap_or_else(|e| panic!("{secret} should verify: {e}"));
    }
    assert!(sig.starts_with("sha256="));

    // After the overlap only the new secret signs.
    wait_until(Duration::from_secs(30), || async {
        app.call(Method::GET, &format!("/v1/endpoints/{id}/secret"), None)
            .await
            .1
            .get("previous_secret")
            .is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // the worker's endpoint cache lives 1 s
    send_event(&app, "invoice.updated", json!({})).await;
    let r = rx.wait_for(2).await.remove(1);
    let h = headers_of(&r);
    assert_eq!(r.header("x-opsiq-signature").unwrap().split(", ").count(), 1);
    assert!(verify::verify_opsiq_v1(&[new.as_str()], h.as_slice(), &r.target, &r.body, now_secs()).is_ok());
    for retired in [old, mid] {
        assert_eq!(
            verify::verify_opsiq_v1(&[retired.as_str()], h.as_slice(), &r.target, &r.body, now_secs())
                .unwrap_err()
                .reason(),
            "signature_mismatch"
        );
    }

    // A secret that signs already cannot be chosen again.
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/v1/endpoints/{id}/rotate-secret"),
            Some(json!({"secret": new})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // A leaked secret is retired at once, with every secret before it.
    let rotate = format!("/v1/endpoints/{id}/rotate-secret");
    let (status, _) = app.call(Method::POST, &rotate, None).await;
    assert_eq!(status, 200);
    let (status, rotated) = app
        .call(Method::POST, &rotate, Some(json!({"retire_previous": true})))
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert!(rotated["previous_expires_at"].is_null(), "{rotated}");
    let latest = rotated["secret"].as_str().unwrap();
    let (_, shown) = app
        .call(Method::GET, &format!("/v1/endpoints/{id}/secret"), None)
        .await;
    assert_eq!(shown["secret"], latest);
    assert!(
        shown.get("previous_secret").is_none() && shown.get("previous_secrets").is_none(),
        "{shown}"
    );
    send_event(&app, "invoice.updated", json!({})).await;
    let r = rx.wait_for(3).await.remove(2);
    assert_eq!(r.header("x-opsiq-signature").unwrap().split(", ").count(), 1);
    let h = headers_of(&r);
    assert!(verify::verify_opsiq_v1(&[latest], h.as_slice(), &r.target, &r.body, now_secs()).is_ok());
}

async fn redirects_are_not_followed(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let target = Receiver::start().await;
    let rx = Receiver::start().await;
    let location = target.url("/internal");
    rx.answer(move |_, _| (302, vec![("location", location.clone())], String::new()));
    endpoint(&app, &rx.url("/redirecting"), json!({})).await;
    send_event(&app, "invoice.updated", json!({})).await;
    rx.wait_for(2).await;
    assert!(
        target.received().is_empty(),
        "a redirect is an answer, never followed"
    );
    let (_, list) = app.call(Method::GET, "/v1/deliveries", None).await;
    assert_eq!(list["data"][0]["last_status_code"], 302);
}

/// A host name (not "localhost") that this machine resolves to a loopback address.
fn loopback_name() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let ip: std::net::IpAddr = parts.next()?.parse().ok()?;
        if !ip.is_loopback() {
            return None;
        }
        parts
            .find(|n| !n.starts_with('#') && !n.contains("localhost"))
            .map(str::to_string)
    })
}

async fn ssrf_guard_without_dev(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, _| {
            raw.retry_schedule = "100ms".into();
            raw.poll_interval = "50ms".into();
        })
        .start()
        .await;
    for url in [
        "http://127.0.0.1:9/h",
        "http://[::1]:9/h",
        "http://localhost:9/h",
        "http://0.0.0.0:9/h",
        "http://10.0.0.1/h",
        "http://172.16.5.4/h",
        "http://192.168.1.1/h",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/h",
        "http://[fd00:ec2::254]/h",
        "http://2130706433/h",
    ] {
        let (status, body) = app
            .call(Method::POST, "/v1/endpoints", Some(json!({"url": url})))
            .await;
        assert_eq!(status, 422, "{url} must be refused: {body}");
        assert_eq!(body["error"]["details"][0]["path"], "/url");
    }
    // A name is only resolved when connecting, and every answer is checked there.
    let Some(name) = loopback_name() else {
        crate::harness::skip_or_fail(
            "ssrf_guard_without_dev (name resolving to loopback)",
            "no such name in /etc/hosts",
        );
        return;
    };
    let rx = Receiver::start().await;
    let port = rx.base.rsplit(':').next().unwrap().to_string();
    endpoint(&app, &format!("http://{name}:{port}/h"), json!({})).await;
    send_event(&app, "invoice.updated", json!({})).await;
    let log = eventually(Duration::from_secs(30), || async {
        let (_, list) = app.call(Method::GET, "/v1/deliveries", None).await;
        let id = list["data"][0]["id"].as_str().unwrap_or_default().to_string();
        let log = app
            .call(Method::GET, &format!("/v1/deliveries/{id}"), None)
            .await
            .1;
        (log["status"] == "failed").then_some(log)
    })
    .await;
    assert_eq!(log["attempts_log"][0]["error_class"], "blocked_address", "{log}");
    assert!(rx.received().is_empty(), "nothing reached the loopback receiver");
}

async fn retention_purges_old_deliveries(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, dir| {
            fast_delivery(raw, dir);
            raw.retention = "2s".into();
            raw.purge_interval = "200ms".into();
        })
        .start()
        .await;
    let rx = Receiver::start().await;
    endpoint(&app, &rx.url("/p"), json!({})).await;
    let event_id = send_event(&app, "invoice.updated", json!({})).await;
    let delivery_id = rx.wait_for(1).await[0].header("x-opsiq-id").unwrap().to_string();
    assert_eq!(
        app.call(Method::GET, &format!("/v1/deliveries/{delivery_id}"), None)
            .await
            .0,
        200
    );
    wait_until(Duration::from_secs(30), || async {
        app.call(Method::GET, &format!("/v1/deliveries/{delivery_id}"), None)
            .await
            .0
            == 404
            && app
                .call(Method::GET, &format!("/v1/events/{event_id}"), None)
                .await
                .0
                == 404
    })
    .await;
}

async fn preview_and_test_send(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let (id, secret) = endpoint(&app, &rx.url("/pv?x=1"), json!({"event_types": ["nothing.*"]})).await;
    let (status, preview) = app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"endpoint_id": id, "event": {"type": "invoice.paid",
                "data": {"invoice_id": "in_1", "amount": 1, "currency": "EUR"}}})),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    let headers = preview["headers"].as_object().unwrap();
    let body = preview["body"].as_str().unwrap();
    verify::verify_opsiq_v1(
        &[secret.as_str()],
        headers,
        "/pv?x=1",
        body.as_bytes(),
        now_secs(),
    )
    .expect("preview is signed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.received().is_empty(), "a preview sends nothing");

    // Previews are signed with the real secret: viewers may not ask for them.
    let viewer = app.key_with_role("viewer").await;
    let (status, _) = app
        .call_as(
            &viewer,
            Method::POST,
            "/v1/preview",
            Some(json!({"endpoint_id": id, "event": {"type": "invoice.paid", "data": {}}})),
        )
        .await;
    assert_eq!(status, 403);

    // Data may be left out (an empty object) for a type whose schema allows it.
    let (status, bare) = app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"endpoint_id": id, "event": {"type": "order.noted"}})),
        )
        .await;
    assert_eq!(status, 200, "{bare}");
    assert_eq!(
        serde_json::from_str::<Value>(bare["body"].as_str().unwrap()).unwrap()["data"],
        json!({})
    );
    // A preview shows only what could be sent: the event's data is held to its type's schema.
    let (status, refused) = app
        .call(
            Method::POST,
            "/v1/preview",
            Some(json!({"endpoint_id": id, "event": {"type": "invoice.paid", "data": {"amount": 1}}})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["error"]["details"][0]["path"], "/event/data/invoice_id",
        "{refused}"
    );

    // A test send takes no options: a body other than `{}` is refused, not ignored.
    let test_path = format!("/v1/endpoints/{id}/test");
    let garbage = app
        .admin(Method::POST, &test_path)
        .header("content-type", "application/json")
        .body("garbage");
    assert_eq!(read(garbage.send().await.unwrap()).await.0, 400);
    let (status, _) = app
        .call(Method::POST, &test_path, Some(json!({"data": {"a": 1}})))
        .await;
    assert_eq!(status, 422);
    let (status, sent) = app.call(Method::POST, &test_path, None).await;
    assert_eq!(status, 202, "{sent}");
    let r = rx.wait_for(1).await.remove(0);
    assert_eq!(r.header("x-opsiq-event"), Some("opsiq.test"));
    assert_eq!(r.header("x-opsiq-id"), sent["delivery_id"].as_str());
}

async fn standard_webhooks_scheme(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let (id, secret) = endpoint(
        &app,
        &rx.url("/std"),
        json!({"signature_scheme": "standard-webhooks"}),
    )
    .await;
    send_event(&app, "invoice.updated", json!({"amount": 42})).await;
    let r = rx.wait_for(1).await.remove(0);
    assert_eq!(r.header("webhook-id"), r.header("x-opsiq-id"));
    assert!(r.header("webhook-signature").unwrap().starts_with("v1,"));
    assert!(r.header("x-opsiq-signature").is_none());
    let h = headers_of(&r);
    verify::verify_standard(&[secret.as_str()], h.as_slice(), &r.body, now_secs())
        .expect("standard signature");
    crate::external::standardwebhooks_verifies(&secret, &h, &r.body).await;
    let (_, ep) = app.call(Method::GET, &format!("/v1/endpoints/{id}"), None).await;
    assert_eq!(ep["signature_scheme"], "standard-webhooks");
}

async fn action_client_errors_are_final_but_event_ones_retry(backend: Backend) {
    // Events: a 400 is retried like any failure (actions are covered by the gateway tests).
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    rx.answer(|_, i| {
        if i == 0 {
            (400, vec![], String::new())
        } else {
            (200, vec![], String::new())
        }
    });
    endpoint(&app, &rx.url("/e"), json!({})).await;
    send_event(&app, "invoice.updated", json!({})).await;
    let got = rx.wait_for(2).await;
    assert_eq!(got[1].header("x-opsiq-attempt"), Some("2"));
}

dual!(
    nothing_more_is_sent_to_a_disabled_or_deleted_endpoint,
    endpoint_urls_are_kept_as_they_are_sent
);

/// An endpoint's URL is stored as it will be requested (the form the delivery log shows), and
/// one that would not be sent as written is refused; lengths count characters, not bytes.
async fn endpoint_urls_are_kept_as_they_are_sent(backend: Backend) {
    let app = TestApp::start(backend).await;
    for (given, stored) in [
        ("http:/example.com", "http://example.com/"),
        (
            "https://EXAMPLE.com:443/a/../ü?q=ö",
            "https://example.com/%C3%BC?q=%C3%B6",
        ),
    ] {
        let (status, body) = app
            .call(Method::POST, "/v1/endpoints", Some(json!({"url": given})))
            .await;
        assert_eq!(status, 201, "{given}: {body}");
        assert_eq!(body["url"], stored, "{given}");
    }
    let (_, body) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://example.com/p?q=ö"})),
        )
        .await;
    let id = body["id"].as_str().unwrap();
    let (status, patched) = app
        .call(
            Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"url": "HTTPS://Example.com:443/x"})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["url"], "https://example.com/x");
    // The same settings again, or none, make no new version (that would fail others' If-Match).
    for same in [
        json!({}),
        json!({"url": "https://example.com/x", "enabled": true}),
    ] {
        let (status, again) = app
            .call(Method::PATCH, &format!("/v1/endpoints/{id}"), Some(same))
            .await;
        assert_eq!((status, &again["version"]), (200, &patched["version"]), "{again}");
    }
    for (bad, why) in [
        (" https://example.com/", "spaces or control"),
        ("https://example.com/a\u{1}", "spaces or control"),
        ("https://example.com/#part", "fragment"),
        ("https://example.com:0/", "port 0"),
    ] {
        let (status, body) = app
            .call(Method::POST, "/v1/endpoints", Some(json!({"url": bad})))
            .await;
        assert_eq!(status, 422, "{bad:?}: {body}");
        assert!(
            body["error"]["details"][0]["message"]
                .as_str()
                .unwrap()
                .contains(why),
            "{body}"
        );
    }
    // `null` is refused rather than read as "leave it".
    for (patch, path) in [
        (json!({"url": null}), "/url"),
        (json!({"enabled": null}), "/enabled"),
        (json!({"event_types": null}), "/event_types"),
        // Nor is a pattern that could match nothing (no type has an empty part between dots).
        (json!({"event_types": ["invoice.*", "a..b"]}), "/event_types/1"),
    ] {
        let (status, body) = app
            .call(Method::PATCH, &format!("/v1/endpoints/{id}"), Some(patch.clone()))
            .await;
        assert_eq!(status, 422, "{patch}: {body}");
        assert_eq!(body["error"]["details"][0]["path"], path, "{body}");
    }
    let (_, unchanged) = app.call(Method::GET, &format!("/v1/endpoints/{id}"), None).await;
    assert_eq!(unchanged["version"], patched["version"], "{unchanged}");
    // A pattern listed twice is kept once.
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"event_types": ["invoice.*", "ticket.*", "invoice.*"]})),
        )
        .await;
    assert_eq!(
        (status, &body["event_types"]),
        (200, &json!(["invoice.*", "ticket.*"])),
        "{body}"
    );
    let long = "é".repeat(1000);
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://example.com/", "description": long})),
        )
        .await;
    assert_eq!(status, 201, "1000 characters fit whatever their bytes: {body}");
}

/// A disabled endpoint's deliveries are not replayed or recovered into it (409, and nothing is
/// recorded), and deleting an endpoint gives up the events it still owed at once, without alerts.
async fn nothing_more_is_sent_to_a_disabled_or_deleted_endpoint(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, dir| {
            fast_delivery(raw, dir);
            raw.retry_schedule = "1h".into();
        })
        .start()
        .await;
    let alerts = Receiver::start().await;
    endpoint(
        &app,
        &alerts.url("/alerts"),
        json!({"event_types": ["delivery.failed"]}),
    )
    .await;
    let gone = Receiver::start().await;
    gone.always(410);
    let (gone_id, _) = endpoint(&app, &gone.url("/gone"), json!({"event_types": ["invoice.*"]})).await;
    send_event(&app, "invoice.updated", json!({})).await;
    assert_eq!(
        alerts.wait_for(1).await[0].json()["data"]["endpoint_id"],
        gone_id.as_str()
    );
    let (_, list) = app
        .call(
            Method::GET,
            &format!("/v1/deliveries?endpoint_id={gone_id}"),
            None,
        )
        .await;
    let delivery = list["data"][0]["id"].as_str().unwrap().to_string();
    let (status, body) = app
        .call(Method::POST, &format!("/v1/deliveries/{delivery}/replay"), None)
        .await;
    assert_error((status, &body), 409, "endpoint_disabled", "enable it first");
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/v1/endpoints/{gone_id}/recover"),
            Some(json!({"since": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_error((status, &body), 409, "endpoint_disabled", "enable it first");
    let (_, log) = app
        .call(Method::GET, &format!("/v1/deliveries/{delivery}"), None)
        .await;
    assert_eq!(
        (&log["status"], &log["attempts"]),
        (&json!("failed"), &json!(1)),
        "{log}"
    );

    // Deleted with retries owed: they are given up at once, each saying why, and none alerts.
    let doomed = Receiver::start().await;
    doomed.always(500);
    let (doomed_id, _) = endpoint(
        &app,
        &doomed.url("/doomed"),
        json!({"event_types": ["ticket.noted"]}),
    )
    .await;
    for _ in 0..3 {
        send_event(&app, "ticket.noted", json!({})).await;
    }
    let owed = format!("/v1/deliveries?endpoint_id={doomed_id}");
    let pending = eventually(Duration::from_secs(30), || async {
        let list = app.call(Method::GET, &owed, None).await.1;
        let data = list["data"].as_array().cloned().unwrap_or_default();
        (data.len() == 3
            && data
                .iter()
                .all(|d| d["status"] == "pending" && d["attempts"] == 1))
        .then_some(data)
    })
    .await;
    let status = app
        .admin(Method::DELETE, &format!("/v1/endpoints/{doomed_id}"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    let (_, list) = app.call(Method::GET, &owed, None).await;
    for d in list["data"].as_array().unwrap() {
        assert_eq!(d["status"], "failed", "{d}");
        assert_eq!(d["last_error"], "the endpoint was deleted", "{d}");
    }
    let some = pending[0]["id"].as_str().unwrap();
    let (status, body) = app
        .call(Method::POST, &format!("/v1/deliveries/{some}/replay"), None)
        .await;
    assert_error((status, &body), 409, "endpoint_deleted", "was deleted");
    let (_, raised) = app
        .call(Method::GET, "/v1/events?type=delivery.failed", None)
        .await;
    assert_eq!(
        raised["data"].as_array().unwrap().len(),
        1,
        "only the 410 alerted: {raised}"
    );
    assert_eq!(
        doomed.received().len(),
        3,
        "one attempt each, before the deletion"
    );
}

dual!(
    five_days_of_failures_disable_the_endpoint,
    a_success_ends_a_run_of_failures
);

/// Marks the endpoint's run of failures as begun six days ago, behind the server's back (time
/// cannot be waited out in a test).
async fn failing_for_six_days(app: &TestApp, endpoint_id: &str) {
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let six_days_ago = opsiq::db::now_ms() - 6 * 24 * 3600 * 1000;
    db.execute(
        "UPDATE endpoints SET failing_since = $1 WHERE id = $2",
        opsiq::args![six_days_ago, endpoint_id],
    )
    .await
    .unwrap();
    db.close().await;
}

/// Any 2xx ends an endpoint's run of failures, also one the sender did not know about when it
/// sent (a failure recorded meanwhile): a healthy endpoint is never disabled for it later.
async fn a_success_ends_a_run_of_failures(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let (id, _) = endpoint(&app, &rx.url("/ok"), json!({"event_types": ["ok.*"]})).await;
    send_event(&app, "ok.first", json!({})).await;
    rx.wait_for(1).await;
    failing_for_six_days(&app, &id).await;
    send_event(&app, "ok.second", json!({})).await;
    rx.wait_for(2).await;
    let path = format!("/v1/endpoints/{id}");
    crate::harness::wait_until(Duration::from_secs(30), || async {
        app.call(Method::GET, &path, None).await.1["failing_since"].is_null()
    })
    .await;
    let (_, ep) = app.call(Method::GET, &path, None).await;
    assert_eq!(ep["enabled"], true, "{ep}");
}

async fn five_days_of_failures_disable_the_endpoint(backend: Backend) {
    let app = TestApp::on(backend).with(one_quick_retry).start().await;
    let (_rx, alerts, id) = failing_endpoint_and_alerts(&app, "endpoint.disabled").await;
    failing_for_six_days(&app, &id).await;
    send_event(&app, "invoice.updated", json!({})).await;
    let alert = alerts.wait_for(1).await;
    assert_eq!(alert[0].json()["data"]["endpoint_id"], id.as_str());
    assert!(
        alert[0].json()["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("5 days")
    );
    let (_, ep) = app.call(Method::GET, &format!("/v1/endpoints/{id}"), None).await;
    assert_eq!(ep["enabled"], false);
    // Re-enabling clears the run of failures.
    let (_, ep) = app
        .call(
            Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(
        (ep["enabled"].as_bool(), ep["failing_since"].is_null()),
        (Some(true), true)
    );
}

dual!(
    endpoint_changes_made_at_once_all_stand,
    endpoint_changes_apply_only_at_the_version_read
);

/// `If-Match` on an endpoint: a PATCH or DELETE based on a version someone changed meanwhile is
/// a 412 and changes nothing; of changes made at once at one version, one lands.
async fn endpoint_changes_apply_only_at_the_version_read(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (_, path) = crate::harness::create_at_version_1(
        &app,
        "/v1/endpoints",
        &json!({"url": "https://hooks.example.com/a", "description": "first"}),
    )
    .await;
    let read_at = app
        .as_key(&app.admin_key, Method::GET, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(read_at.headers()["etag"], "\"1\"");

    let patch = |if_match: &str, change: Value| {
        app.as_key(&app.admin_key, Method::PATCH, &path)
            .header("if-match", if_match)
            .json(&change)
    };
    let first = patch("\"1\"", json!({"description": "second"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["etag"], "\"2\"");
    let (status, lost) = read(
        patch("\"1\"", json!({"url": "https://hooks.example.com/lost"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, error_code(&lost)), (412, "version_mismatch"), "{lost}");
    assert!(
        lost["error"]["message"].as_str().unwrap().contains("version 2"),
        "{lost}"
    );
    let (_, now) = app.call(Method::GET, &path, None).await;
    assert_eq!(
        (
            now["url"].clone(),
            now["description"].clone(),
            now["version"].clone()
        ),
        (json!("https://hooks.example.com/a"), json!("second"), json!(2))
    );
    // The list shows the same version, so an edit can start from a list.
    let (_, list) = app.call(Method::GET, "/v1/endpoints", None).await;
    assert_eq!(list["data"][0]["version"], 2, "{list}");

    // Rotating the secret changes no configuration: an edit at version 2 still applies.
    let (status, _) = app
        .call(Method::POST, &format!("{path}/rotate-secret"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        patch("\"2\"", json!({"enabled": false}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Weak or malformed tags are refused; `*` and no header are unconditional.
    let (status, body) = read(patch("W/\"3\"", json!({"enabled": true})).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_if_match"), "{body}");
    assert_eq!(
        patch("*", json!({"enabled": true}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Eight edits made at once at version 4: one lands, seven learn of it.
    let edits = (0..8).map(|i| patch("\"4\"", json!({"description": format!("edit {i}")})));
    assert_eq!(at_once(edits).await, [200, 412, 412, 412, 412, 412, 412, 412]);

    delete_checks_version(&app, &path, "\"4\"", "\"5\"").await;
    assert_eq!(
        patch("\"6\"", json!({"enabled": true}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

/// Changes of one endpoint made at once (different fields, several rotations) all stand: none
/// is undone by another that read the endpoint before it.
async fn endpoint_changes_made_at_once_all_stand(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, created) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://hooks.example.com/a"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/endpoints/{id}");
    let changes = [
        json!({"url": "https://hooks.example.com/b"}),
        json!({"description": "billing hooks"}),
        json!({"event_types": ["invoice.*"]}),
        json!({"rate_limit_per_s": 7}),
        json!({"max_in_flight": 3}),
        json!({"signature_scheme": "standard-webhooks"}),
        json!({"enabled": false}),
    ];
    let patches = changes
        .iter()
        .map(|c| app.as_key(&app.admin_key, Method::PATCH, &path).json(c));
    assert_eq!(at_once(patches).await, vec![200; changes.len()]);
    let (_, now) = app.call(Method::GET, &path, None).await;
    for change in &changes {
        for (field, value) in change.as_object().unwrap() {
            assert_eq!(&now[field], value, "{field} was undone: {now}");
        }
    }

    // Eight rotations at once: the secret in use and the one still beside it are both secrets
    // a rotation handed out, never the original one both read.
    let (_, original) = app.call(Method::GET, &format!("{path}/secret"), None).await;
    let rotate = format!("{path}/rotate-secret");
    let rotations = (0..8).map(|_| async {
        let (status, body) = app.call(Method::POST, &rotate, None).await;
        assert_eq!(status, 200, "{body}");
        body["secret"].as_str().unwrap().to_string()
    });
    let handed_out: HashSet<String> = futures_util::future::join_all(rotations)
        .await
        .into_iter()
        .collect();
    assert_eq!(handed_out.len(), 8);
    let (_, secrets) = app.call(Method::GET, &format!("{path}/secret"), None).await;
    assert!(
        handed_out.contains(secrets["secret"].as_str().unwrap()),
        "{secrets}"
    );
    assert!(
        handed_out.contains(secrets["previous_secret"].as_str().unwrap()),
        "{secrets}"
    );
    assert_ne!(secrets["previous_secret"], original["secret"]);
    // The secrets still beside it are rotations' too, at most four of them, newest first.
    let previous = secrets["previous_secrets"].as_array().unwrap();
    assert_eq!(previous.len(), 4, "{secrets}");
    assert_eq!(previous[0]["secret"], secrets["previous_secret"]);
    for p in previous {
        assert!(handed_out.contains(p["secret"].as_str().unwrap()), "{secrets}");
    }
}

dual!(
    a_capped_endpoints_backlog_drains_as_fast_as_it_answers,
    a_limited_endpoints_backlog_waits_in_the_outbox,
    deliveries_deferred_for_a_rate_limit_go_out_when_due_not_at_the_next_poll,
    failures_under_overload_all_raise_their_alerts,
    a_waiting_backlog_follows_the_endpoint_as_it_now_stands
);

/// Deliveries waiting for an endpoint's rate limit follow the endpoint as it is when their turn
/// comes: raised limits clear the backlog at the new rate (not at the old one it was spaced at),
/// and a new URL gets everything not already under way.
async fn a_waiting_backlog_follows_the_endpoint_as_it_now_stands(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let (id, _) = endpoint(
        &app,
        &rx.url("/old"),
        json!({"event_types": ["slow.*"], "rate_limit_per_s": 1}),
    )
    .await;
    // At one a second this backlog takes forty seconds.
    const BACKLOG: usize = 40;
    for i in 0..BACKLOG {
        send_event(&app, "slow.tick", json!({"i": i})).await;
    }
    rx.wait_until(Duration::from_secs(60), |r| !r.is_empty()).await;
    // The backlog has settled: every delivery is sent, one of the five seconds' worth the
    // process holds, or waiting in the outbox. (One being deferred at the moment of the change
    // keeps the time the old limit gave it.)
    wait_until(Duration::from_secs(60), || async {
        let (_, pending) = app
            .call(Method::GET, "/v1/deliveries?status=pending&limit=200", None)
            .await;
        let waiting = pending["data"].as_array().map_or(0, Vec::len);
        waiting + rx.received().len() + 5 >= BACKLOG
    })
    .await;
    let (status, body) = app
        .call(
            Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"url": rx.url("/new"), "rate_limit_per_s": null})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let at_old_then = rx.received().iter().filter(|r| r.target == "/old").count();
    let changed = std::time::Instant::now();
    let all = rx
        .wait_until(Duration::from_secs(60), |r| r.len() >= BACKLOG)
        .await;
    let cleared_in = changed.elapsed();
    let at_old = all.iter().filter(|r| r.target == "/old").count();
    assert!(
        at_old <= at_old_then + 1,
        "{} sent to the old URL after the change (at most one was under way)",
        at_old - at_old_then
    );
    let ids: HashSet<&str> = all.iter().map(|r| r.header("x-opsiq-id").unwrap()).collect();
    assert_eq!((all.len(), ids.len()), (BACKLOG, BACKLOG), "each delivery once");
    // Spaced at the old rate, what remained would have taken over half a minute more.
    assert!(
        cleared_in < Duration::from_secs(25),
        "the backlog took {cleared_in:?} after the limit was lifted"
    );
}

/// A rate-limited endpoint's backlog waits in the outbox, not in the queue every endpoint
/// shares: the API keeps answering, another endpoint's delivery is not held up behind it, and
/// the backlog is still delivered in full, each delivery once and as its first attempt.
async fn a_limited_endpoints_backlog_waits_in_the_outbox(backend: Backend) {
    // Two attempts at once: the shared queue holds sixteen jobs, sixteen more wait their turn.
    let app = TestApp::on(backend)
        .with(fast_delivery)
        .with(|raw, _| raw.max_in_flight = 2)
        .start()
        .await;
    let rx = Receiver::start().await;
    endpoint(
        &app,
        &rx.url("/slow"),
        json!({"event_types": ["slow.*"], "rate_limit_per_s": 2}),
    )
    .await;
    endpoint(&app, &rx.url("/fast"), json!({"event_types": ["fast.*"]})).await;
    const BACKLOG: usize = 50;
    for i in 0..BACKLOG {
        send_event(&app, "slow.tick", json!({"i": i})).await;
    }
    send_event(&app, "fast.tick", json!({})).await;
    let slow = |r: &crate::receiver::Received| r.target == "/slow";
    let got = rx
        .wait_until(Duration::from_secs(60), |r| r.iter().any(|x| x.target == "/fast"))
        .await;
    let slow_first = got.iter().filter(|r| slow(r)).count();
    assert!(
        slow_first < BACKLOG / 2,
        "the other endpoint's delivery waited behind {slow_first} of the limited one's"
    );

    let all = rx
        .wait_until(Duration::from_secs(120), |r| {
            r.iter().filter(|x| slow(x)).count() >= BACKLOG
        })
        .await;
    let sent: Vec<_> = all.iter().filter(|r| slow(r)).collect();
    let ids: HashSet<&str> = sent.iter().map(|r| r.header("x-opsiq-id").unwrap()).collect();
    assert_eq!((sent.len(), ids.len()), (BACKLOG, BACKLOG), "each delivery once");
    assert!(
        sent.iter().all(|r| r.header("x-opsiq-attempt") == Some("1")),
        "waiting in the outbox is not an attempt"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("opsiq_deliveries_deferred_total"),
        "nothing was deferred"
    );
}

/// Sends a wave of `size` events of `event_type` at once (data `{"wave", "i"}`); all accepted.
async fn events_at_once(app: &TestApp, event_type: &str, wave: usize, size: usize) {
    let events = (0..size).map(|i| {
        app.admin(Method::POST, "/v1/events")
            .json(&json!({"type": event_type, "data": {"wave": wave, "i": i}}))
    });
    assert_eq!(at_once(events).await, vec![202; size]);
}

/// A rate-limited endpoint's backlog beyond what waits in memory (five seconds' worth) waits in
/// the outbox, each delivery due at its turn; they go out when due, although the poller's own
/// interval is a minute.
async fn deliveries_deferred_for_a_rate_limit_go_out_when_due_not_at_the_next_poll(backend: Backend) {
    let app = TestApp::on(backend)
        .with(fast_delivery)
        .with(|raw, _| raw.poll_interval = "60s".into())
        .start()
        .await;
    let rx = Receiver::start().await;
    endpoint(
        &app,
        &rx.url("/limited"),
        json!({"event_types": ["limited.*"], "rate_limit_per_s": 20}),
    )
    .await;
    let started = std::time::Instant::now();
    // 130 at 20 a second: 100 wait in memory, 30 in the outbox.
    events_at_once(&app, "limited.tick", 0, 130).await;
    rx.wait_until(Duration::from_secs(55), |r| r.len() >= 130).await;
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "130 deliveries at 20 a second took {:?}",
        started.elapsed()
    );
}

/// A capped endpoint's backlog is held for it at the pace its answers come back, not at one
/// answer a second per permit: a first burst, deferred before any answer was in (ten held, the
/// rest spaced at two a second: 45 s for these 100; on PostgreSQL the whole burst is in before
/// the first answer, on SQLite less of it), is made due once the answers show the endpoint is
/// fast, and what comes after waits in memory (before, all but ten of each wave were deferred at
/// that pace too).
async fn a_capped_endpoints_backlog_drains_as_fast_as_it_answers(backend: Backend) {
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    rx.hold(Duration::from_millis(20));
    endpoint(
        &app,
        &rx.url("/capped"),
        json!({"event_types": ["capped.*"], "max_in_flight": 2}),
    )
    .await;
    let started = std::time::Instant::now();
    events_at_once(&app, "capped.tick", 0, 100).await;
    // The next waves once an answer is in (a third request arrives only after one of the first
    // two was answered).
    rx.wait_until(Duration::from_secs(60), |r| r.len() >= 3).await;
    for n in 1..=5 {
        events_at_once(&app, "capped.tick", n, 20).await;
    }
    rx.wait_until(Duration::from_secs(90), |r| r.len() >= 200).await;
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "200 deliveries at two in flight, 20 ms an answer, took {:?}",
        started.elapsed()
    );
}

/// Deliveries failing together, each raising a `delivery.failed` alert, through the smallest
/// queue: the writer of outcomes never waits for room in a queue whose attempts wait for that
/// writer, so the engine does not stall and every alert arrives.
async fn failures_under_overload_all_raise_their_alerts(backend: Backend) {
    let app = TestApp::on(backend)
        .with(one_quick_retry)
        .with(|raw, _| raw.max_in_flight = 1)
        .start()
        .await;
    let (rx, alerts, _) = failing_endpoint_and_alerts(&app, "delivery.failed").await;
    const FAILING: usize = 120;
    for wave in 0..FAILING / 40 {
        let sends = (0..40).map(|i| {
            app.as_key(&app.admin_key, Method::POST, "/v1/events")
                .json(&json!({"type": "invoice.updated", "data": {"wave": wave, "i": i}}))
        });
        assert_eq!(at_once(sends).await, [202; 40]);
    }
    let got = alerts
        .try_wait_until(Duration::from_secs(120), |r| r.len() >= FAILING)
        .await
        .unwrap_or_else(|arrived| arrived);
    assert_eq!(
        got.len(),
        FAILING,
        "the engine stalled: {} of {} attempts made, {} alerts arrived",
        rx.received().len(),
        FAILING * 2,
        got.len()
    );
    let failed: HashSet<String> = got
        .iter()
        .map(|r| r.json()["data"]["delivery_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), FAILING, "one alert per failed delivery");
    assert_eq!(
        rx.received().len(),
        FAILING * 2,
        "a first attempt and one retry each"
    );
}
