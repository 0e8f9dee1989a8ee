//! Nothing accepted is lost: deliveries owed when the process is killed with SIGKILL are sent
//! after a restart, and two processes on one PostgreSQL never send the same attempt twice.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::dual;
use crate::harness::{Backend, http_client};
use crate::process;
use crate::receiver::Receiver;

const FAST: &[&str] = &[
    "--dev",
    "--retry-schedule",
    "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms",
];

fn fast_env(cmd: &mut tokio::process::Command) {
    cmd.env("OPSIQ_POLL_INTERVAL", "50ms")
        .env("OPSIQ_REQUEST_TIMEOUT", "2s")
        .env("OPSIQ_LEASE", "3s");
}

async fn post_events(base: &str, key: &str, n: usize, tag: &str) -> Vec<String> {
    let http = http_client();
    let mut ids = Vec::new();
    for i in 0..n {
        let resp = http
            .post(format!("{base}/v1/events"))
            .bearer_auth(key)
            .header("Idempotency-Key", format!("{tag}-{i}"))
            .json(&json!({"type": "invoice.updated", "data": {"n": i, "tag": tag}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let body: serde_json::Value = resp.json().await.unwrap();
        ids.push(body["event_id"].as_str().unwrap().to_string());
    }
    ids
}

async fn create_endpoint(base: &str, key: &str, url: &str) {
    let resp = http_client()
        .post(format!("{base}/v1/endpoints"))
        .bearer_auth(key)
        .json(&json!({"url": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
}

dual!(deliveries_owed_at_kill_9_are_sent_after_restart);

async fn deliveries_owed_at_kill_9_are_sent_after_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let rx = Receiver::start().await;
    // The receiver is down for business until the restart: every attempt fails.
    rx.always(503);

    let server = process::serve_with(dir.path(), &url, FAST, fast_env).await;
    create_endpoint(&server.base, &key, &rx.url("/owed")).await;
    let events = post_events(&server.base, &key, 30, "owed").await;
    rx.wait_for(5).await;
    server.kill_9().await;

    rx.always(200);
    let server = process::serve_with(dir.path(), &url, FAST, fast_env).await;
    let got = rx
        .wait_until(Duration::from_secs(60), |all| {
            let ok: std::collections::HashSet<String> = all
                .iter()
                .filter(|r| r.at.elapsed() < Duration::from_secs(3600))
                .map(|r| r.json()["id"].as_str().unwrap().to_string())
                .collect();
            events.iter().all(|e| ok.contains(e))
        })
        .await;
    assert!(got.len() >= 30);
    server.kill_9().await;
}

dual!(a_graceful_stop_finishes_attempts_under_way_and_returns_the_rest);

/// SIGTERM while one attempt is in flight and others wait for a sending slot: the process lets
/// the first finish and records it, hands the waiting ones back to the outbox, and exits 0; the
/// next process sends those at once (not after their ten-minute lease), each as attempt 1.
async fn a_graceful_stop_finishes_attempts_under_way_and_returns_the_rest(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let rx = Receiver::start().await;
    // Long enough that SIGTERM surely lands while the first attempt is held, well inside the
    // 10 s request timeout.
    rx.hold(Duration::from_secs(5));
    let one_at_a_time = |cmd: &mut tokio::process::Command| {
        cmd.env("OPSIQ_POLL_INTERVAL", "50ms")
            .env("OPSIQ_REQUEST_TIMEOUT", "10s")
            .env("OPSIQ_LEASE", "600s")
            .env("OPSIQ_MAX_IN_FLIGHT", "1");
    };

    let server = process::serve_with(dir.path(), &url, FAST, one_at_a_time).await;
    create_endpoint(&server.base, &key, &rx.url("/graceful")).await;
    let events = post_events(&server.base, &key, 4, "graceful").await;
    rx.wait_for(1).await;
    let status = server.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    assert_eq!(rx.received().len(), 1, "nothing new is sent once stopping");

    rx.hold(Duration::ZERO);
    let server = process::serve_with(dir.path(), &url, FAST, one_at_a_time).await;
    let got = rx
        .wait_until(Duration::from_secs(60), |all| {
            let ids: std::collections::HashSet<String> = all
                .iter()
                .map(|r| r.json()["id"].as_str().unwrap().to_string())
                .collect();
            events.iter().all(|e| ids.contains(e))
        })
        .await;
    assert_eq!(got.len(), 4, "each event sent once");
    for r in &got {
        assert_eq!(
            r.header("x-opsiq-attempt"),
            Some("1"),
            "a returned delivery is still attempt 1"
        );
    }
    // Every delivery is recorded as delivered, the one finished during the stop included.
    let http = http_client();
    let deliveries = crate::harness::eventually(Duration::from_secs(60), || async {
        let page: serde_json::Value = http
            .get(format!("{}/v1/deliveries?limit=10", server.base))
            .bearer_auth(&key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let rows = page["data"].as_array()?.clone();
        (rows.len() == 4 && rows.iter().all(|d| d["status"] == "succeeded")).then_some(rows)
    })
    .await;
    for d in &deliveries {
        assert_eq!(d["attempts"], 1, "{d}");
    }
    server.kill_9().await;
}

dual!(a_graceful_stop_claims_nothing_it_will_not_send);

/// Deliveries already due in the outbox when SIGTERM arrives (written by a process that runs no
/// worker, so they reach the worker only through its poller): the stopping worker returns what
/// it claimed and claims nothing more, so the next process sends every one at once (not after a
/// ten-minute lease), each as attempt 1.
async fn a_graceful_stop_claims_nothing_it_will_not_send(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let rx = Receiver::start().await;
    let one_at_a_time = |cmd: &mut tokio::process::Command| {
        cmd.env("OPSIQ_POLL_INTERVAL", "50ms")
            .env("OPSIQ_REQUEST_TIMEOUT", "10s")
            .env("OPSIQ_LEASE", "600s")
            .env("OPSIQ_MAX_IN_FLIGHT", "1");
    };

    let api = process::serve_with(dir.path(), &url, FAST, |cmd| {
        cmd.env("OPSIQ_WORKER", "false");
    })
    .await;
    create_endpoint(&api.base, &key, &rx.url("/due")).await;
    let events = post_events(&api.base, &key, 30, "due").await;
    assert!(api.terminate(Duration::from_secs(60)).await.success());

    // Long enough that SIGTERM surely lands while the first attempt is held, well inside the
    // 10 s request timeout.
    rx.hold(Duration::from_secs(5));
    let worker = process::serve_with(dir.path(), &url, FAST, one_at_a_time).await;
    rx.wait_for(1).await;
    let status = worker.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    assert_eq!(rx.received().len(), 1, "nothing new is sent once stopping");

    rx.hold(Duration::ZERO);
    let worker = process::serve_with(dir.path(), &url, FAST, one_at_a_time).await;
    let got = match rx
        .try_wait_until(Duration::from_secs(60), |all| {
            let ids: std::collections::HashSet<String> = all
                .iter()
                .map(|r| r.json()["id"].as_str().unwrap().to_string())
                .collect();
            events.iter().all(|e| ids.contains(e))
        })
        .await
    {
        Ok(got) => got,
        Err(got) => {
            // Say which deliveries are stuck, and in what state, before failing.
            let page: serde_json::Value = http_client()
                .get(format!("{}/v1/deliveries?limit=100", worker.base))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let states: Vec<String> = page["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["status"] != "succeeded")
                .map(|d| format!("{} {} attempts={}", d["id"], d["status"], d["attempts"]))
                .collect();
            panic!("{} requests arrived; not delivered: {states:?}", got.len());
        }
    };
    assert_eq!(got.len(), 30, "each event sent once");
    for r in &got {
        assert_eq!(
            r.header("x-opsiq-attempt"),
            Some("1"),
            "a returned delivery is still attempt 1"
        );
    }
    worker.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_never_send_an_attempt_twice() {
    let Some(backend) = Backend::postgres("two_processes_on_one_postgres_never_send_an_attempt_twice") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let rx = Receiver::start().await;
    // Fail each delivery's first two attempts so retries go through the shared claim path.
    rx.answer(|r, _| {
        let attempt: u32 = r.header("x-opsiq-attempt").unwrap().parse().unwrap();
        if attempt <= 2 {
            (500, vec![], String::new())
        } else {
            (200, vec![], String::new())
        }
    });
    let a = process::serve_with(dir.path(), &url, FAST, fast_env).await;
    let b = process::serve_with(dir.path(), &url, FAST, fast_env).await;
    create_endpoint(&a.base, &key, &rx.url("/pair")).await;
    let (ea, eb) = tokio::join!(
        post_events(&a.base, &key, 60, "a"),
        post_events(&b.base, &key, 60, "b")
    );
    let all_events: Vec<String> = ea.into_iter().chain(eb).collect();

    let got = rx
        .wait_until(Duration::from_secs(90), |all| {
            let succeeded = all
                .iter()
                .filter(|r| r.header("x-opsiq-attempt") == Some("3"))
                .count();
            succeeded >= all_events.len()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = if rx.received().len() > got.len() {
        rx.received()
    } else {
        got
    };
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for r in &got {
        let k = (
            r.header("x-opsiq-id").unwrap().to_string(),
            r.header("x-opsiq-attempt").unwrap().to_string(),
        );
        *seen.entry(k).or_default() += 1;
    }
    let doubles: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubles.is_empty(), "attempts sent twice: {doubles:?}");
    assert_eq!(
        got.len(),
        all_events.len() * 3,
        "exactly three attempts per delivery"
    );
    a.kill_9().await;
    b.kill_9().await;
}

/// Stops `server` gracefully and checks that it exited 0 well before what it was given to wait
/// for (`waited_for`) would have let it (ten minutes in these tests).
async fn stops_promptly(server: process::Server, waited_for: &str) {
    let started = std::time::Instant::now();
    let status = server.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the stop waited {:?} for {waited_for}",
        started.elapsed()
    );
}

/// A graceful stop waits for requests in progress only `shutdown_timeout`: a client stalling
/// its body, under a far longer `read_timeout`, does not keep the process up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_waits_for_requests_only_so_long() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Sqlite.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let server = process::serve_with(dir.path(), &url, FAST, |cmd| {
        cmd.env("OPSIQ_READ_TIMEOUT", "10m")
            .env("OPSIQ_SHUTDOWN_TIMEOUT", "1s")
            .env("OPSIQ_MAX_REQUESTS_IN_FLIGHT", "1");
    })
    .await;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"type\""
    );
    let address = server.base.trim_start_matches("http://").to_string();
    let connect_and_stall = || async {
        let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
        stalled.write_all(head.as_bytes()).await.unwrap();
        stalled
    };
    // The one request slot is taken once the stalled request is in progress. If it came while
    // a probe held the slot, it was refused at once (an answer on its connection): try again.
    let mut stalled = connect_and_stall().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut answer = [0u8; 16];
        if matches!(stalled.try_read(&mut answer), Ok(n) if n > 0) {
            stalled = connect_and_stall().await;
        }
        let probe = http_client()
            .get(format!("{}/v1/actions", server.base))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if probe.status() == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled request never held the slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stops_promptly(server, "a stalled body").await;
    drop(stalled);
}

/// A graceful stop does not wait for a client part-way through a request's head (anyone can
/// send one): only requests being served are waited for, and there are none here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_does_not_wait_for_a_request_head() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Sqlite.fresh_database_url(dir.path()).await;
    process::init(dir.path(), &url).await;
    let server = process::serve_with(dir.path(), &url, FAST, |cmd| {
        cmd.env("OPSIQ_READ_TIMEOUT", "10m")
            .env("OPSIQ_SHUTDOWN_TIMEOUT", "10m");
    })
    .await;
    let mut stalled = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled.write_all(b"GE").await.unwrap();
    // Connections are accepted in the order they were made: once a later one is answered, the
    // stalled one is being read.
    let resp = http_client()
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    stops_promptly(server, "a request's head").await;
    drop(stalled);
}

/// A request being served when a graceful stop begins is waited for past the stop's first
/// second (when connections serving none are closed): its client gets the whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_waits_for_a_request_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Sqlite.fresh_database_url(dir.path()).await;
    let (_, key) = process::init(dir.path(), &url).await;
    let rx = Receiver::start().await;
    rx.answer_json(json!({"ticket_id": "tk_1"}));
    // The endpoint answers three seconds after it is called.
    rx.hold(Duration::from_secs(3));
    let server = process::serve_with(dir.path(), &url, FAST, |cmd| {
        cmd.env("OPSIQ_SHUTDOWN_TIMEOUT", "60s")
            .env("OPSIQ_REQUEST_TIMEOUT", "30s");
    })
    .await;
    let resp = http_client()
        .post(format!("{}/v1/endpoints", server.base))
        .bearer_auth(&key)
        .json(&json!({"url": rx.url("/actions"), "event_types": ["none.*"]}))
        .send()
        .await
        .unwrap();
    let (status, endpoint) = crate::harness::read(resp).await;
    assert_eq!(status, 201, "{endpoint}");
    let action = json!({"name": "open_ticket", "input_schema": {"type": "object"}, "mode": "sync",
        "timeout_ms": 60_000, "endpoint_id": endpoint["id"]});
    let token = crate::replicas::action_and_agent(&server.base, &key, action, "agt_stop").await;

    let call = tokio::spawn({
        let base = server.base.clone();
        async move {
            let resp = http_client()
                .post(format!("{base}/v1/actions/open_ticket/invoke"))
                .bearer_auth(&token)
                .header("Idempotency-Key", "stop-1")
                .json(&json!({"arguments": {}}))
                .send()
                .await
                .expect("an answer, not a closed connection");
            crate::harness::read(resp).await
        }
    });
    rx.wait_for(1).await;
    let status = server.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "a graceful stop exits 0, got {status}");
    let (status, answer) = call.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("succeeded")),
        "{answer}"
    );
    assert_eq!(answer["result"], json!({"ticket_id": "tk_1"}));
}
