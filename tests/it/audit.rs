//! The audit log: admin changes in a per-tenant hash chain, listed over HTTP and checked by
//! `opsiq audit verify`, which names the first row a direct edit of the database broke.

use reqwest::Method;
use serde_json::{Value, json};

use crate::dual;
use crate::harness::{Backend, TestApp};
use crate::process;

dual!(
    admin_changes_are_chained_and_tampering_is_found,
    concurrent_changes_extend_one_unbroken_chain,
    verifying_a_database_changes_nothing_in_it,
    a_change_is_finished_and_recorded_when_its_client_hangs_up,
    a_change_under_way_at_shutdown_is_finished_and_recorded_first,
    a_change_whose_row_cannot_be_written_is_not_made
);

/// A connection of the test's own to the app's database, beside the app's.
enum Direct {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Direct {
    async fn to(app: &TestApp) -> Direct {
        use sqlx::Connection;
        if app.database_url.starts_with("sqlite:") {
            Direct::Sqlite(sqlx::SqliteConnection::connect(&app.database_url).await.unwrap())
        } else {
            Direct::Postgres(sqlx::PgConnection::connect(&app.database_url).await.unwrap())
        }
    }

    fn is_sqlite(&self) -> bool {
        matches!(self, Direct::Sqlite(_))
    }

    /// Runs each statement in turn.
    async fn run(&mut self, statements: &[&'static str]) {
        use sqlx::Executor;
        for sql in statements {
            match self {
                Direct::Sqlite(conn) => conn.execute(*sql).await.map(drop),
                Direct::Postgres(conn) => conn.execute(*sql).await.map(drop),
            }
            .unwrap();
        }
    }
}

/// A transaction on a connection of the test's own that holds the endpoints table, so that a
/// change to an endpoint waits for it.
struct TableHold(Direct);

impl TableHold {
    async fn endpoints(app: &TestApp) -> TableHold {
        let mut conn = Direct::to(app).await;
        if conn.is_sqlite() {
            conn.run(&["BEGIN IMMEDIATE"]).await;
        } else {
            conn.run(&["BEGIN", "LOCK TABLE endpoints IN SHARE ROW EXCLUSIVE MODE"])
                .await;
        }
        TableHold(conn)
    }

