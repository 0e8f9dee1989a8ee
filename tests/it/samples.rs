//! The verification samples in docs/ pass every signing vector: the Rust one is compiled into
//! this test, the Python and Node.js ones are run by their interpreters.

use std::collections::HashSet;

use serde_json::Value;

use crate::harness::{repo_path, skip_or_fail};

mod rust_sample {
    #![allow(dead_code)]
    include!("../../docs/samples/verify.rs");
}

fn vectors() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_path("tests/fixtures/signing-vectors.json")).unwrap())
        .unwrap()
}

#[test]
fn rust_sample_passes_every_vector() {
    for case in vectors()["cases"].as_array().unwrap() {
        let secrets: Vec<&str> = case["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let headers: Vec<(&str, &str)> = case["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
            .collect();
        let mut seen = HashSet::new();
        let got = rust_sample::verify_webhook(
            &secrets,
            &headers,
            case["request_target"].as_str().unwrap(),
            case["body"].as_str().unwrap().as_bytes(),
            case["now"].as_i64().unwrap(),
            &mut seen,
        );
        match got {
            Ok(()) => assert!(case["valid"].as_bool().unwrap(), "{}", case["name"]),
            Err(e) => assert_eq!(e.reason(), case["reason"].as_str().unwrap(), "{}", case["name"]),
        }
    }
}

async fn run_sample(interpreter: &str, script: &str) {
    let out = tokio::process::Command::new(interpreter)
        .arg(repo_path(script))
        .arg(repo_path("tests/fixtures/signing-vectors.json"))
        .output()
        .await;
    match out {
        Ok(out) => assert!(
            out.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => skip_or_fail(
            &format!("{script} sample"),
            &format!("{interpreter} is not available ({e})"),
        ),
    }
}

#[tokio::test]
async fn python_sample_passes_every_vector() {
    run_sample("python3", "docs/samples/verify.py").await;
}

#[tokio::test]
async fn node_sample_passes_every_vector() {
    run_sample("node", "docs/samples/verify.js").await;
}
