//! A recording webhook receiver on a real local port: every request is kept (method, target,
//! headers, raw body, arrival time) and answered according to a replaceable plan.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One received request.
#[derive(Debug, Clone)]
pub struct Received {
    /// HTTP method.
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    /// Headers with lowercase names.
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// What to answer: (status, headers, body).
pub type Answer = (u16, Vec<(&'static str, String)>, String);
type Plan = Box<dyn FnMut(&Received, usize) -> Answer + Send>;

struct Shared {
    received: Mutex<Vec<Received>>,
    plan: Mutex<Plan>,
    /// How long to wait before answering (the request is recorded at once).
    hold: Mutex<Duration>,
    arrived: Notify,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:port`.
    pub base: String,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Starts a receiver answering 200 to everything.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            plan: Mutex::new(Box::new(|_, _| (200, vec![], "{}".into()))),
            hold: Mutex::new(Duration::ZERO),
            arrived: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let s = shared.clone();
        let app =
            axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move {
                    let hold = *s.hold.lock().unwrap();
                    let answer = record(s, method, uri, headers, body);
                    tokio::time::sleep(hold).await;
                    answer
                }
            });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, shared }
    }

    /// Replaces the answer plan; `f(request, index)` where index counts every request received.
    pub fn answer(&self, f: impl FnMut(&Received, usize) -> Answer + Send + 'static) {
        *self.shared.plan.lock().unwrap() = Box::new(f);
    }

    /// Answers every request 200 with `body` as JSON.
    pub fn answer_json(&self, body: serde_json::Value) {
        let text = body.to_string();
        self.answer(move |_, _| {
            (
                200,
                vec![("content-type", "application/json".into())],
                text.clone(),
            )
        });
    }

    /// Answers every request with `status`.
    pub fn always(&self, status: u16) {
        self.answer(move |_, _| (status, vec![], "{}".into()));
    }

    /// Holds every answer for `d` after recording the request (a slow endpoint).
    pub fn hold(&self, d: Duration) {
        *self.shared.hold.lock().unwrap() = d;
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over the received requests (polling on arrival), or panics.
    pub async fn wait_until(&self, deadline: Duration, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        match self.try_wait_until(deadline, pred).await {
            Ok(got) => got,
            Err(got) => panic!(
                "receiver condition not met within {deadline:?}; got {} requests",
                got.len()
            ),
        }
    }

    /// Waits until `pred` holds over the received requests (polling on arrival); on timeout
    /// answers what did arrive, so the caller can say more about why.
    pub async fn try_wait_until(
        &self,
        deadline: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Result<Vec<Received>, Vec<Received>> {
        let start = Instant::now();
        loop {
            let notified = self.shared.arrived.notified();
            {
                let got = self.shared.received.lock().unwrap();
                if pred(&got) {
                    return Ok(got.clone());
                }
            }
            let left = deadline.checked_sub(start.elapsed()).unwrap_or_default();
            if left.is_zero() {
                return Err(self.received());
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        self.wait_until(Duration::from_secs(60), |r| r.len() >= n).await
    }
}

fn record(shared: Arc<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let received = Received {
        method: method.to_string(),
        target: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        at: Instant::now(),
    };
    let index = {
        let mut all = shared.received.lock().unwrap();
        all.push(received.clone());
        all.len() - 1
    };
    let (status, headers, body) = (shared.plan.lock().unwrap())(&received, index);
    shared.arrived.notify_waiters();
    let mut resp = (axum::http::StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}
