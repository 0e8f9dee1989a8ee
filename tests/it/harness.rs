//! The test harness: starts the real app in-process on 127.0.0.1:0 against a fresh SQLite file
//! or a fresh PostgreSQL database, creates a tenant with an owner key, and gives the test an
//! HTTP client. [`dual!`] turns one scenario into a SQLite test and a PostgreSQL test.

#![allow(dead_code)] // not every test binary module uses every helper

use std::path::PathBuf;
use std::time::Duration;

use opsiq::config::RawConfig;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A fixed master key for tests (base64 of 32 bytes).
pub const TEST_MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Where a test's data lives.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A fresh SQLite file in the test's temporary directory.
    Sqlite,
    /// A fresh database created on the server named by `OPSIQ_TEST_POSTGRES_URL`.
    Postgres(String),
}

impl Backend {
    /// The PostgreSQL backend, or `None` (and a note on stderr) when no server is configured.
    /// With `OPSIQ_REQUIRE_POSTGRES=1` (as in CI) a missing server fails the test instead.
    pub fn postgres(test: &str) -> Option<Self> {
        match std::env::var("OPSIQ_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ => {
                if std::env::var("OPSIQ_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!("OPSIQ_REQUIRE_POSTGRES=1 but OPSIQ_TEST_POSTGRES_URL is not set");
                }
                // Written straight to stderr: libtest captures eprintln!, and a skip must be seen.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {test} on PostgreSQL: OPSIQ_TEST_POSTGRES_URL is not set"
                );
                None
            }
        }
    }

    /// A database URL for a brand-new, empty database of this kind.
    pub async fn fresh_database_url(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("opsiq.db").display()),
            Backend::Postgres(admin_url) => {
                use sqlx::Connection;
                let name = format!("opsiq_t_{}", uuid::Uuid::now_v7().simple());
                let mut conn = sqlx::PgConnection::connect(admin_url)
                    .await
                    .expect("PostgreSQL at OPSIQ_TEST_POSTGRES_URL is unreachable");
                // An English ICU collation, as a database made with an English locale has:
                // symbols sort before digits and letters there, unlike byte order.
                let icu =
                    format!("CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en'");
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(icu)).execute(&mut conn).await {
                    // CI runs where ICU exists; elsewhere the default collation is still a test.
                    assert!(
                        std::env::var("OPSIQ_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                        "cannot create an ICU test database: {e}"
                    );
                    eprintln!(
                        "this PostgreSQL cannot create an ICU database ({e}); using its default collation"
                    );
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                        .execute(&mut conn)
                        .await
                        .expect("cannot create a test database");
                }
                replace_database_name(admin_url, &name)
            }
        }
    }
}

