//! Micro-benchmarks of the per-request hot paths: signing and verifying webhooks, verifying an
//! agent JWT, a casbin decision over 1,000 policy rows, validating a typical tool call against its
//! schema, and evaluating 1,000 rules against one event. Run with `cargo bench`.

use std::hint::black_box;

use opsiq::agents::tokens::{Claims, decode_gateway_token};
use opsiq::delivery::{signing, verify};
use opsiq::policy::{Compiled, PolicyRow};
use opsiq::registry::model::{compile_schema, schema_errors};
use opsiq::rules::engine::{CompiledRule, RuleSet};
use serde_json::{Value, json};

fn main() {
    divan::main();
}

const SECRET: &str = "whsec_kR7vQ2mX9pL4tN8wZ3bC6yF1hJ5sD0aE";
const BODY: &[u8] = br#"{"id":"evt_01JDZ8Q6Y3","type":"invoice.paid","data":{"invoice_id":"in_123","amount":4200,"currency":"eur"}}"#;

#[divan::bench]
fn sign_opsiq_v1() -> String {
    signing::sign_opsiq_v1(
        black_box(SECRET),
        "1764235200",
        "n_8f14e45fceea167a5a36dedd4bea2543",
        "idem_1",
        "/hooks",
        BODY,
    )
}

#[divan::bench]
fn verify_opsiq_v1(bencher: divan::Bencher) {
    let sig = signing::sign_opsiq_v1(SECRET, "1764235200", "n_1", "idem_1", "/hooks", BODY);
    let headers = vec![
        ("X-OpsIQ-Timestamp".to_string(), "1764235200".to_string()),
        ("X-OpsIQ-Nonce".to_string(), "n_1".to_string()),
        ("Idempotency-Key".to_string(), "idem_1".to_string()),
        ("X-OpsIQ-Signature".to_string(), format!("sha256={sig}")),
    ];
    bencher.bench(|| {
        verify::verify_opsiq_v1(
            &[SECRET],
            headers.as_slice(),
            "/hooks",
            black_box(BODY),
            1764235200,
        )
        .is_ok()
    });
}

#[divan::bench]
fn sign_standard_webhooks() -> Option<String> {
    signing::sign_standard(black_box(SECRET), "dlv_1", "1764235200", BODY)
}

#[divan::bench]
fn verify_agent_jwt(bencher: divan::Bencher) {
    let key = b"0123456789abcdef0123456789abcdef";
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: "agt_1".into(),
        tid: "ten_1".into(),
        roles: vec!["support".into()],
        scope: "invoke:*".into(),
        exp: now + 3600,
        iat: now,
        nbf: now,
        jti: "jti_1".into(),
        aud: "opsiq".into(),
        iss: "opsiq".into(),
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap();
    bencher.bench(|| decode_gateway_token(black_box(&token), key).is_ok());
}

fn policy_with_1000_rows() -> Compiled {
    let mut rows = Vec::new();
    for i in 0..1000 {
        let row = PolicyRow {
            subject: format!("role:r{}", i % 50),
            object: format!("action_{i}_*"),
            act: "invoke".into(),
            effect: if i % 10 == 0 { "deny" } else { "allow" }.into(),
        };
        rows.push((
            if i % 2 == 0 {
                "*".to_string()
            } else {
                "ten_1".to_string()
            },
            row,
        ));
    }
    rows.push((
        "*".into(),
        PolicyRow {
            subject: "role:support".into(),
            object: "refund_*".into(),
            act: "invoke".into(),
            effect: "allow".into(),
        },
    ));
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime
        .block_on(Compiled::new(opsiq::policy::DEFAULT_MODEL, rows))
        .unwrap()
}

#[divan::bench]
fn casbin_decide_1000_rows(bencher: divan::Bencher) {
    let policy = policy_with_1000_rows();
    let subjects = vec![
        "agent:agt_1".to_string(),
        "role:support".to_string(),
        "role:r7".to_string(),
    ];
    bencher.bench(|| {
        policy
            .decide("ten_1", black_box(&subjects), "refund_invoice")
            .unwrap()
    });
}

#[divan::bench]
fn validate_refund_call(bencher: divan::Bencher) {
    let decl: Value = serde_json::from_str(include_str!("../schemas/actions/refund_invoice.json")).unwrap();
    let validator = compile_schema(&decl["input_schema"]).unwrap();
    let args = json!({"invoice_id": "in_42", "amount": 1500, "currency": "eur", "reason": "service_outage", "note": "goodwill"});
    bencher.bench(|| schema_errors(&validator, black_box(&args)).is_empty());
}

#[divan::bench]
fn evaluate_1000_rules(bencher: divan::Bencher) {
    let rules: Vec<CompiledRule> = (0..1000)
        .map(|i| {
            let def = json!({"name": format!("r{i}"), "when": {"event_type": "ticket.*"},
                "if": {"all": [{"field": "data.customer.tier", "op": "eq", "value": if i % 3 == 0 { "enterprise" } else { "pro" }},
                               {"field": "data.priority", "op": "in", "value": ["high", "urgent"]},
                               {"any": [{"field": "data.subject", "op": "contains", "value": format!("word{i}")},
                                        {"not": {"field": "data.tags", "op": "contains", "value": "test"}}]}]},
                "then": [{"emit": {"type": "escalation.opened", "data": {"ticket": "{{data.ticket_id}}"}}}]});
            CompiledRule::compile(&format!("rul_{i:04}"), &def).unwrap()
        })
        .collect();
    let set = RuleSet::new(rules);
    let doc = json!({"id": "evt_1", "type": "ticket.created", "data": {"ticket_id": "t_1", "subject": "checkout outage word5",
        "priority": "urgent", "customer": {"id": "c_1", "tier": "enterprise"}, "tags": ["prod"]}});
    bencher.bench(|| set.evaluate("ticket.created", black_box(&doc)).len());
}
