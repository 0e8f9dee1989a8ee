//! The web console: its files are served with a strict policy, every API call it makes is a
//! documented route, its rule builder's model agrees with the server (Node.js), and a person
//! can build, test and save a rule, and approve an agent's call, in a real browser (headless
//! Chromium).

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::delivery::{endpoint, fast_delivery, send_event};
use crate::dual;
use crate::gateway::{World, world};
use crate::harness::{Backend, TestApp, error_code, read, repo_path, skip_or_fail};
use crate::receiver::Receiver;

/// Runs a Node.js script from tests/console against the app; `None` when Node.js (or what the
/// script needs) is missing outside CI.
async fn run_node(script: &str, app: &TestApp, endpoint_ids: &[&str]) -> Option<Value> {
    let probe = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await;
    if !probe.is_ok_and(|o| o.status.success()) {
        skip_or_fail(&format!("console {script}"), "node is not installed");
        return None;
    }
    let out = tokio::process::Command::new("node")
        .arg(repo_path(&format!("tests/console/{script}")))
        .args([app.base.as_str(), app.admin_key.as_str()])
        .args(endpoint_ids)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    Some(serde_json::from_str(last).unwrap_or_else(|e| panic!("{script} printed {stdout}: {e}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_are_served_with_a_strict_policy() {
    let app = TestApp::start(Backend::Sqlite).await;
    let resp = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-cache");
    // So does every other answer: a 405 on the page, a 404 under /console/, the API's JSON.
    for (method, path, status) in [
        (Method::POST, "/", 405),
        (Method::OPTIONS, "/console/app.js", 405),
        (Method::GET, "/console/", 404),
        (Method::GET, "/console/app.js/", 404),
        (Method::GET, "/console/nope.js", 404),
        (Method::GET, "/v1/actions", 401),
    ] {
        let resp = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        for name in [
            "content-security-policy",
            "x-content-type-options",
            "x-frame-options",
            "referrer-policy",
        ] {
            assert_eq!(resp.headers()[name], headers[name], "{method} {path} {name}");
        }
    }
    let page = resp.text().await.unwrap();
    // The policy refuses inline code and styles; the page must not need any.
    for tag in page.split("<script").skip(1) {
        let open = &tag[..tag.find('>').unwrap()];
        assert!(
            open.contains("src=\"/console/"),
            "an inline script: <script{open}>"
        );
    }
    assert!(
        !page.contains("<style") && !page.contains(" style="),
        "inline styles"
    );

    // Every file the page and its modules load is served with its type and the same policy.
    let mut wanted: Vec<String> = ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| {
            page.split(attr)
                .skip(1)
                .map(|s| s[..s.find('"').unwrap()].to_string())
        })
        .filter(|target| target.starts_with("/console/"))
        .collect();
    wanted.push("/console/rule-builder.js".into());
    assert!(wanted.contains(&"/console/app.js".to_string()), "{wanted:?}");
    for path in &wanted {
        let resp = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let expected = match path.rsplit('.').next() {
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => "text/javascript; charset=utf-8",
        };
        assert_eq!(resp.headers()["content-type"], expected, "{path}");
        for name in [
            "content-security-policy",
            "x-content-type-options",
            "x-frame-options",
            "referrer-policy",
            "cache-control",
        ] {
            assert_eq!(resp.headers()[name], headers[name], "{path} {name}");
        }
        let body = resp.text().await.unwrap();
        // A module's relative imports are files this route serves too.
        for import in body.split("from \"./").skip(1) {
            let file = &import[..import.find('"').unwrap()];
            assert!(
                wanted.contains(&format!("/console/{file}")),
                "{path} imports {file}"
            );
        }
    }

    let (status, body) = read(
        app.http
            .get(app.url("/console/..%2FCargo.toml"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = read(app.http.get(app.url("/console/secrets.js")).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = read(app.http.post(app.url("/")).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
}

/// The API calls in the console's script — `api("METHOD", `/v1/…${x}…?query`)` and
/// `listAll(`/v1/…`)` (a GET) — as (method, path with `{}` for each interpolation).
fn console_api_calls(script: &str) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    let mut templates = Vec::new();
    for rest in script.split("api(\"").skip(1) {
        let (method, rest) = rest.split_once('"').expect("api(\"METHOD\", …)");
        let template = rest
            .trim_start_matches([',', ' '])
            .strip_prefix('`')
            .expect("every api() call names its path in a template literal, so this check sees it");
        templates.push((method.to_string(), template));
    }
    for rest in script.split("listAll(`").skip(1) {
        templates.push(("GET".to_string(), rest));
    }
    for (method, template) in templates {
        let template = &template[..template.find('`').expect("a closed template literal")];
        let mut path = String::new();
        let mut rest = template.split('?').next().unwrap_or_default();
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').expect("a closed interpolation");
            path.push_str(&rest[..start]);
            path.push_str("{}");
            rest = &rest[start + end + 1..];
        }
        path.push_str(rest);
        // `${path}?…` inside listAll itself is the helper's own call, checked at its callers.
        if path != "{}" {
            calls.push((method, path));
        }
    }
    calls
}

#[test]
fn every_api_call_of_the_console_is_a_documented_route() {
    let script = std::fs::read_to_string(repo_path("src/console/assets/app.js")).unwrap();
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path("schemas/openapi.json")).unwrap()).unwrap();
    let mut documented = HashSet::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        // `/v1/rules/{id}` and the script's `/v1/rules/${enc(id)}` both become `/v1/rules/{}`.
        let template: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in operations.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), template.clone()));
        }
    }
    let calls = console_api_calls(&script);
    assert!(calls.len() >= 20, "found only {calls:?}");
    for call in &calls {
        assert!(
            documented.contains(call),
            "the console calls {call:?}, which the API does not document"
        );
    }
    // And the check can fail: a call to an invented route, written the way the console writes
    // its calls, is read and found undocumented.
    let invented = "await api(\"GET\", `/v1/rules/${enc(id)}/history?limit=5`);";
    let invented_calls = console_api_calls(invented);
    assert_eq!(
        invented_calls,
        [("GET".to_string(), "/v1/rules/{}/history".to_string())]
    );
    assert!(!documented.contains(&invented_calls[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_builders_model_agrees_with_the_server() {
    let World { app, rx: _ } = world(Backend::Sqlite).await;
    let rx = Receiver::start().await;
    let (endpoint_id, _) = endpoint(&app, &rx.url("/escalations"), json!({"event_types": ["none.*"]})).await;
    let Some(out) = run_node("builder-model.mjs", &app, &[&endpoint_id]).await else {
        return;
    };
    let rule_id = out["rule_id"].as_str().unwrap();

    // The rule the model built runs: a ticket that does not match is not delivered, one that
    // matches is, to the endpoint it names.
    let ticket = |tier: &str| {
        json!({"ticket_id": format!("t_{tier}"), "subject": "Checkout outage", "priority": "urgent",
               "customer": {"id": "c_1", "tier": tier}, "tags": []})
    };
    send_event(&app, "ticket.created", ticket("free")).await;
    let matching = send_event(&app, "ticket.created", ticket("enterprise")).await;
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].target, "/escalations");
    assert_eq!(got[0].json()["id"], matching.as_str());
    let (status, event) = app
        .call(Method::GET, &format!("/v1/events/{matching}"), None)
        .await;
    assert_eq!(status, 200);
    assert!(
        event.to_string().contains(rule_id),
        "the event's trace names the rule: {event}"
    );
    // Rules run as an event is recorded, so any delivery the first ticket caused exists by now.
    let (_, deliveries) = app
        .call(
            Method::GET,
            &format!("/v1/deliveries?endpoint_id={endpoint_id}"),
            None,
        )
        .await;
    assert_eq!(
        deliveries["data"].as_array().map(Vec::len),
        Some(1),
        "{deliveries}"
    );
}

// The console talks to the same API on either database; the browser run covers both.
dual!(a_person_builds_a_rule_and_approves_an_agents_call_in_the_browser);

async fn a_person_builds_a_rule_and_approves_an_agents_call_in_the_browser(backend: Backend) {
    let chromium = std::env::var("OPSIQ_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        skip_or_fail(
            "console in a browser",
            "Chromium is not installed (run .ci/setup-external)",
        );
        return;
    }
    if !repo_path("tests/console/node_modules/playwright-core").exists() {
        skip_or_fail(
            "console in a browser",
            "run .ci/setup-external to install playwright-core",
        );
        return;
    }
    let app = TestApp::on(backend).with(fast_delivery).start().await;
    let rx = Receiver::start().await;
    let (endpoint_id, _) = endpoint(&app, &rx.url("/escalations"), json!({"event_types": ["none.*"]})).await;
    let (payments, _) = endpoint(&app, &rx.url("/payments"), json!({"event_types": ["none.*"]})).await;
    let Some(out) = tokio::time::timeout(
        Duration::from_secs(300),
        run_node("browser.mjs", &app, &[&endpoint_id, &payments]),
    )
    .await
    .expect("the browser session finished") else {
        return;
    };

    // What the page saved is exactly the rule the person composed.
    let rule_id = out["rule_id"].as_str().unwrap();
    let (status, mut stored) = app.call(Method::GET, &format!("/v1/rules/{rule_id}"), None).await;
    assert_eq!(status, 200, "{stored}");
    for field in ["id", "created_at", "updated_at", "version"] {
        stored.as_object_mut().unwrap().remove(field);
    }
    assert_eq!(stored, out["rule"]);

    // The endpoint as the page edited it.
    let (_, ep) = app
        .call(Method::GET, &format!("/v1/endpoints/{endpoint_id}"), None)
        .await;
    assert_eq!(ep["event_types"], json!(["none.*", "escalation.*"]), "{ep}");
    assert_eq!(ep["rate_limit_per_s"], 60, "{ep}");
    assert_eq!(ep["description"], "Changed by someone else.", "{ep}");
    let (_, endpoints) = app.call(Method::GET, "/v1/endpoints", None).await;
    assert_eq!(
        endpoints["data"].as_array().map(Vec::len),
        Some(2),
        "the added one was deleted: {endpoints}"
    );
    let (status, _) = app
        .call(Method::GET, "/v1/event-types/escalation.opened", None)
        .await;
    assert_eq!(status, 200);
    // The dashboard key the page made is gone; the owner's remains.
    let (_, keys) = app.call(Method::GET, "/v1/api-keys", None).await;
    let roles: Vec<&str> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["role"].as_str())
        .collect();
    assert_eq!(roles, ["owner"], "{keys}");

    // The endpoint got the page's test event and, from the rule, the ticket the page sent.
    let got = rx.wait_until(Duration::from_secs(30), |r| r.len() >= 3).await;
    let at = |target: &str| got.iter().filter(|r| r.target == target).collect::<Vec<_>>();
    let mut types: Vec<String> = at("/escalations")
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    types.sort();
    assert_eq!(types, ["opsiq.test", "ticket.created"]);
    let ticket = got.iter().find(|r| r.json()["type"] == "ticket.created").unwrap();
    assert_eq!(ticket.header("x-opsiq-id"), out["delivery_id"].as_str());

    // The approved call reached the action's endpoint once, as the agent made it.
    let wire = at("/payments");
    assert_eq!(wire.len(), 1);
    let request = wire[0].json();
    assert_eq!(request["action"]["name"], "wire_funds");
    assert_eq!(
        request["arguments"],
        json!({"amount": 1200, "iban": "DE89370400440532013000"})
    );
    // The action is as the page declared it, plus the other person's change: the refused
    // edits (a bad schema, then a save over a version changed meanwhile) changed nothing.
    let (_, action) = app.call(Method::GET, "/v1/actions/wire_funds", None).await;
    assert_eq!(
        (
            action["version"].as_i64(),
            action["approval"].as_str(),
            action["description"].as_str()
        ),
        (Some(2), Some("never"), Some("Changed by someone else.")),
        "{action}"
    );
    assert_eq!(
        action["guards"],
        json!([{"if": {"field": "arguments.amount", "op": "gt", "value": 1000},
                "then": "require_approval", "reason": "large transfer"}])
    );
    assert_eq!(action["endpoint_id"], payments.as_str());
    let invocation_id = out["invocation_id"].as_str().unwrap();
    let (_, invocation) = app
        .call(Method::GET, &format!("/v1/invocations/{invocation_id}"), None)
        .await;
    assert_eq!(invocation["status"], "succeeded", "{invocation}");
    let (_, approvals) = app.call(Method::GET, "/v1/approvals?status=approved", None).await;
    assert_eq!(
        approvals["data"][0]["comment"], "checked with finance",
        "{approvals}"
    );
}