    /// Rolls the transaction back and closes its connection.
    async fn release(mut self) {
        self.0.run(&["ROLLBACK"]).await;
    }
}

/// Creates an endpoint for `url` with a client that gives up after 1.5 s, and checks it gave up.
async fn create_endpoint_and_hang_up(app: &TestApp, url: &str) {
    let gave_up = app
        .as_key(&app.admin_key, Method::POST, "/v1/endpoints")
        .timeout(std::time::Duration::from_millis(1500))
        .json(&json!({"url": url}))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the change did not wait");
}

/// A client that gives up while its change waits for the database does not undo half of it: the
/// change is made, announced and recorded in the audit log all the same, and it keeps its
/// request slot until then.
async fn a_change_is_finished_and_recorded_when_its_client_hangs_up(backend: Backend) {
    let app = TestApp::on(backend)
        .with(|raw, _| raw.max_requests_in_flight = 1)
        .start()
        .await;
    let hold = TableHold::endpoints(&app).await;
    let url = "https://hooks.example.com/after-hang-up";
    create_endpoint_and_hang_up(&app, url).await;
    // The abandoned change still holds the only request slot.
    let (status, body) = app.call(Method::GET, "/v1/endpoints", None).await;
    assert_eq!(
        (status, crate::harness::error_code(&body)),
        (503, "overloaded"),
        "{body}"
    );
    hold.release().await;

    let deadline = std::time::Duration::from_secs(30);
    let endpoint_id = crate::harness::eventually(deadline, || async {
        let (_, page) = app.call(Method::GET, "/v1/endpoints", None).await;
        page["data"]
            .as_array()?
            .iter()
            .find(|e| e["url"] == url)
            .map(|e| e["id"].as_str().unwrap().to_string())
    })
    .await;
    crate::harness::eventually(deadline, || async {
        let (_, page) = app.call(Method::GET, "/v1/audit", None).await;
        page["data"]
            .as_array()?
            .iter()
            .find(|row| row["action"] == "POST /v1/endpoints")
            .map(|_| ())
    })
    .await;
    let (status, _) = app
        .call(Method::GET, &format!("/v1/endpoints/{endpoint_id}"), None)
        .await;
    assert_eq!(status, 200);
}

/// Stopping the server while an abandoned change still waits for the database lets the change
/// finish, with its audit row, before the database is closed: nothing is left half done.
async fn a_change_under_way_at_shutdown_is_finished_and_recorded_first(backend: Backend) {
    let mut app = TestApp::start(backend).await;
    let hold = TableHold::endpoints(&app).await;
    let url = "https://hooks.example.com/during-shutdown";
    create_endpoint_and_hang_up(&app, url).await;

    let base = app.base.clone();
    let http = app.http.clone();
    let stopping = tokio::spawn(async move {
        app.stop().await;
        app
    });
    // Once the server no longer accepts connections it is shutting down. The database stays
    // slow for a second more — time the shutdown would use to close the database under the
    // waiting change if it did not wait for it (it waits up to 10 s) — and then lets it go on.
    crate::harness::wait_until(std::time::Duration::from_secs(30), || async {
        http.get(format!("{base}/readyz")).send().await.is_err()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    hold.release().await;
    let mut app = stopping.await.unwrap();

    // Started again on the same database, the server has both the endpoint and its audit row at
    // once: they were written before the first one closed the database.
    app.restart().await;
    let (_, endpoints) = app.call(Method::GET, "/v1/endpoints", None).await;
    let created = endpoints["data"].as_array().unwrap();
    assert!(created.iter().any(|e| e["url"] == url), "{endpoints}");
    let (_, audit) = app.call(Method::GET, "/v1/audit", None).await;
    let recorded = audit["data"].as_array().unwrap();
    assert!(
        recorded.iter().any(|row| row["action"] == "POST /v1/endpoints"),
        "{audit}"
    );
}

/// A change and its audit row commit together: while the log refuses rows, changes fail with the
/// contract's error and leave nothing behind, whether made in a transaction of several
/// statements (an endpoint's edit) or in one statement (an endpoint's creation).
async fn a_change_whose_row_cannot_be_written_is_not_made(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, endpoint) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://hooks.example.com/kept"})),
        )
        .await;
    assert_eq!(status, 201, "{endpoint}");
    let path = format!("/v1/endpoints/{}", endpoint["id"].as_str().unwrap());
    // A revocation runs in a task of its own and carries its row there.
    let token = crate::gateway::agent_token(&app, "agt_kept", &["support"], &["invoke:*"]).await;
    let tools = || async {
        app.call_as(&token, Method::GET, "/v1/tools?format=mcp", None)
            .await
            .0
    };
    assert_eq!(tools().await, 200);
    let rows_before = rows(&app.call(Method::GET, "/v1/audit?limit=200", None).await.1).len();

    let mut direct = Direct::to(&app).await;
    let (refuse, allow): (&[&str], &[&str]) = if direct.is_sqlite() {
        (
            &["CREATE TRIGGER refuse_rows BEFORE INSERT ON audit_log \
               BEGIN SELECT RAISE(ABORT, 'the audit log refuses rows'); END"],
            &["DROP TRIGGER refuse_rows"],
        )
    } else {
        (
            &[
                "CREATE FUNCTION refuse_rows() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'the audit log refuses rows'; END $$",
                "CREATE TRIGGER refuse_rows BEFORE INSERT ON audit_log \
                 FOR EACH ROW EXECUTE FUNCTION refuse_rows()",
            ],
            &[
                "DROP TRIGGER refuse_rows ON audit_log",
                "DROP FUNCTION refuse_rows()",
            ],
        )
    };
    direct.run(refuse).await;

    let (status, body) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://hooks.example.com/refused"})),
        )
        .await;
    assert!(status >= 500, "{status} {body}");
    assert!(!crate::harness::error_code(&body).is_empty(), "{body}");
    let (status, body) = app
        .call(Method::PATCH, &path, Some(json!({"description": "refused"})))
        .await;
    assert!(status >= 500, "{status} {body}");
    assert!(!crate::harness::error_code(&body).is_empty(), "{body}");
    let (status, body) = app.call(Method::DELETE, "/v1/agents/agt_kept", None).await;
    assert!(status >= 500, "{status} {body}");
    assert!(!crate::harness::error_code(&body).is_empty(), "{body}");
    assert_eq!(
        tools().await,
        200,
        "a revocation whose row was refused took effect"
    );

    direct.run(allow).await;
    let (_, page) = app.call(Method::GET, "/v1/endpoints", None).await;
    let listed = rows(&page);
    let urls: Vec<&str> = listed.iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert_eq!(urls, ["https://hooks.example.com/kept"]);
    let (_, kept) = app.call(Method::GET, &path, None).await;
    assert_eq!(
        (kept["description"].clone(), kept["version"].clone()),
        (json!(""), json!(1)),
        "{kept}"
    );
    let (_, log) = app.call(Method::GET, "/v1/audit?limit=200", None).await;
    assert_eq!(rows(&log).len(), rows_before, "{log}");
    let (_, agent) = app.call(Method::GET, "/v1/agents/agt_kept", None).await;
    assert_eq!(agent["revoked"], false, "{agent}");