fn replace_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Runs a scenario `async fn name(backend: Backend)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! dual {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(backend) = $crate::harness::Backend::postgres(stringify!($name)) {
                    super::$name(backend).await
                }
            }
        }
    )*};
}

/// A running app with one tenant.
pub struct TestApp {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The database URL the app runs on.
    pub database_url: String,
    /// The first tenant's id.
    pub tenant_id: String,
    /// The first tenant's owner key.
    pub admin_key: String,
    /// The raw configuration the app was started with (restart uses it again).
    pub raw: RawConfig,
    /// The test's private directory (SQLite file, key file, action files).
    pub dir: tempfile::TempDir,
    /// Plain HTTP client.
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A change to the configuration before start.
type Adjust = Box<dyn FnOnce(&mut RawConfig, &std::path::Path)>;

/// Options for starting a [`TestApp`].
pub struct Start {
    backend: Backend,
    adjust: Vec<Adjust>,
}

impl Start {
    /// Changes the configuration before start (the path is the test's private directory).
    pub fn with(mut self, f: impl FnOnce(&mut RawConfig, &std::path::Path) + 'static) -> Self {
        self.adjust.push(Box::new(f));
        self
    }

    /// Creates the database and tenant, then starts the app and waits until it is ready.
    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().expect("temporary directory");
        let database_url = self.backend.fresh_database_url(dir.path()).await;
        let mut raw = RawConfig {
            database_url: database_url.clone(),
            listen: "127.0.0.1:0".into(),
            master_key: Some(TEST_MASTER_KEY.into()),
            master_key_file: dir.path().join("opsiq.key"),
            actions_dir: dir.path().join("actions"),
            events_dir: repo_path("schemas/events"),
            policies_dir: repo_path("policies"),
            ..RawConfig::default()
        };
        for f in self.adjust {
            f(&mut raw, dir.path());
        }
        let config = opsiq::Config::from_raw(raw.clone()).expect("test configuration is valid");
        let tenant = opsiq::init(&config, Some("acme"))
            .await
            .expect("init creates a tenant");
        let mut app = TestApp {
            base: String::new(),
            database_url,
            tenant_id: tenant.tenant_id,
            admin_key: tenant.admin_key,
            raw,
            dir,
            http: http_client(),
            shutdown: None,
            task: None,
        };
        app.boot().await;
        app
    }
}

/// A plain HTTP client for tests (no proxy, generous timeout).
pub fn http_client() -> reqwest::Client {
    opsiq::crypto::install_tls_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A path inside the repository (tests run with the package root as working directory).
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

impl TestApp {
    /// Starts building an app on `backend`.
    pub fn on(backend: Backend) -> Start {
        Start {
            backend,
            adjust: Vec::new(),
        }
    }

    /// Starts an app with the default test configuration.
    pub async fn start(backend: Backend) -> TestApp {
        Self::on(backend).start().await
    }

    async fn boot(&mut self) {
        let config = opsiq::Config::from_raw(self.raw.clone()).expect("valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        self.shutdown = Some(tx);
        self.task = Some(tokio::spawn(opsiq::run(config, listener, async {
            let _ = rx.await;
        })));
        let ready = format!("{}/readyz", self.base);
        wait_until(Duration::from_secs(30), || async {
            self.http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Stops the app gracefully and starts it again on the same database.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    /// Stops the app gracefully.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app ran without error");
        }
    }

    /// Creates another tenant in the same database; returns (tenant_id, owner key).
    pub async fn new_tenant(&self, name: &str) -> (String, String) {
        let config = opsiq::Config::from_raw(self.raw.clone()).expect("valid configuration");
        let t = opsiq::init(&config, Some(name)).await.expect("second tenant");
        (t.tenant_id, t.admin_key)
    }

    /// An absolute URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with the owner key.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.as_key(&self.admin_key, method, path)
    }

    /// A request with any bearer token.
    pub fn as_key(&self, key: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(key)
    }

    /// Sends `body` as JSON with the owner key and returns (status, JSON body).
    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let key = self.admin_key.clone();
        self.call_as(&key, method, path, body).await
    }

    /// Creates an admin API key with `role` (as the owner) and returns its secret.
    pub async fn key_with_role(&self, role: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/api-keys",
                Some(serde_json::json!({"name": role, "role": role})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["key"].as_str().expect("the new key's secret").to_string()
    }

    /// Sends `body` as JSON with `key` and returns (status, JSON body or Null).
    pub async fn call_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.as_key(key, method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        read(req.send().await.expect("request sent")).await
    }
}

/// (status, JSON body or Null) of a response.
pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

/// Sends the requests at once; their statuses, sorted.
pub async fn at_once(requests: impl Iterator<Item = reqwest::RequestBuilder>) -> Vec<u16> {
    let sent = requests.map(|r| async { r.send().await.expect("request sent").status().as_u16() });
    let mut statuses = futures_util::future::join_all(sent).await;
    statuses.sort();
    statuses
}

/// Creates an object with `POST collection`, checks that it starts at version 1 (in its body and
/// its `ETag`), and returns it with its path.
pub async fn create_at_version_1(app: &TestApp, collection: &str, body: &Value) -> (Value, String) {
    let created = app
        .as_key(&app.admin_key, reqwest::Method::POST, collection)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{collection}");
    assert_eq!(created.headers()["etag"], "\"1\"", "{collection}");
    let (_, created) = read(created).await;
    assert_eq!(created["version"], 1, "{created}");
    let path = format!("{collection}/{}", created["id"].as_str().unwrap());
    (created, path)
}

/// `If-Match` on `DELETE path`: a `stale` tag is a 412 that leaves the object, the `current` one
/// deletes it, and a second delete finds nothing.
pub async fn delete_checks_version(app: &TestApp, path: &str, stale: &str, current: &str) {
    let delete = |tag: &str| {
        app.as_key(&app.admin_key, reqwest::Method::DELETE, path)
            .header("if-match", tag)
    };
    let (status, body) = read(delete(stale).send().await.unwrap()).await;
    assert_eq!(
        (status, error_code(&body)),
        (412, "version_mismatch"),
        "{path}: {body}"
    );
    assert_eq!(app.call(reqwest::Method::GET, path, None).await.0, 200, "{path}");
    assert_eq!(delete(current).send().await.unwrap().status(), 204, "{path}");
    assert_eq!(delete(current).send().await.unwrap().status(), 404, "{path}");
}

/// Polls `check` every 20 ms until it holds; panics after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > deadline {
            panic!("condition not reached within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks an error answer: its status, its code, and a part of its message.
pub fn assert_error(got: (u16, &Value), status: u16, code: &str, message_part: &str) {
    let (got_status, body) = got;
    assert_eq!((got_status, error_code(body)), (status, code), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(message_part), "{body}");
}

/// Asserts the contract's error shape and returns the code.
/// One field (`path` or `message`) of each detail of an error body, in order.
pub fn details<'a>(body: &'a Value, field: &str) -> Vec<&'a str> {
    error_code(body);
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d[field].as_str().expect("a detail field"))
        .collect()
}

pub fn error_code(body: &Value) -> &str {
    let e = &body["error"];
    assert!(e["message"].is_string(), "not an error body: {body}");
    assert!(e["details"].is_array(), "not an error body: {body}");
    e["code"].as_str().expect("error code")
}

/// Skips a check whose prerequisite is missing, or fails under `OPSIQ_REQUIRE_EXTERNAL=1` (CI).
pub fn skip_or_fail(what: &str, why: &str) {
    if std::env::var("OPSIQ_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
        panic!("{what}: {why}, and OPSIQ_REQUIRE_EXTERNAL=1");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}

/// Polls `f` every 20 ms until it yields `Some`; panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("condition not reached within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    /// A second app process-in-process on the same database (another replica); shares the dir.
    pub async fn replica(&self) -> TestApp {
        let mut other = TestApp {
            base: String::new(),
            database_url: self.database_url.clone(),
            tenant_id: self.tenant_id.clone(),
            admin_key: self.admin_key.clone(),
            raw: self.raw.clone(),
            dir: tempfile::tempdir().expect("temporary directory"),
            http: http_client(),
            shutdown: None,
            task: None,
        };
        other.boot().await;
        other
    }
}
