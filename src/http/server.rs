//! The HTTP/1.1 accept loop: what `axum::serve` does, plus a deadline for a request's headers
//! (`read_timeout`, which is also how long an idle keep-alive connection is kept), which
//! `axum::serve` cannot set. Without it a client that sends a request
//! line and then nothing holds its connection for as long as it likes, and a few thousand such
//! clients hold every file descriptor the process has.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Where a graceful stop stands, as every connection's task sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// No longer accepting: connections finish the request they are serving, and those between
    /// requests (idle, or part-way through a request's head) are closed.
    Draining,
    /// `shutdown_timeout` is over: every connection still open is closed.
    Closed,
}

/// How long a connection between requests is left to close itself once draining begins (hyper
/// closes idle ones at once) before it is closed.
const BETWEEN_REQUESTS_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets every
/// connection finish the request it is serving (its answer sent) for up to `shutdown_timeout`,
/// closes a second into the stop those serving none (idle, or part-way through a request's
/// head), and returns once all are closed or that time is up (MCP's event streams end when
/// shutdown begins, see `AppState::stopping`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    (read_timeout, shutdown_timeout): (Duration, Duration),
    shutdown: impl Future<Output = ()>,
) {
    let connections = GracefulShutdown::new();
    let (phase, phase_seen) = tokio::sync::watch::channel(Phase::Serving);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    pause_after_accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small and written whole: nothing is gained by holding one back for more.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::trace!(error = %e, "setting TCP_NODELAY failed");
        }
        let serving = Arc::new(AtomicUsize::new(0));
        let service = TowerToHyperService::new(counting_requests(app.clone(), serving.clone()));
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        let mut phase_seen = phase_seen.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    tracing::trace!(error = %e, "connection ended with an error");
                },
                () = until_closed(&mut phase_seen, &serving) => {}
            }
        });
    }
    drop(listener);
    phase.send_replace(Phase::Draining);
    if tokio::time::timeout(shutdown_timeout, connections.shutdown())
        .await
        .is_err()
    {
        // What those requests accepted is already durable; their clients see the connection
        // close, as after a crash, and retry with their idempotency keys. Every connection's
        // task holds a receiver, as does this function.
        let connections_open = phase.receiver_count().saturating_sub(1);
        tracing::warn!(
            connections_open,
            waited = ?shutdown_timeout,
            "requests still in progress at the end of shutdown_timeout; closing their connections"
        );
        phase.send_replace(Phase::Closed);
    }
}

/// `app`, counting in `serving` the requests it is serving on one connection: from the call
/// until the answer's body is sent (or given up).
fn counting_requests(
    app: Router,
    serving: Arc<AtomicUsize>,
) -> impl tower::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future + Send,
> + Clone {
    tower::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let serving = Serving::start(&serving);
        async move {
            let answer: axum::response::Response = tower::ServiceExt::oneshot(app, request).await?;
            Ok(answer.map(|body| {
                axum::body::Body::new(CountedBody {
                    body,
                    _serving: serving,
                })
            }))
        }
    })
}

/// One request being served, counted until dropped.
struct Serving(Arc<AtomicUsize>);

impl Serving {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, whose request counts as being served until it is sent or dropped.
struct CountedBody {
    body: axum::body::Body,
    _serving: Serving,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves when a connection must be closed: at `Phase::Closed`, or once draining has gone on
/// for a moment while the connection serves no request.
async fn until_closed(phase: &mut tokio::sync::watch::Receiver<Phase>, serving: &AtomicUsize) {
    if phase.wait_for(|p| *p != Phase::Serving).await.is_err() {
        return;
    }
    let grace = tokio::time::sleep(BETWEEN_REQUESTS_GRACE);
    tokio::select! {
        () = grace => {}
        closed = phase.wait_for(|p| *p == Phase::Closed) => if closed.is_ok() { return },
    }
    loop {
        if *phase.borrow() == Phase::Closed || serving.load(Ordering::Acquire) == 0 {
            return;
        }
        tokio::select! {
            changed = phase.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// After a failed accept: a connection reset before it was taken is nothing; anything else (out
/// of file descriptors, say) is said, and accepting pauses a moment rather than spinning on it.
async fn pause_after_accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