    // With rows accepted again, the same edit is made and recorded.
    let (status, body) = app
        .call(Method::PATCH, &path, Some(json!({"description": "accepted"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, log) = app.call(Method::GET, "/v1/audit", None).await;
    assert_eq!(rows(&log)[0]["action"], "PATCH /v1/endpoints/{id}", "{log}");
    let (status, body) = app.call(Method::DELETE, "/v1/agents/agt_kept", None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(tools().await, 401);
    let (_, log) = app.call(Method::GET, "/v1/audit", None).await;
    assert_eq!(rows(&log)[0]["action"], "DELETE /v1/agents/{id}", "{log}");
}

/// A database without OpsIQ's tables is reported, not migrated: checking changes nothing.
async fn verifying_a_database_changes_nothing_in_it(backend: Backend) {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = backend.fresh_database_url(dir.path()).await;
    let tables = "SELECT count(*) FROM sqlite_master WHERE type = 'table'";
    let count_tables = |url: String| async move {
        if url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
                .await
                .unwrap();
            sqlx::query_scalar::<_, i64>(tables)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        } else {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap()
        }
    };
    // An empty database (for SQLite, an empty file that exists).
    assert_eq!(count_tables(url.clone()).await, 0);
    let out = process::opsiq()
        .current_dir(dir.path())
        .args(["audit", "verify", "--database-url", &url])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot read the audit log"), "{stderr}");
    assert_eq!(count_tables(url).await, 0, "verify created tables");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_missing_database_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("absent.db");
    let out = process::opsiq()
        .current_dir(dir.path())
        .args(["audit", "verify", "--database-url"])
        .arg(format!("sqlite://{}", file.display()))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no database at"));
    assert!(!file.exists());
}

/// Runs `opsiq audit verify` on `database_url`: (success, stdout, stderr).
pub async fn audit_verify(app: &TestApp) -> (bool, String, String) {
    let out = process::opsiq()
        .current_dir(app.dir.path())
        .args(["audit", "verify", "--database-url", &app.database_url])
        .output()
        .await
        .expect("opsiq audit verify runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rows(page: &Value) -> Vec<Value> {
    page["data"].as_array().expect("data").clone()
}

async fn admin_changes_are_chained_and_tampering_is_found(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (status, endpoint) = app
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "https://hooks.example.com/opsiq"})),
        )
        .await;
    assert_eq!(status, 201, "{endpoint}");
    let id = endpoint["id"].as_str().unwrap().to_string();
    let path = format!("/v1/endpoints/{id}");
    // Reading a secret is recorded like a change.
    let (status, _) = app.call(Method::GET, &format!("{path}/secret"), None).await;
    assert_eq!(status, 200);
    let (status, body) = app
        .call(Method::PATCH, &path, Some(json!({"description": "billing"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let policy = json!({"rows": [{"subject": "role:support", "object": "refund_*", "act": "invoke", "effect": "allow"}]});
    let (status, body) = app.call(Method::PUT, "/v1/policies", Some(policy)).await;
    assert_eq!(status, 200, "{body}");
    let deleted = app
        .as_key(&app.admin_key, Method::DELETE, &path)
        .header("x-request-id", "req-delete-1")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // Neither a refused change nor a read, a dry run or ingestion is an audited change.
    assert_eq!(app.call(Method::DELETE, &path, None).await.0, 404);
    assert_eq!(app.call(Method::DELETE, "/v1/actions/nope", None).await.0, 404);
    app.call(Method::GET, "/v1/endpoints", None).await;
    let (status, _) = app
        .call(
            Method::POST,
            "/v1/events",
            Some(
                json!({"type": "invoice.paid", "data": {"invoice_id": "i1", "amount": 1, "currency": "EUR"}}),
            ),
        )
        .await;
    assert_eq!(status, 202);

    let (status, page) = app.call(Method::GET, "/v1/audit", None).await;
    assert_eq!(status, 200, "{page}");
    let log = rows(&page);
    let actions: Vec<&str> = log.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "DELETE /v1/endpoints/{id}",
            "PUT /v1/policies",
            "PATCH /v1/endpoints/{id}",
            "GET /v1/endpoints/{id}/secret",
            "POST /v1/endpoints",
            "create tenant"
        ]
    );
    assert_eq!(log[0]["target"], path.as_str());
    assert_eq!(log[0]["details"], json!({"request_id": "req-delete-1"}));
    // A create's row names what it created, which its path cannot.
    assert_eq!(log[4]["details"]["created"], id.as_str(), "{}", log[4]);
    let seqs: Vec<i64> = log.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [6, 5, 4, 3, 2, 1]);
    for pair in log.windows(2) {
        assert_eq!(pair[0]["prev_hash"], pair[1]["hash"]);
    }
    // The chain starts with the tenant's creation, by `opsiq init`, naming its owner key.
    let created = &log[5];
    assert_eq!(created["prev_hash"], "0".repeat(64));
    assert_eq!(created["actor"], "cli:opsiq init", "{created}");
    assert_eq!(created["details"]["name"], "acme", "{created}");
    let (_, keys) = app.call(Method::GET, "/v1/api-keys", None).await;
    let owner = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "owner")
        .unwrap();
    assert_eq!(created["details"]["owner_key_id"], owner["id"], "{created}");
    assert!(
        log[..5]
            .iter()
            .all(|r| r["actor"].as_str().unwrap().starts_with("key:"))
    );
    // Nothing secret is kept: the endpoint's secret is in no row.
    let secret = endpoint["secret"].as_str().unwrap();
    assert!(!page.to_string().contains(secret));

