//! Events, subscriptions and rules: catalog validation, subscription patterns, conditions and
//! their traces, templated `invoke`, `emit` chains and their cut, malformed rules, dry runs.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::delivery::{endpoint, send_event};
use crate::dual;
use crate::gateway::{World, agent_token, invoke, world};
use crate::harness::{Backend, TestApp, details, error_code, eventually, read};
use crate::receiver::Receiver;

dual!(
    subscription_patterns_fan_out,
    the_catalog_validates_typed_events,
    conditions_are_evaluated_and_traced,
    invoke_outputs_reach_the_action_endpoint_with_typed_arguments,
    emit_reaches_subscribers_and_chains_are_cut,
    malformed_rules_are_refused,
    dry_runs_send_and_write_nothing,
    rules_run_on_the_gateways_own_events,
    guards_refuse_or_hold_a_rules_calls,
    rule_changes_apply_only_at_the_version_read,
    emitted_events_keep_to_their_type_and_limits,
    an_endpoint_receives_an_event_once,
    rules_cannot_feed_or_flood_themselves,
);

/// `If-Match` on a rule: a save or delete based on a version someone changed meanwhile is a 412
/// and changes nothing; a rule read can be saved back as it is.
async fn rule_changes_apply_only_at_the_version_read(backend: Backend) {
    let app = TestApp::start(backend).await;
    let rule = |name: &str| {
        json!({"name": name, "enabled": true,
        "when": {"event_type": "ticket.created"},
        "then": [{"emit": {"type": "ticket.triaged", "data": {}}}]})
    };
    let (_, path) = crate::harness::create_at_version_1(&app, "/v1/rules", &rule("first")).await;
    // A rule sent without `enabled` runs, and reads back saying so.
    let mut bare = rule("bare");
    bare.as_object_mut().unwrap().remove("enabled");
    let (status, created) = app.call(Method::POST, "/v1/rules", Some(bare)).await;
    assert_eq!((status, &created["enabled"]), (201, &json!(true)), "{created}");
    let id = created["id"].as_str().unwrap();
    let (_, read_back) = app.call(Method::GET, &format!("/v1/rules/{id}"), None).await;
    assert_eq!(read_back["enabled"], true, "{read_back}");
    let put = |if_match: &str, body: Value| {
        app.as_key(&app.admin_key, Method::PUT, &path)
            .header("if-match", if_match)
            .json(&body)
    };

    // What a read answered goes back as it is, its server fields ignored.
    let read_at = app
        .as_key(&app.admin_key, Method::GET, &path)
        .send()
        .await
        .unwrap();
    let tag = read_at.headers()["etag"].to_str().unwrap().to_string();
    let (_, mut body) = read(read_at).await;
    body["name"] = json!("second");
    let saved = put(&tag, body.clone()).send().await.unwrap();
    assert_eq!(saved.status(), 200);
    assert_eq!(saved.headers()["etag"], "\"2\"");
    let (_, saved) = read(saved).await;
    assert_eq!(
        (saved["name"].clone(), saved["version"].clone()),
        (json!("second"), json!(2))
    );

    body["name"] = json!("lost");
    let (status, lost) = read(put(&tag, body).send().await.unwrap()).await;
    assert_eq!((status, error_code(&lost)), (412, "version_mismatch"), "{lost}");
    assert!(
        lost["error"]["message"].as_str().unwrap().contains("version 2"),
        "{lost}"
    );
    let (_, now) = app.call(Method::GET, &path, None).await;
    assert_eq!(now["name"], "second", "{now}");

    // Eight saves at once at version 2: one lands. Without If-Match, saves are unconditional.
    let saves = (0..8).map(|i| put("\"2\"", rule(&format!("edit {i}"))));
    let statuses = crate::harness::at_once(saves).await;
    assert_eq!(statuses, [200, 412, 412, 412, 412, 412, 412, 412]);
    let (status, blind) = app.call(Method::PUT, &path, Some(rule("blind"))).await;
    assert_eq!((status, blind["version"].clone()), (200, json!(4)), "{blind}");
    // Saving a rule back as it was read changes nothing, the version included; so does leaving
    // out `enabled`, which a rule is unless it says otherwise.
    let mut unchanged = rule("blind");
    let (status, same) = app.call(Method::PUT, &path, Some(blind.clone())).await;
    assert_eq!((status, same["version"].clone()), (200, json!(4)), "{same}");
    unchanged.as_object_mut().unwrap().remove("enabled");
    let (status, same) = app.call(Method::PUT, &path, Some(unchanged)).await;
    assert_eq!((status, same["version"].clone()), (200, json!(4)), "{same}");

    crate::harness::delete_checks_version(&app, &path, "\"3\"", "\"4\"").await;
    let (status, _) = read(put("\"4\"", rule("after")).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

async fn count(app: &TestApp, path: &str) -> usize {
    app.call(Method::GET, path, None).await.1["data"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

async fn subscription_patterns_fan_out(backend: Backend) {
    let World { app, rx: _ } = world(backend).await;
    let rx = Receiver::start().await;
    endpoint(&app, &rx.url("/all"), json!({"event_types": ["*"]})).await;
    endpoint(&app, &rx.url("/invoices"), json!({"event_types": ["invoice.*"]})).await;
    endpoint(&app, &rx.url("/paid"), json!({"event_types": ["invoice.paid"]})).await;
    endpoint(
        &app,
        &rx.url("/tickets"),
        json!({"event_types": ["ticket.created", "customer.*"]}),
    )
    .await;
    send_event(
        &app,
        "invoice.paid",
        json!({"invoice_id": "in_1", "amount": 100, "currency": "eur"}),
    )
    .await;
    send_event(&app, "invoice.voided", json!({"invoice_id": "in_1"})).await;
    send_event(
        &app,
        "ticket.created",
        json!({"ticket_id": "t", "subject": "s", "priority": "low"}),
    )
    .await;
    send_event(&app, "custom.thing", json!({"x": 1})).await;
    let got = rx.wait_for(8).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut by_path: HashMap<String, Vec<String>> = HashMap::new();
    for r in rx.received() {
        by_path
            .entry(r.target.clone())
            .or_default()
            .push(r.header("x-opsiq-event").unwrap().to_string());
    }
    assert_eq!(got.len(), 8, "{by_path:?}");
    assert_eq!(by_path["/all"].len(), 4);
    assert_eq!(by_path["/invoices"].len(), 2);
    assert_eq!(by_path["/paid"], vec!["invoice.paid"]);
    assert_eq!(by_path["/tickets"], vec!["ticket.created"]);
    // The event log filters by the same patterns.
    for (filter, expected) in [
        ("invoice.*", vec!["invoice.voided", "invoice.paid"]),
        ("invoice.paid", vec!["invoice.paid"]),
        ("custom.thing", vec!["custom.thing"]),
        ("nothing.*", vec![]),
    ] {
        let (status, list) = app
            .call(Method::GET, &format!("/v1/events?type={filter}"), None)
            .await;
        assert_eq!(status, 200, "{list}");
        let types: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, expected, "{filter}");
    }
    assert_eq!(count(&app, "/v1/events?type=*").await, 4);
    for bad in ["in%20voice", "a..*", ".*", "invoice."] {
        let (status, _) = app
            .call(Method::GET, &format!("/v1/events?type={bad}"), None)
            .await;
        assert_eq!(status, 400, "{bad}");
    }
}

async fn the_catalog_validates_typed_events(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (_, types) = app.call(Method::GET, "/v1/event-types", None).await;
    let names: Vec<&str> = types["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for builtin in [
        "invoice.paid",
        "ticket.created",
        "customer.signed_up",
        "license.expired",
        "chat.human_requested",
        "action.invoked",
        "action.succeeded",
        "action.failed",
        "delivery.failed",
        "endpoint.disabled",
        "approval.requested",
    ] {
        assert!(names.contains(&builtin), "{builtin} missing");
    }
    let post = |t: &str, data: Value| {
        let app = &app;
        let t = t.to_string();
        async move {
            app.call(Method::POST, "/v1/events", Some(json!({"type": t, "data": data})))
                .await
        }
    };
    let (status, body) = post(
        "invoice.paid",
        json!({"invoice_id": "in_1", "amount": "lots", "extra": true}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let paths = details(&body, "path");
    assert!(paths.contains(&"/data/amount"), "{paths:?}");
    assert!(
        body["error"]["details"].to_string().contains("currency"),
        "missing required fields are named: {body}"
    );
    assert_eq!(
        post(
            "invoice.paid",
            json!({"invoice_id": "in_1", "amount": 5, "currency": "eur", "note": "extra ok"})
        )
        .await
        .0,
        202
    );
    let (status, _) = post(
        "ticket.created",
        json!({"ticket_id": "t", "subject": "s", "priority": "whenever"}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        post("anything.custom", json!({"free": ["form"]})).await.0,
        202,
        "undeclared types are free-form"
    );
    for malformed in ["a..b", ".a", "a.", "in voice"] {
        assert_eq!(post(malformed, json!({})).await.0, 422, "{malformed}");
    }

    let custom = json!({"name": "order.shipped", "description": "An order left the warehouse",
        "schema": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}});
    let (status, created) = app
        .call(Method::POST, "/v1/event-types", Some(custom.clone()))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        app.call(Method::POST, "/v1/event-types", Some(custom)).await.0,
        409
    );
    assert_eq!(post("order.shipped", json!({})).await.0, 422);
    assert_eq!(post("order.shipped", json!({"order_id": "o1"})).await.0, 202);
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/event-types",
            Some(json!({"name": "no.schema", "description": "free"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(post("no.schema", json!({"anything": 1})).await.0, 202);
    // Names OpsIQ raises events under cannot be declared (a schema there would bind its own).
    for reserved in ["opsiq.test", "action.mine", "delivery.failed"] {
        let (status, body) = app
            .call(Method::POST, "/v1/event-types", Some(json!({"name": reserved})))
            .await;
        assert_eq!(
            (status, body["error"]["details"][0]["path"].as_str()),
            (422, Some("/name")),
            "{reserved}: {body}"
        );
    }
    // A schema no object meets would refuse every event of its type.
    for schema in [
        json!({"type": "string"}),
        json!(false),
        json!(["object"]),
        json!({"type": ["array", "null"]}),
    ] {
        let (status, body) = app
            .call(
                Method::POST,
                "/v1/event-types",
                Some(json!({"name": "never.sent", "schema": schema})),
            )
            .await;
        assert_eq!(
            (status, body["error"]["details"][0]["path"].as_str()),
            (422, Some("/schema")),
            "{schema}: {body}"
        );
    }
    let bad =
        json!({"name": "bad.schema", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}});
    let (status, body) = app.call(Method::POST, "/v1/event-types", Some(bad)).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["details"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/schema")
    );
    assert_eq!(
        app.call(
            Method::POST,
            "/v1/event-types",
            Some(json!({"name": "invoice.paid"}))
        )
        .await
        .0,
        409
    );
    let (status, one) = app.call(Method::GET, "/v1/event-types/order.shipped", None).await;
    assert_eq!((status, one["builtin"].as_bool()), (200, Some(false)));
    // Read, it says when it was declared, as its creation answered; a built-in one does not.
    assert_eq!(one["created_at"], created["created_at"], "{one}");
    let (_, paid) = app.call(Method::GET, "/v1/event-types/invoice.paid", None).await;
    assert!(
        paid.get("created_at").is_none() && paid["builtin"] == true,
        "{paid}"
    );

    // The catalog pages by name, built-in and custom types together.
    let (_, all) = app.call(Method::GET, "/v1/event-types?limit=200", None).await;
    let all: Vec<String> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    assert!(all.iter().any(|n| n == "order.shipped") && all.iter().any(|n| n == "invoice.paid"));
    let (mut paged, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/event-types?limit=4&cursor={c}"),
            None => "/v1/event-types?limit=4".to_string(),
        };
        let (status, page) = app.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let names = page["data"].as_array().unwrap();
        assert!(names.len() <= 4);
        paged.extend(names.iter().map(|t| t["name"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(paged, all);
    // A cursor no page gave is refused, as by every list.
    let (status, body) = app.call(Method::GET, "/v1/event-types?cursor=%ff%fe", None).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_cursor"), "{body}");
    // Another tenant does not see this tenant's custom types.
    let (_, other) = app.new_tenant("globex").await;
    assert_eq!(
        app.call_as(&other, Method::GET, "/v1/event-types/order.shipped", None)
            .await
            .0,
        404
    );
    // A custom type can be changed (its schema replaced or removed) and deleted; built-in ones
    // cannot, and nothing is changed by a refused request.
    let path = "/v1/event-types/order.shipped";
    let new_schema = json!({"type": "object", "required": ["order_id", "carrier"]});
    let (status, changed) = app
        .call(
            Method::PATCH,
            path,
            Some(json!({"schema": new_schema, "description": "Left us"})),
        )
        .await;
    assert_eq!(changed["created_at"], created["created_at"], "{changed}");
    assert_eq!(
        (status, &changed["schema"], &changed["description"]),
        (200, &new_schema, &json!("Left us")),
        "{changed}"
    );
    eventually(Duration::from_secs(10), || async {
        (post("order.shipped", json!({"order_id": "o2"})).await.0 == 422).then_some(())
    })
    .await;
    for (bad, at) in [
        (json!({"schema": {"type": "string"}}), "/schema"),
        (json!({"description": null}), "/description"),
        (json!({"name": "renamed"}), "/"),
    ] {
        let (status, body) = app.call(Method::PATCH, path, Some(bad.clone())).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert!(
            body["error"]["details"][0]["path"]
                .as_str()
                .unwrap()
                .starts_with(at),
            "{bad}: {body}"
        );
    }
    let (status, cleared) = app.call(Method::PATCH, path, Some(json!({"schema": null}))).await;
    assert_eq!(
        (status, &cleared["schema"], &cleared["description"]),
        (200, &Value::Null, &json!("Left us")),
        "{cleared}"
    );
    eventually(Duration::from_secs(10), || async {
        (post("order.shipped", json!({"anything": 1})).await.0 == 202).then_some(())
    })
    .await;
    for (method, builtin) in [
        (Method::PATCH, "invoice.paid"),
        (Method::DELETE, "action.invoked"),
    ] {
        let body = (method == Method::PATCH).then(|| json!({"description": "mine"}));
        let (status, answer) = app
            .call(method, &format!("/v1/event-types/{builtin}"), body)
            .await;
        assert_eq!(status, 409, "{builtin}: {answer}");
    }
    assert_eq!(app.call(Method::DELETE, path, None).await.0, 204);
    assert_eq!(app.call(Method::GET, path, None).await.0, 404);
    assert_eq!(app.call(Method::DELETE, path, None).await.0, 404);
    assert_eq!(
        app.call(Method::PATCH, "/v1/event-types/never.declared", Some(json!({})))
            .await
            .0,
        404
    );
}

async fn create_rule(app: &TestApp, rule: Value) -> String {
    let (status, body) = app.call(Method::POST, "/v1/rules", Some(rule)).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

async fn conditions_are_evaluated_and_traced(backend: Backend) {
    let World { app, rx: _ } = world(backend).await;
    let escalations = Receiver::start().await;
    let (ep, _) = endpoint(
        &app,
        &escalations.url("/escalations"),
        json!({"event_types": ["none.*"]}),
    )
    .await;
    let rule_id = create_rule(
        &app,
        json!({"name": "Escalate enterprise outages", "enabled": true,
            "when": {"event_type": "ticket.*"},
            "if": {"all": [{"field": "data.customer.tier", "op": "eq", "value": "enterprise"},
                           {"field": "data.priority", "op": "in", "value": ["high", "urgent"]},
                           {"any": [{"field": "data.subject", "op": "contains", "value": "outage"},
                                    {"not": {"field": "data.tags", "op": "contains", "value": "test"}}]}]},
            "then": [{"deliver": {"endpoint_id": ep}}]}),
    )
    .await;
    let ticket = |tier: Value, priority: &str, subject: &str, tags: Value| json!({"ticket_id": "t1", "subject": subject, "priority": priority, "customer": {"id": "c", "tier": tier}, "tags": tags});
    let matching = send_event(
        &app,
        "ticket.created",
        ticket(json!("enterprise"), "urgent", "Checkout OUTAGE", json!(["test"])),
    )
    .await;
    let via_not = send_event(
        &app,
        "ticket.updated",
        ticket(json!("enterprise"), "high", "slow page", json!(["prod"])),
    )
    .await;
    let wrong_tier = send_event(
        &app,
        "ticket.created",
        ticket(json!("pro"), "urgent", "outage", json!([])),
    )
    .await;
    // ticket.updated is undeclared (free-form), so a number may stand where the rule expects a string.
    let mismatched_type = send_event(
        &app,
        "ticket.updated",
        ticket(json!(3), "urgent", "outage", json!([])),
    )
    .await;
    let missing = send_event(
        &app,
        "ticket.created",
        json!({"ticket_id": "t", "subject": "outage", "priority": "urgent"}),
    )
    .await;
    let got = escalations.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(escalations.received().len(), 2);
    let ids: Vec<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&matching) && ids.contains(&via_not));

    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{matching}"), None)
        .await;
    let trace = &event["rules"][0];
    assert_eq!(trace["rule_id"], rule_id.as_str());
    assert_eq!(trace["matched"], true);
    assert_eq!(trace["conditions"].as_array().unwrap().len(), 4);
    assert_eq!(trace["conditions"][0]["held"], true);
    assert_eq!(trace["conditions"][3]["at"], "/if/all/2/any/1/not");
    assert!(
        trace["outputs"][0]["delivery_id"]
            .as_str()
            .unwrap()
            .starts_with("dlv_")
    );
    for (id, why) in [
        (&wrong_tier, "wrong tier"),
        (&mismatched_type, "number vs string"),
        (&missing, "missing fields"),
    ] {
        let (_, event) = app.call(Method::GET, &format!("/v1/events/{id}"), None).await;
        assert_eq!(event["rules"][0]["matched"], false, "{why}: {event}");
        assert_eq!(event["rules"][0]["conditions"][0]["held"], false, "{why}");
        assert_eq!(event["rules"][0]["rule_id"], rule_id.as_str(), "{why}");
    }
    // A trace with no match is stored compactly; it still reads back condition by condition.
    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{wrong_tier}"), None)
        .await;
    let held: Vec<&Value> = event["rules"][0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["held"])
        .collect();
    assert_eq!(
        held,
        [&json!(false), &json!(true), &json!(true), &json!(false)],
        "{event}"
    );
    // Renamed, the rule still names the conditions a trace flagged; once its conditions change,
    // a trace no longer shows today's as if they were then.
    let (_, mut stored) = app.call(Method::GET, &format!("/v1/rules/{rule_id}"), None).await;
    stored["name"] = "Renamed".into();
    let (status, body) = app
        .call(Method::PUT, &format!("/v1/rules/{rule_id}"), Some(stored.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{matching}"), None)
        .await;
    assert_eq!(event["rules"][0]["name"], "Renamed", "{event}");
    assert_eq!(
        event["rules"][0]["conditions"].as_array().map(Vec::len),
        Some(4),
        "{event}"
    );
    stored["if"] = json!({"field": "data.priority", "op": "eq", "value": "low"});
    let (status, body) = app
        .call(Method::PUT, &format!("/v1/rules/{rule_id}"), Some(stored))
        .await;
    assert_eq!(status, 200, "{body}");
    for id in [&matching, &wrong_tier] {
        let (_, event) = app.call(Method::GET, &format!("/v1/events/{id}"), None).await;
        let trace = &event["rules"][0];
        assert_eq!(
            (&trace["changed_since"], trace.get("conditions")),
            (&json!(true), None),
            "{event}"
        );
        assert_eq!(trace["held"].as_array().map(Vec::len), Some(4), "{event}");
    }
    // Events no rule is triggered by carry no trace.
    let other = send_event(
        &app,
        "invoice.paid",
        json!({"invoice_id": "i", "amount": 1, "currency": "eur"}),
    )
    .await;
    assert_eq!(
        app.call(Method::GET, &format!("/v1/events/{other}"), None)
            .await
            .1["rules"],
        json!([])
    );

    // Disabling the rule stops it at once.
    let (_, mut rule) = app.call(Method::GET, &format!("/v1/rules/{rule_id}"), None).await;
    rule["enabled"] = false.into();
    assert_eq!(
        app.call(Method::PUT, &format!("/v1/rules/{rule_id}"), Some(rule))
            .await
            .0,
        200
    );
    send_event(
        &app,
        "ticket.created",
        ticket(json!("enterprise"), "urgent", "outage", json!([])),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(escalations.received().len(), 2);
}

async fn invoke_outputs_reach_the_action_endpoint_with_typed_arguments(backend: Backend) {
    let World { app, rx } = world(backend).await;
    let rule_id = create_rule(
        &app,
        json!({"name": "Goodwill extension", "when": {"event_type": "license.expired"},
            "if": {"field": "data.plan", "op": "starts_with", "value": "enterprise"},
            "then": [{"invoke": {"action": "extend_license",
                                 "arguments": {"license_id": "{{data.license_id}}", "days": "{{data.grace_days}}",
                                               "reason": "auto-extended for {{data.customer_id}}"}}}]}),
    )
    .await;
    let event_id = send_event(
        &app,
        "license.expired",
        json!({"license_id": "lic_9", "customer_id": "cus_1", "plan": "enterprise-annual", "grace_days": 7}),
    )
    .await;
    let got = rx.wait_for(1).await;
    let body = got[0].json();
    assert_eq!(got[0].header("x-opsiq-action"), Some("extend_license"));
    assert_eq!(body["arguments"]["license_id"], "lic_9");
    assert_eq!(
        body["arguments"]["days"], 7,
        "a whole-string template keeps the number type"
    );
    assert_eq!(body["arguments"]["reason"], "auto-extended for cus_1");
    assert_eq!(body["agent"]["id"], format!("rule:{rule_id}"));

    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{event_id}"), None)
        .await;
    let invocation_id = event["rules"][0]["outputs"][0]["invocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let invocation = eventually(Duration::from_secs(30), || async {
        let (_, inv) = app
            .call(Method::GET, &format!("/v1/invocations/{invocation_id}"), None)
            .await;
        (inv["status"] == "succeeded").then_some(inv)
    })
    .await;
    assert_eq!(invocation["principal"], format!("rule:{rule_id}"));

    // Arguments that fail the schema are recorded as a failed invocation, never delivered.
    send_event(
        &app,
        "license.expired",
        json!({"license_id": "BAD", "customer_id": "c", "plan": "enterprise", "grace_days": 90}),
    )
    .await;
    let failed = eventually(Duration::from_secs(10), || async {
        let (_, list) = app.call(Method::GET, "/v1/invocations?status=failed", None).await;
        list["data"].as_array().and_then(|d| d.first().cloned())
    })
    .await;
    assert_eq!(failed["error"]["code"], "validation_failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
}

async fn emit_reaches_subscribers_and_chains_are_cut(backend: Backend) {
    let World { app, rx: _ } = world(backend).await;
    let subscriber = Receiver::start().await;
    endpoint(
        &app,
        &subscriber.url("/escalations"),
        json!({"event_types": ["escalation.*"]}),
    )
    .await;
    create_rule(
        &app,
        json!({"name": "Open escalation", "when": {"event_type": "chat.human_requested"},
            "then": [{"emit": {"type": "escalation.opened", "data": {"conversation": "{{data.conversation_id}}", "source": "chat"}}}]}),
    )
    .await;
    // A rule that also delivers the event itself: that delivery is the event's own too.
    let direct = Receiver::start().await;
    let (direct_ep, _) = endpoint(&app, &direct.url("/direct"), json!({"event_types": ["none.*"]})).await;
    create_rule(
        &app,
        json!({"name": "Hand chats over", "when": {"event_type": "chat.human_requested"},
            "then": [{"deliver": {"endpoint_id": direct_ep}}]}),
    )
    .await;
    let post_parent = || async {
        let request = app
            .admin(Method::POST, "/v1/events")
            .header("idempotency-key", "chat-conv-5")
            .json(&json!({"type": "chat.human_requested", "data": {"conversation_id": "conv_5"}}));
        let (status, body) = read(request.send().await.unwrap()).await;
        assert_eq!(status, 202, "{body}");
        body
    };
    let first = post_parent().await;
    let parent = first["event_id"].as_str().unwrap().to_string();
    let got = subscriber.wait_for(1).await;
    let emitted = got[0].json();
    assert_eq!(emitted["type"], "escalation.opened");
    assert_eq!(emitted["data"]["conversation"], "conv_5");
    let (_, event) = app.call(Method::GET, &format!("/v1/events/{parent}"), None).await;
    assert_eq!(event["rules"][0]["outputs"][0]["event_id"], emitted["id"]);
    // The answer counts the event's own deliveries, not its emitted event's, as a replay does.
    let own = event["deliveries"].as_array().unwrap().len();
    assert!(own >= 1, "{event}");
    assert_eq!(first["deliveries"], own, "{first} {event}");
    let replay = post_parent().await;
    assert_eq!(
        (&replay["event_id"], &replay["deliveries"]),
        (&first["event_id"], &first["deliveries"])
    );
    let (_, child) = app
        .call(
            Method::GET,
            &format!("/v1/events/{}", emitted["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert!(child["source"].as_str().unwrap().starts_with("rule:"));

    // A rule that re-emits what triggers it is cut at depth 8.
    create_rule(
        &app,
        json!({"name": "Loop", "when": {"event_type": "loop.*"},
            "then": [{"emit": {"type": "loop.again", "data": {"n": "{{data.n}}"}}}]}),
    )
    .await;
    send_event(&app, "loop.start", json!({"n": 1})).await;
    let loops = count(&app, "/v1/events?type=loop.again&limit=100").await;
    assert_eq!(loops, 8, "eight emitted events, then the chain stops");
    let (_, last) = app
        .call(Method::GET, "/v1/events?type=loop.again&limit=1", None)
        .await;
    let last_id = last["data"][0]["id"].as_str().unwrap();
    let (_, last) = app
        .call(Method::GET, &format!("/v1/events/{last_id}"), None)
        .await;
    assert!(
        last["rules"][0]["outputs"][0]["cut"]
            .as_str()
            .unwrap()
            .contains("depth 8"),
        "{last}"
    );

    // Rules that multiply (four emits each, eight levels deep: 87,000 events) stop at 100
    // emitted events in all.
    let four = json!({"emit": {"type": "fan.more", "data": {}}});
    create_rule(
        &app,
        json!({"name": "Fan", "when": {"event_type": "fan.*"}, "then": [four, four, four, four]}),
    )
    .await;
    let start = send_event(&app, "fan.start", json!({})).await;
    let (_, page) = app
        .call(Method::GET, "/v1/events?type=fan.more&limit=200", None)
        .await;
    assert_eq!(
        page["data"].as_array().unwrap().len(),
        100,
        "{}",
        page["next_cursor"]
    );
    // The first output's chain took the whole budget; the start event's other three were cut.
    let (_, first) = app.call(Method::GET, &format!("/v1/events/{start}"), None).await;
    let outputs = first["rules"][0]["outputs"].as_array().unwrap();
    assert!(outputs[0]["event_id"].is_string(), "{first}");
    for cut in &outputs[1..] {
        assert!(
            cut["cut"].as_str().unwrap().contains("at most 100 events"),
            "{first}"
        );
    }
}

async fn malformed_rules_are_refused(backend: Backend) {
    let World { app, rx: _ } = world(backend).await;
    let base = |cond: Value, then: Value| json!({"name": "r", "when": {"event_type": "ticket.*"}, "if": cond, "then": then});
    let deliver_nowhere = json!([{"deliver": {"endpoint_id": "ep_missing"}}]);
    let (ep, _) = endpoint(&app, "http://127.0.0.1:9/x", json!({})).await;
    let ok_then = json!([{"deliver": {"endpoint_id": ep}}]);
    let cases = [
        (
            base(
                json!({"field": "data.x", "op": "approximately", "value": 1}),
                ok_then.clone(),
            ),
            "/if/op",
        ),
        (
            base(
                json!({"field": "data.x", "op": "matches", "value": "([unclosed"}),
                ok_then.clone(),
            ),
            "/if/value",
        ),
        (
            base(
                json!({"field": "data.x", "op": "matches", "value": "(x{1,1000}){1,1000}(y{1,1000}){1,1000}"}),
                ok_then.clone(),
            ),
            "/if/value",
        ),
        (
            base(
                json!({"field": "data.x", "op": "in", "value": "not-a-list"}),
                ok_then.clone(),
            ),
            "/if/value",
        ),
        (base(json!({"all": []}), ok_then.clone()), "/if/all"),
        (
            base(
                json!({"any": [{"field": "", "op": "eq", "value": 1}]}),
                ok_then.clone(),
            ),
            "/if/any/0/field",
        ),
        (
            base(
                json!({"not": {"field": "data..tier", "op": "eq", "value": 1}}),
                ok_then.clone(),
            ),
            "/if/not/field",
        ),
        (
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                json!([{"invoke": {"action": "create_ticket", "args": {}}}]),
            ),
            "/then/0/invoke",
        ),
        (
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                json!([{"invok": {"action": "create_ticket"}}]),
            ),
            "/then/0",
        ),
        (
            // Seventeen regexes, spread over nested groups (each group holds at most 50 items).
            base(
                json!({"all": [
                    {"any": vec![json!({"field": "data.s", "op": "matches", "value": "\\w{5}"}); 9]},
                    {"not": {"all": vec![json!({"field": "data.t", "op": "matches", "value": "x"}); 8]}}
                ]}),
                ok_then.clone(),
            ),
            "/if",
        ),
        (
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                deliver_nowhere,
            ),
            "/then/0/deliver/endpoint_id",
        ),
        (
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                json!([{"invoke": {"action": "no_such_action"}}]),
            ),
            "/then/0/invoke/action",
        ),
        (
            base(json!({"field": "data.x", "op": "eq", "value": 1}), json!([])),
            "/then",
        ),
        (
            // Fixed arguments the action's schema refuses are told at save, at their place.
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                json!([{"invoke": {"action": "refund_invoice", "arguments":
                    {"invoice_id": "in_1", "amount": "lots", "currency": "eur", "reason": "duplicate"}}}]),
            ),
            "/then/0/invoke/arguments/amount",
        ),
        (
            base(
                json!({"field": "data.x", "op": "eq", "value": 1}),
                json!([{"invoke": {"action": "refund_invoice", "arguments":
                    {"invoice_id": "{{data.invoice}}", "currency": "eur", "reason": "duplicate"}}}]),
            ),
            "/then/0/invoke/arguments/amount",
        ),
        (
            json!({"name": "r", "when": {"event_type": "bad type"}, "then": ok_then.clone()}),
            "/when/event_type",
        ),
        (
            json!({"name": "r", "when": {"event_type": "ticket..*"}, "then": ok_then.clone()}),
            "/when/event_type",
        ),
        (json!({"when": {"event_type": "x"}, "then": ok_then.clone()}), "/"),
        (
            json!({"name": "r", "when": {"event_type": "x"}, "then": ok_then.clone(), "surprise": 1}),
            "/",
        ),
    ];
    for (rule, path) in cases {
        let (status, body) = app.call(Method::POST, "/v1/rules", Some(rule.clone())).await;
        assert_eq!(status, 422, "{rule}: {body}");
        assert_eq!(error_code(&body), "validation_failed");
        let details = body["error"]["details"].as_array().unwrap();
        assert!(
            details
                .iter()
                .any(|d| d["path"].as_str().unwrap().starts_with(path)),
            "{rule}: expected {path} in {body}"
        );
        // Each problem is told in the form the rule meant, not as "none of the forms fit".
        assert!(!body.to_string().contains("oneOf"), "{body}");
    }
    // An empty comparison is told what it lacks, once each.
    let (status, body) = app
        .call(Method::POST, "/v1/rules", Some(base(json!({}), ok_then.clone())))
        .await;
    assert_eq!(status, 422, "{body}");
    let told = details(&body, "message");
    assert_eq!(told.len(), 2, "{body}");
    assert!(
        told.iter().any(|m| m.contains("field")) && told.iter().any(|m| m.contains("op")),
        "{body}"
    );
    assert_eq!(count(&app, "/v1/rules").await, 0, "nothing half-written");
    let (status, _) = app.call(Method::GET, "/v1/rules/rul_nope", None).await;
    assert_eq!(status, 404);

    // What a template fills in from each event is judged when the rule runs, not at save: a
    // templated amount, and templates inside fixed text.
    for arguments in [
        json!({"invoice_id": "in_1", "amount": "{{data.amount}}", "currency": "eur", "reason": "duplicate"}),
        json!({"invoice_id": "in_{{data.invoice}}", "amount": 5, "currency": "{{data.currency}}", "reason": "duplicate"}),
    ] {
        let rule = base(
            json!({"field": "data.x", "op": "eq", "value": 1}),
            json!([{"invoke": {"action": "refund_invoice", "arguments": arguments}}]),
        );
        let (status, body) = app.call(Method::POST, "/v1/rules", Some(rule)).await;
        assert_eq!(status, 201, "{arguments}: {body}");
    }
}

async fn dry_runs_send_and_write_nothing(backend: Backend) {
    let World { app, rx } = world(backend).await;
    let escalations = Receiver::start().await;
    let (ep, secret) = endpoint(
        &app,
        &escalations.url("/esc?src=rules"),
        json!({"event_types": ["escalation.*"]}),
    )
    .await;
    let rule = json!({"name": "Everything", "when": {"event_type": "ticket.*"},
        "if": {"field": "data.priority", "op": "eq", "value": "urgent"},
        "then": [{"deliver": {"endpoint_id": ep}},
                 {"invoke": {"action": "create_ticket", "arguments": {"customer_id": "{{data.customer.id}}", "subject": "Follow up {{data.ticket_id}}", "body": "auto"}}},
                 {"emit": {"type": "escalation.opened", "data": {"ticket": "{{data.ticket_id}}"}}}]});
    let rule_id = create_rule(&app, rule.clone()).await;
    let before = (
        count(&app, "/v1/events").await,
        count(&app, "/v1/deliveries").await,
        count(&app, "/v1/invocations").await,
    );
    let sample = json!({"type": "ticket.created", "data": {"ticket_id": "t_1", "subject": "x", "priority": "urgent", "customer": {"id": "cus_2"}}});
    let (status, saved) = app
        .call(
            Method::POST,
            &format!("/v1/rules/{rule_id}/test"),
            Some(json!({"event": sample})),
        )
        .await;
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["matched"], true);
    assert_eq!(saved["sent"], false);
    let outputs = saved["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 3);
    let request = &outputs[0]["request"];
    assert!(request["url"].as_str().unwrap().ends_with("/esc?src=rules"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    opsiq::delivery::verify::verify_opsiq_v1(
        &[secret.as_str()],
        request["headers"].as_object().unwrap(),
        "/esc?src=rules",
        request["body"].as_str().unwrap().as_bytes(),
        now,
    )
    .expect("the previewed request is signed exactly as it would be sent");
    assert_eq!(outputs[1]["valid"], true, "{}", outputs[1]);
    let invoke_body: Value = serde_json::from_str(outputs[1]["request"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(invoke_body["arguments"]["customer_id"], "cus_2");
    assert_eq!(
        outputs[2]["requests"].as_array().unwrap().len(),
        1,
        "the emitted event would reach the escalation endpoint"
    );

    let (status, unsaved) = app
        .call(
            Method::POST,
            "/v1/rules/test",
            Some(json!({"rule": rule, "event": {"type": "ticket.created",
                "data": {"ticket_id": "t_2", "subject": "Question", "priority": "low"}}})),
        )
        .await;
    assert_eq!(status, 200, "{unsaved}");
    assert_eq!(unsaved["matched"], false);
    assert_eq!(unsaved["conditions"][0]["held"], false);
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/rules/test",
            Some(json!({"rule": {"name": "x"}, "event": {"type": "ticket.created"}})),
        )
        .await;
    assert_eq!(status, 422);

    let viewer = app.key_with_role("viewer").await;
    let (status, _) = app
        .call_as(
            &viewer,
            Method::POST,
            &format!("/v1/rules/{rule_id}/test"),
            Some(json!({"event": {"type": "ticket.created", "data": {}}})),
        )
        .await;
    assert_eq!(status, 403, "dry runs show signed requests: managers only");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = (
        count(&app, "/v1/events").await,
        count(&app, "/v1/deliveries").await,
        count(&app, "/v1/invocations").await,
    );
    assert_eq!(before, after, "a dry run writes nothing");
    assert!(
        escalations.received().is_empty() && rx.received().is_empty(),
        "a dry run sends nothing"
    );
    // A dry run on the event a real run had shows the very Idempotency-Key the call carried.
    let event_id = send_event(&app, "ticket.created", sample["data"].clone()).await;
    let sent = rx.wait_for(1).await;
    let mut replayed = sample.clone();
    replayed["id"] = event_id.clone().into();
    let (status, dry) = app
        .call(
            Method::POST,
            &format!("/v1/rules/{rule_id}/test"),
            Some(json!({"event": replayed})),
        )
        .await;
    assert_eq!(status, 200, "{dry}");
    let previewed = dry["outputs"][1]["request"]["headers"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("idempotency-key"))
        .map(|(_, v)| v.clone());
    assert_eq!(
        previewed.as_ref().and_then(Value::as_str),
        sent[0].header("idempotency-key"),
        "{dry}"
    );

    // A dry run judges an invoke as the real call would be: a disabled action fails, a guard
    // denies or holds the call for approval, and only what would be sent shows a request.
    let (_, mut refund) = app.call(Method::GET, "/v1/actions/refund_invoice", None).await;
    refund["guards"] = json!([
        {"if": {"field": "arguments.amount", "op": "gt", "value": 100000}, "then": "deny", "reason": "too large"},
        {"if": {"field": "arguments.amount", "op": "gt", "value": 50000}, "then": "require_approval", "reason": "large"}
    ]);
    let (status, body) = app
        .call(Method::PUT, "/v1/actions/refund_invoice", Some(refund))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, mut license) = app.call(Method::GET, "/v1/actions/extend_license", None).await;
    license["enabled"] = json!(false);
    let (status, body) = app
        .call(Method::PUT, "/v1/actions/extend_license", Some(license))
        .await;
    assert_eq!(status, 200, "{body}");
    let refund_of = |amount: i64| json!({"invoke": {"action": "refund_invoice", "arguments": {"invoice_id": "in_1", "amount": amount, "currency": "eur", "reason": "duplicate"}}});
    let judged = json!({"name": "Judged", "when": {"event_type": "ticket.*"},
        "then": [refund_of(200000), refund_of(60000), refund_of(100),
                 {"invoke": {"action": "extend_license", "arguments": {"license_id": "lic_1", "days": 7}}}]});
    let (status, run) = app
        .call(
            Method::POST,
            "/v1/rules/test",
            Some(json!({"rule": judged, "event": {"type": "ticket.updated", "data": {}}})),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    let outputs = run["outputs"].as_array().unwrap();
    let summary: Vec<(Value, Value, bool)> = outputs
        .iter()
        .map(|o| (o["status"].clone(), o["code"].clone(), o["request"].is_object()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (json!("denied"), json!("guard_denied"), false),
            (json!("pending_approval"), Value::Null, true),
            (json!("queued"), Value::Null, true),
            (json!("failed"), json!("unknown_action"), false),
        ],
        "{run}"
    );
    assert!(
        outputs[0]["error"].as_str().unwrap().contains("too large"),
        "{run}"
    );
    assert_eq!(outputs[1]["approval_reason"], "large", "{run}");
}

async fn rules_run_on_the_gateways_own_events(backend: Backend) {
    let World { app, rx } = world(backend).await;
    let watcher = Receiver::start().await;
    let (watch_ep, _) = endpoint(&app, &watcher.url("/watch"), json!({"event_types": ["none.*"]})).await;
    create_rule(
        &app,
        json!({"name": "Tell finance about refunds", "when": {"event_type": "action.succeeded"},
            "if": {"field": "data.action", "op": "eq", "value": "refund_invoice"},
            "then": [{"deliver": {"endpoint_id": watch_ep}}]}),
    )
    .await;
    // Every invocation opens a ticket: the ticket is the rule's own invocation, whose events run
    // no rules, so this stops after one ticket instead of looping.
    create_rule(
        &app,
        json!({"name": "Ticket for every call", "when": {"event_type": "action.invoked"},
            "then": [{"invoke": {"action": "create_ticket",
                "arguments": {"customer_id": "cus_1", "subject": "{{data.action}} called", "body": "by {{data.principal}}"}}}]}),
    )
    .await;
    let billing = agent_token(&app, "agt_r", &["billing"], &["invoke:*"]).await;
    let (status, body) = invoke(
        &app,
        &billing,
        "refund_invoice",
        json!({"invoice_id": "in_7", "amount": 10,
        "currency": "eur", "reason": "duplicate"}),
        Some("r-1"),
    )
    .await;
    assert!(status == 200 || status == 202, "{status} {body}");

    let told = watcher.wait_for(1).await;
    assert_eq!(told[0].json()["type"], "action.succeeded");
    assert_eq!(told[0].json()["data"]["invocation_id"], body["invocation_id"]);
    let calls = rx.wait_for(2).await;
    let ticket = calls
        .iter()
        .map(|c| c.json())
        .find(|c| c["action"]["name"] == "create_ticket")
        .expect("the rule opened a ticket");
    assert_eq!(ticket["arguments"]["subject"], "refund_invoice called");
    assert_eq!(ticket["arguments"]["body"], "by agent:agt_r");
    // Nothing more arrives: the ticket's own action.invoked started no second ticket.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.received().len(), 2);
    assert_eq!(watcher.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_event_types_are_there_without_their_files() {
    // A binary started away from the repository (no schemas/events beside it).
    let app = TestApp::on(Backend::Sqlite)
        .with(|raw, dir| raw.events_dir = dir.join("no-such-dir"))
        .start()
        .await;
    let (status, body) = app
        .call(Method::GET, "/v1/event-types/ticket.created", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["builtin"], true);
    assert_eq!(
        body["schema"]["properties"]["priority"]["enum"],
        json!(["low", "normal", "high", "urgent"])
    );
    // And its schema still guards ingestion.
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": "ticket.created", "data": {"ticket_id": "t", "subject": "s", "priority": "soon"}})),
        )
        .await;
    assert_eq!((status, error_code(&body)), (422, "validation_failed"), "{body}");
}

async fn guards_refuse_or_hold_a_rules_calls(backend: Backend) {
    let World { app, rx } = world(backend).await;
    let (_, mut action) = app.call(Method::GET, "/v1/actions/extend_license", None).await;
    action["guards"] = json!([
        {"if": {"field": "arguments.days", "op": "gt", "value": 20}, "then": "deny", "reason": "long extensions need sales"},
        {"if": {"field": "arguments.days", "op": "gt", "value": 10}, "then": "require_approval", "reason": "over ten days"}
    ]);
    let (status, body) = app
        .call(Method::PUT, "/v1/actions/extend_license", Some(action))
        .await;
    assert_eq!(status, 200, "{body}");
    create_rule(
        &app,
        json!({"name": "Grace", "when": {"event_type": "license.expired"},
            "then": [{"invoke": {"action": "extend_license",
                                 "arguments": {"license_id": "{{data.license_id}}", "days": "{{data.grace_days}}"}}}]}),
    )
    .await;
    let mut outcomes = Vec::new();
    for days in [25, 14, 5] {
        let event_id = send_event(
            &app,
            "license.expired",
            json!({"license_id": format!("lic_{days}"), "customer_id": "c", "grace_days": days}),
        )
        .await;
        let (_, event) = app
            .call(Method::GET, &format!("/v1/events/{event_id}"), None)
            .await;
        outcomes.push(event["rules"][0]["outputs"][0].clone());
    }
    assert_eq!(outcomes[0]["status"], "denied", "{}", outcomes[0]);
    assert_eq!(outcomes[0]["error"]["code"], "guard_denied");
    assert!(
        outcomes[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("need sales")
    );
    assert_eq!(outcomes[1]["status"], "pending_approval", "{}", outcomes[1]);
    let (_, pending) = app.call(Method::GET, "/v1/approvals?status=pending", None).await;
    assert_eq!(pending["data"][0]["invocation_id"], outcomes[1]["invocation_id"]);
    assert_eq!(pending["data"][0]["reason"], "over ten days");
    assert_eq!(outcomes[2]["status"], "queued", "{}", outcomes[2]);
    // Only the call no guard stopped reaches the endpoint.
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].json()["arguments"]["license_id"], "lic_5");
    let (_, denied) = app
        .call(
            Method::GET,
            &format!(
                "/v1/invocations/{}",
                outcomes[0]["invocation_id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(denied["status"], "denied", "{denied}");
}

/// An `emit` is held to what `POST /v1/events` would take: its type's schema, and the size of
/// an event sent in. A refused emit records nothing and says why in the trace; a dry run says
/// the same, and refuses a sample event the real ingestion would refuse.
async fn emitted_events_keep_to_their_type_and_limits(backend: Backend) {
    let app = TestApp::on(backend)
        .with(crate::delivery::fast_delivery)
        .with(|raw, _| raw.body_limit = 64 * 1024)
        .start()
        .await;
    let order = json!({"name": "order.placed", "schema": {"type": "object", "required": ["order_id"],
        "properties": {"order_id": {"type": "string"}}}});
    let (status, body) = app.call(Method::POST, "/v1/event-types", Some(order)).await;
    assert_eq!(status, 201, "{body}");
    let seed = create_rule(
        &app,
        json!({"name": "Seed", "when": {"event_type": "seed.go"}, "then": [
            {"emit": {"type": "invoice.paid", "data": {"bogus": 1}}},
            {"emit": {"type": "order.placed", "data": {"order_id": "{{data.n}}"}}},
            {"emit": {"type": "order.placed", "data": {"order_id": "{{data.s}}"}}}]}),
    )
    .await;
    let seeded = send_event(&app, "seed.go", json!({"n": 5, "s": "o_5"})).await;
    let (_, event) = app.call(Method::GET, &format!("/v1/events/{seeded}"), None).await;
    let outputs = event["rules"][0]["outputs"].as_array().unwrap();
    let error = |n: usize| outputs[n]["error"].as_str().unwrap_or_default().to_string();
    assert!(error(0).contains("schema of invoice.paid"), "{event}");
    assert!(error(1).contains("/data/order_id"), "{event}");
    assert!(outputs[2]["event_id"].is_string(), "{event}");
    assert_eq!(count(&app, "/v1/events?type=invoice.paid").await, 0);
    assert_eq!(count(&app, "/v1/events?type=order.placed").await, 1);

    // Each step doubles the data; the chain stops where an event sent in would be refused.
    create_rule(
        &app,
        json!({"name": "Grow", "when": {"event_type": "grow.*"},
            "then": [{"emit": {"type": "grow.more", "data": {"a": "{{data}}", "b": "{{data}}"}}}]}),
    )
    .await;
    send_event(&app, "grow.start", json!({"s": "x".repeat(10_000)})).await;
    let (_, grown) = app
        .call(Method::GET, "/v1/events?type=grow.more&limit=10", None)
        .await;
    let grown = grown["data"].as_array().unwrap();
    assert_eq!(grown.len(), 2, "20 KB and 40 KB are emitted, 80 KB is not");
    let (_, last) = app
        .call(
            Method::GET,
            &format!("/v1/events/{}", grown[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert!(
        last["rules"][0]["outputs"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("65536 bytes")),
        "{}",
        last["rules"]
    );

    // The dry run says what the real event did, and takes only what ingestion takes.
    let test_path = format!("/v1/rules/{seed}/test");
    let (status, run) = app
        .call(
            Method::POST,
            &test_path,
            Some(json!({"event": {"type": "seed.go", "data": {"n": 5, "s": "o_5"}}})),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert!(
        run["outputs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("schema of invoice.paid"),
        "{run}"
    );
    assert!(
        run["outputs"][1]["error"]
            .as_str()
            .unwrap()
            .contains("/data/order_id"),
        "{run}"
    );
    assert!(run["outputs"][2]["error"].is_null(), "{run}");
    assert_eq!(run["enabled"], true, "{run}");
    // A disabled rule's dry run says so: real events do not run it.
    let resting = create_rule(
        &app,
        json!({"name": "Resting", "enabled": false, "when": {"event_type": "seed.go"},
            "then": [{"emit": {"type": "order.placed", "data": {"order_id": "x"}}}]}),
    )
    .await;
    let (status, run) = app
        .call(
            Method::POST,
            &format!("/v1/rules/{resting}/test"),
            Some(json!({"event": {"type": "seed.go", "data": {}}})),
        )
        .await;
    assert_eq!(
        (status, &run["enabled"], &run["matched"]),
        (200, &json!(false), &json!(true)),
        "{run}"
    );
    let (status, body) = app
        .call(
            Method::POST,
            &test_path,
            Some(json!({"event": {"type": "order.placed", "data": {"order_id": 5}}})),
        )
        .await;
    assert_eq!((status, error_code(&body)), (422, "validation_failed"), "{body}");
    assert_eq!(
        body["error"]["details"][0]["path"], "/event/data/order_id",
        "{body}"
    );
    let (status, body) = app
        .call(
            Method::POST,
            &test_path,
            Some(json!({"event": {"type": "seed.go", "data": [1]}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
}

/// An endpoint that subscribes to an event and is also a rule's `deliver` target, or the target
/// of two rules, receives the event once; the trace names the one delivery.
async fn an_endpoint_receives_an_event_once(backend: Backend) {
    let app = TestApp::on(backend)
        .with(crate::delivery::fast_delivery)
        .start()
        .await;
    let rx = Receiver::start().await;
    let (subscribed, _) = endpoint(&app, &rx.url("/subscribed"), json!({"event_types": ["ticket.*"]})).await;
    let (targeted, _) = endpoint(&app, &rx.url("/targeted"), json!({"event_types": ["none.*"]})).await;
    for name in ["First", "Second"] {
        create_rule(
            &app,
            json!({"name": name, "when": {"event_type": "ticket.created"},
                "then": [{"deliver": {"endpoint_id": subscribed}}, {"deliver": {"endpoint_id": targeted}}]}),
        )
        .await;
    }
    let ticket = json!({"ticket_id": "t_1", "subject": "Fire", "priority": "high"});
    let (status, answer) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(json!({"type": "ticket.created", "data": ticket})),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deliveries"], 2, "{answer}");
    let got = rx.wait_for(2).await;
    let targets: Vec<String> = got.iter().map(|r| r.target.clone()).collect();
    assert!(targets.contains(&"/subscribed".to_string()) && targets.contains(&"/targeted".to_string()));
    let event_id = answer["event_id"].as_str().unwrap();
    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{event_id}"), None)
        .await;
    assert_eq!(event["deliveries"].as_array().map(Vec::len), Some(2), "{event}");
    let second = &event["rules"][1]["outputs"];
    assert_eq!(
        second[1]["note"], "the endpoint already receives this event",
        "{event}"
    );
    assert_eq!(
        second[1]["delivery_id"], event["rules"][0]["outputs"][1]["delivery_id"],
        "{event}"
    );
    assert_eq!(
        event["rules"][0]["outputs"][0]["note"],
        "the endpoint already receives this event"
    );
    // The dry run says the same of the subscribed endpoint.
    let rule_id = event["rules"][0]["rule_id"].as_str().unwrap();
    let (status, run) = app
        .call(
            Method::POST,
            &format!("/v1/rules/{rule_id}/test"),
            Some(json!({"event": {"type": "ticket.created", "data": ticket}})),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        run["outputs"][0]["note"], "the endpoint already receives this event",
        "{run}"
    );
    assert!(run["outputs"][1]["note"].is_null(), "{run}");
}

/// A rule on `delivery.failed` whose own call fails runs once, not forever: the failure of a call
/// a rule made runs no rules (a 4xx is final at once, so the loop would spin). And an output whose
/// templates would render past the body limit is refused in the trace instead of being built.
async fn rules_cannot_feed_or_flood_themselves(backend: Backend) {
    let World { app, rx } = world(backend).await;
    rx.always(400);
    create_rule(
        &app,
        json!({"name": "Retry failed tickets", "when": {"event_type": "delivery.failed"},
            "if": {"field": "data.label", "op": "eq", "value": "create_ticket"},
            "then": [{"invoke": {"action": "create_ticket",
                "arguments": {"customer_id": "cus_1", "subject": "retry", "body": "{{data.delivery_id}}"}}}]}),
    )
    .await;
    let support = agent_token(&app, "agt_loop", &["support"], &["invoke:*"]).await;
    let args = json!({"customer_id": "cus_1", "subject": "printer", "body": "on fire"});
    let (status, body) = invoke(&app, &support, "create_ticket", args, Some("loop-1")).await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let failures = eventually(Duration::from_secs(30), || async {
        let (_, list) = app
            .call(Method::GET, "/v1/events?type=delivery.failed", None)
            .await;
        list["data"].as_array().filter(|d| d.len() >= 2).cloned()
    })
    .await;
    let mut traces = Vec::new();
    for failure in &failures {
        let id = failure["id"].as_str().or(failure["event_id"].as_str()).unwrap();
        let (_, event) = app.call(Method::GET, &format!("/v1/events/{id}"), None).await;
        traces.push((event["data"]["invocation_id"].clone(), event["rules"].clone()));
    }
    let (agents, rules): (Vec<_>, Vec<_>) = traces
        .iter()
        .partition(|(invocation, _)| *invocation == body["invocation_id"]);
    assert_eq!((agents.len(), rules.len()), (1, 1), "{traces:?}");
    assert_eq!(agents[0].1[0]["matched"], true, "{traces:?}");
    assert_eq!(
        rules[0].1,
        json!([]),
        "the rule's own failure ran no rules: {traces:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.received().len(),
        2,
        "the agent's call and the rule's, nothing more"
    );

    let mut copies: serde_json::Map<String, Value> =
        (0..100).map(|k| (format!("a{k}"), json!("{{data}}"))).collect();
    // The fields the schema requires are there, so the rule is saved and its rendering judged.
    for (field, value) in [
        ("customer_id", "cus_1"),
        ("subject", "copy"),
        ("body", "all of it"),
    ] {
        copies.insert(field.into(), value.into());
    }
    create_rule(
        &app,
        json!({"name": "Copy everything", "when": {"event_type": "blob.sent"},
            "then": [{"invoke": {"action": "create_ticket", "arguments": copies}}]}),
    )
    .await;
    let event_id = send_event(&app, "blob.sent", json!({"blob": "x".repeat(20_000)})).await;
    let (_, event) = app
        .call(Method::GET, &format!("/v1/events/{event_id}"), None)
        .await;
    let output = &event["rules"][0]["outputs"][0];
    assert!(
        output["error"]
            .as_str()
            .unwrap_or_default()
            .contains("past 1048576 bytes"),
        "{output}"
    );
    assert!(output["invoke"].get("arguments").is_none(), "{output}");
    assert_eq!(output["invoke"]["action"], "create_ticket");
}
