//! Checks against third-party implementations (Python packages, Node.js), installed by
//! `.ci/setup-external` into `target/ci-venv` and `target/ci-node`. Missing tools skip the check
//! locally and fail it in CI (`OPSIQ_REQUIRE_EXTERNAL=1`).

use std::path::PathBuf;

use crate::harness::{repo_path, skip_or_fail};

/// The Python interpreter with the test packages, if installed.
pub fn python() -> Option<PathBuf> {
    let venv = repo_path("target/ci-venv/bin/python");
    venv.exists().then_some(venv)
}

/// Verifies a received request with the `standardwebhooks` PyPI package.
pub async fn standardwebhooks_verifies(secret: &str, headers: &[(String, String)], body: &[u8]) {
    let Some(python) = python() else {
        skip_or_fail(
            "standardwebhooks verification",
            "run .ci/setup-external to install the Python package",
        );
        return;
    };
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
case = json.load(sys.stdin)
Webhook(case["secret"]).verify(case["body"].encode(), case["headers"])
print("valid")
"#;
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let input =
        serde_json::json!({"secret": secret, "headers": headers, "body": String::from_utf8_lossy(body)});
    let mut child = tokio::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    use tokio::io::AsyncWriteExt;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks refused our signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