    // Pages by cursor.
    let (_, first) = app.call(Method::GET, "/v1/audit?limit=3", None).await;
    assert_eq!(rows(&first).len(), 3);
    let cursor = first["next_cursor"].as_str().expect("a next page").to_string();
    let (_, second) = app
        .call(Method::GET, &format!("/v1/audit?limit=3&cursor={cursor}"), None)
        .await;
    assert_eq!(rows(&second).len(), 3);
    assert_eq!(rows(&second)[2]["seq"], 1);
    assert!(second["next_cursor"].is_null());

    // Another tenant has a chain of its own.
    let (_, other) = app.new_tenant("globex").await;
    let (status, theirs) = app.call_as(&other, Method::GET, "/v1/audit", None).await;
    assert_eq!(status, 200);
    assert!(!theirs.to_string().contains(&id), "{theirs}");
    // A viewer may not read it (creating that key is itself a change).
    let viewer = app.key_with_role("viewer").await;
    assert_eq!(app.call_as(&viewer, Method::GET, "/v1/audit", None).await.0, 403);
    let (_, page) = app.call(Method::GET, "/v1/audit?limit=1", None).await;
    assert_eq!(rows(&page)[0]["action"], "POST /v1/api-keys");
    // Which key, and with which role (never the key itself).
    let newest = &rows(&page)[0];
    assert!(
        newest["details"]["created"].as_str().unwrap().starts_with("key_"),
        "{newest}"
    );
    assert_eq!(newest["details"]["role"], "viewer", "{newest}");
    assert!(!newest.to_string().contains(&viewer), "no secret in the log");

    let (ok, stdout, stderr) = audit_verify(&app).await;
    assert!(ok, "{stdout} {stderr}");
    assert!(stdout.contains("the audit log holds"), "{stdout}");

    // An edit made behind the API's back breaks the chain at that row.
    let db = opsiq::db::Database::connect(&app.database_url).await.unwrap();
    let edited = db
        .execute(
            "UPDATE audit_log SET target = '/v1/endpoints/ep_forged' WHERE tenant_id = $1 AND seq = 2",
            opsiq::args![&app.tenant_id],
        )
        .await
        .unwrap();
    db.close().await;
    assert_eq!(edited, 1);
    let (ok, stdout, stderr) = audit_verify(&app).await;
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!("tenant {} row 2 ", app.tenant_id)) && stderr.contains("does not match"),
        "{stderr}"
    );
}

async fn concurrent_changes_extend_one_unbroken_chain(backend: Backend) {
    let app = TestApp::start(backend).await;
    // Sixteen changes at once: each appends after the others' rows (PostgreSQL: under the
    // tenant's advisory lock), so the chain has no fork, gap or duplicate.
    let creates = (0..16).map(|i| {
        app.call(
            Method::POST,
            "/v1/api-keys",
            Some(json!({"name": format!("k{i}"), "role": "viewer"})),
        )
    });
    for (status, body) in futures_util::future::join_all(creates).await {
        assert_eq!(status, 201, "{body}");
    }
    let (status, page) = app.call(Method::GET, "/v1/audit?limit=50", None).await;
    assert_eq!(status, 200);
    let seqs: Vec<i64> = rows(&page).iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    // After the tenant's creation (row 1).
    assert_eq!(seqs, (1..=17).rev().collect::<Vec<_>>());
    let (ok, stdout, stderr) = audit_verify(&app).await;
    assert!(ok, "{stdout} {stderr}");
    assert!(stdout.contains("17 rows"), "{stdout}");

    let (status, body) = app.call(Method::GET, "/v1/audit?cursor=latest", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_cursor"))
    );
}
