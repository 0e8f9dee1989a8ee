//! The binary itself: `init`, configuration errors, and durability across `kill -9`.

use reqwest::Method;
use serde_json::json;

use crate::dual;
use crate::harness::{Backend, read};
use crate::process;

dual!(accepted_writes_survive_kill_9);

async fn accepted_writes_survive_kill_9(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let http = crate::harness::http_client();

    let server = process::serve(dir.path(), &url, &[]).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (http, base, key) = (http.clone(), server.base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"name": format!("action_{i}"), "input_schema": {"type": "object"}});
            let resp = http
                .post(format!("{base}/v1/actions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        if t.await.unwrap() == 201 {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 40);
    server.kill_9().await;

    let server = process::serve(dir.path(), &url, &[]).await;
    let resp = http
        .request(Method::GET, format!("{}/v1/actions?limit=100", server.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["data"].as_array().unwrap().len(),
        40,
        "every answered write survived"
    );
    server.kill_9().await;
}

#[tokio::test]
async fn init_prints_the_key_once_and_adds_tenants_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let (tenant, key) = process::init(dir.path(), &url).await;
    assert!(tenant.starts_with("ten_"));
    assert!(key.starts_with("opsiq_sk_"));

    let again = process::opsiq()
        .current_dir(dir.path())
        .args(["init", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success(), "a second plain init is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--tenant"));

    let out = process::opsiq()
        .current_dir(dir.path())
        .args(["init", "--database-url", &url, "--tenant", "globex"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("opsiq_sk_"), "{text}");
}

#[tokio::test]
async fn init_creates_a_private_master_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let out = process::opsiq()
        .env_remove("OPSIQ_MASTER_KEY")
        .current_dir(dir.path())
        .args(["init", "--json", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_file = dir.path().join("opsiq.key");
    let meta = std::fs::metadata(&key_file).expect("opsiq.key created");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "only the owner may read the key"
        );
    }
    let _ = meta;
}

/// A database opens only with the master key its secrets were sealed under: no new key file is
/// made for a database that has tenants, and a wrong key stops `serve`, `init --tenant` and
/// `audit verify` with that reason (not with errors at each use, or a chain that looks
/// tampered with).
#[tokio::test]
async fn a_database_opens_only_with_its_own_master_key() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", home.path().join("keyed.db").display());
    let out = process::opsiq()
        .env_remove("OPSIQ_MASTER_KEY")
        .current_dir(home.path())
        .args(["init", "--json", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wrong_key = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    type Case<'a> = (&'a [&'a str], Option<&'a str>, &'a str);
    let cases: [Case; 4] = [
        (
            &["serve", "--listen", "127.0.0.1:0"],
            None,
            "needs the master key they were sealed with",
        ),
        (&["init", "--tenant", "globex"], None, "opsiq.key"),
        (
            &["serve", "--listen", "127.0.0.1:0"],
            Some(wrong_key),
            "does not open this database's secrets",
        ),
        (
            &["audit", "verify"],
            Some(wrong_key),
            "does not open this database's secrets",
        ),
    ];
    for (args, key, needle) in cases {
        let mut cmd = process::opsiq();
        cmd.env_remove("OPSIQ_MASTER_KEY").current_dir(elsewhere.path());
        if let Some(key) = key {
            cmd.env("OPSIQ_MASTER_KEY", key);
        }
        let out = cmd
            .args(args)
            .args(["--database-url", &url])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must refuse: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !elsewhere.path().join("opsiq.key").exists(),
            "{args:?} made a key file"
        );
    }
    // With its own key, from anywhere, it opens.
    let key_file = home.path().join("opsiq.key");
    let out = process::opsiq()
        .env_remove("OPSIQ_MASTER_KEY")
        .env("OPSIQ_MASTER_KEY_FILE", &key_file)
        .current_dir(elsewhere.path())
        .args(["audit", "verify", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn nonsense_configuration_exits_non_zero_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        (
            &["listen", "--port", "0", "--secret", ""],
            &[],
            "must not be empty",
        ),
        (
            &[
                "listen",
                "--port",
                "0",
                "--secret",
                "whsec_x",
                "--forward",
                "ftp://x/y",
            ],
            &[],
            "http://",
        ),
        (
            &["verify", "--secret", " ", "--request-target", "/"],
            &[],
            "must not be empty",
        ),
        (&["serve", "--retry-schedule", "5s,often"], &[], "retry_schedule"),
        (&["serve", "--listen", "nowhere"], &[], "listen"),
        (&["serve", "--database-url", "mysql://x"], &[], "database_url"),
        (&["serve"], &[("OPSIQ_RETENTION", "forever")], "retention"),
        (&["serve", "--config", "missing.toml"], &[], "missing.toml"),
    ];
    for (args, env, needle) in cases {
        let mut cmd = process::opsiq();
        cmd.current_dir(dir.path()).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().await.unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::write(dir.path().join("bad.toml"), "body_limit = \"big\"\n").unwrap();
    let out = process::opsiq()
        .current_dir(dir.path())
        .args(["serve", "--config", "bad.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("body_limit"));
    // A misspelt setting is named, not left at its default without a word.
    std::fs::write(
        dir.path().join("typo.toml"),
        "databse_url = \"sqlite://typo.db\"\n",
    )
    .unwrap();
    let out = process::opsiq()
        .current_dir(dir.path())
        .args(["init", "--config", "typo.toml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`databse_url`"),
        "{out:?}"
    );
    assert!(!dir.path().join("opsiq.db").exists(), "nothing was created");
}

/// A SQLite database is served by one process (which keeps token revocations in memory on that
/// ground): a second `serve` on the same file is refused with a reason; after the first is
/// killed, a new one starts.
#[tokio::test]
async fn a_sqlite_database_is_served_by_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("one.db").display());
    process::init(dir.path(), &url).await;
    let first = process::serve(dir.path(), &url, &[]).await;
    let stderr = process::serve_refused(dir.path(), &url, &[]).await;
    assert!(stderr.contains("another opsiq process is serving"), "{stderr}");
    first.kill_9().await;
    let again = process::serve(dir.path(), &url, &[]).await;
    assert_eq!(
        crate::harness::http_client()
            .get(format!("{}/readyz", again.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn config_file_environment_and_flags_are_layered() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    process::init(dir.path(), &url).await;
    // The file asks for one port, the environment for the database; the flag wins over both.
    std::fs::write(
        dir.path().join("opsiq.toml"),
        format!(
            "listen = \"127.0.0.1:1\"\ndatabase_url = \"sqlite://{}/nope.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = process::opsiq()
        .current_dir(dir.path())
        .env("OPSIQ_DATABASE_URL", &url)
        .args(["serve", "--config", "opsiq.toml", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
    assert!(!line.ends_with(":1"), "the flag overrides the file");
    assert!(
        !dir.path().join("nope.db").exists(),
        "the environment overrides the file"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn first_serve_on_an_empty_database_makes_a_usable_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fresh.db").display());
    let mut child = process::opsiq()
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .env("OPSIQ_ACTIONS_DIR", crate::harness::repo_path("schemas/actions"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut key, mut base) = (None, None);
    while base.is_none() {
        let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("serve keeps running");
        if let Some(k) = line.split("keep it safe): ").nth(1) {
            key = Some(k.to_string());
        }
        base = line.strip_prefix("listening on ").map(str::to_string);
    }
    let (key, base) = (key.expect("the owner key is printed once"), base.unwrap());
    let resp = crate::harness::http_client()
        .get(format!("{base}/v1/actions/refund_invoice"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the shipped example actions are loaded");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn verify_command_passes_every_signing_vector() {
    let vectors: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::harness::repo_path("tests/fixtures/signing-vectors.json")).unwrap(),
    )
    .unwrap();
    for case in vectors["cases"].as_array().unwrap() {
        let mut cmd = process::opsiq();
        cmd.arg("verify")
            .args(["--request-target", case["request_target"].as_str().unwrap()])
            .args(["--now", &case["now"].to_string()]);
        for s in case["secrets"].as_array().unwrap() {
            cmd.args(["--secret", s.as_str().unwrap()]);
        }
        for (k, v) in case["headers"].as_object().unwrap() {
            cmd.args(["--header", &format!("{k}: {}", v.as_str().unwrap())]);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(case["body"].as_str().unwrap().as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        let (text, reason) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let name = case["name"].as_str().unwrap();
        if case["valid"].as_bool().unwrap() {
            assert!(out.status.success(), "{name}: {text} {reason}");
            assert_eq!(text.trim(), "valid");
        } else {
            // The reason goes to stderr, as every failing command's does.
            assert_eq!(
                (out.status.code(), text.trim()),
                (Some(1), ""),
                "{name}: {reason}"
            );
            assert!(
                reason.contains(case["reason"].as_str().unwrap()),
                "{name}: {reason}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_verifies_prints_and_forwards_a_real_delivery() {
    use crate::delivery::{endpoint, fast_delivery, send_event};
    use tokio::io::AsyncBufReadExt;

    let app = crate::harness::TestApp::on(crate::harness::Backend::Sqlite)
        .with(fast_delivery)
        .start()
        .await;
    let upstream = crate::receiver::Receiver::start().await;
    let secret = opsiq::delivery::signing::generate_secret();
    let mut child = process::opsiq()
        .args([
            "listen",
            "--port",
            "0",
            "--secret",
            &secret,
            "--forward",
            &upstream.url("/app/hook"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let base = first
        .strip_prefix("listening on ")
        .expect("address line")
        .to_string();
    endpoint(&app, &format!("{base}/hooks"), json!({"secret": secret})).await;
    send_event(&app, "ticket.updated", json!({"ticket_id": "t_1"})).await;

    let forwarded = upstream.wait_for(1).await;
    assert_eq!(forwarded[0].json()["data"]["ticket_id"], "t_1");
    assert!(
        forwarded[0].header("x-opsiq-signature").is_some(),
        "headers are forwarded"
    );
    let mut seen = String::new();
    while !seen.contains("forwarded") {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(seen.contains("valid (opsiq-v1)"), "{seen}");
    assert!(seen.contains("ticket.updated"), "{seen}");

    // A forged request is refused with the reason.
    let resp = crate::harness::http_client()
        .post(format!("{base}/hooks"))
        .header("x-opsiq-signature", "sha256=00")
        .header("x-opsiq-timestamp", "1")
        .header("x-opsiq-nonce", "n")
        .header("idempotency-key", "k")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    child.kill().await.unwrap();
}

/// `opsiq serve` gives SQLite's writer thread the configured scheduling priority, and no other
/// thread; an out-of-range value is refused before anything starts.
#[tokio::test]
async fn serve_sets_the_sqlite_writer_threads_priority() {
    if !cfg!(target_os = "linux") {
        eprintln!("skipped: thread priorities are read from /proc, which only Linux has");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nice.db").display());
    process::init(dir.path(), &url).await;
    let stderr = process::serve_refused(dir.path(), &url, &[("OPSIQ_SQLITE_WRITER_NICE", "20")]).await;
    assert!(stderr.contains("sqlite_writer_nice"), "{stderr}");

    // A lower priority than the tests' own (a higher nice) needs no privilege, so this holds
    // for any user and under `nice cargo test` too.
    let (_, baseline) = nice_of(std::path::Path::new("/proc/self/stat")).expect("own stat");
    let lower = baseline + 3;
    if lower > 19 {
        eprintln!("skipped: the tests run at nice {baseline}, too low a priority to lower further");
        return;
    }
    let server = process::serve_with(dir.path(), &url, &[], |cmd| {
        cmd.env("OPSIQ_SQLITE_WRITER_NICE", lower.to_string());
    })
    .await;
    let pid = server.child.id().expect("running");
    let threads: Vec<(String, i64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| nice_of(&task.unwrap().path().join("stat")))
        .collect();
    let writers: Vec<i64> = threads
        .iter()
        .filter(|(name, _)| name == "sqlite-writer")
        .map(|(_, nice)| *nice)
        .collect();
    assert_eq!(writers, vec![lower], "{threads:?}");
    assert!(
        threads
            .iter()
            .all(|(name, nice)| name == "sqlite-writer" || *nice == baseline),
        "{threads:?}"
    );
    server.kill_9().await;
}

/// A thread's (or process's) name and nice value from its `stat` file.
fn nice_of(stat: &std::path::Path) -> Option<(String, i64)> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // "tid (name) state ppid …": the name may hold spaces, so split at its closing parenthesis.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let nice = stat.get(close + 2..)?.split(' ').nth(16)?.parse().ok()?;
    Some((stat[open + 1..close].to_string(), nice))
}
