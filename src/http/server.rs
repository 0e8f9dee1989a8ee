//! The HTTP/1.1 accept loop: what `axum::serve` does, plus a deadline for a request's headers
//! (`read_timeout`, which is also how long an idle keep-alive connection is kept), which
//! `axum::serve` cannot set. Without it a client that sends a request
//! line and then nothing holds its connection for as long as it likes, and a few thousand such
//! clients hold every file descriptor the process has.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets every
/// connection finish the request it is serving for up to `shutdown_timeout`, and returns once
/// all are closed or that time is up (MCP's event streams end when shutdown begins, see
/// `AppState::stopping`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    (read_timeout, shutdown_timeout): (Duration, Duration),
    shutdown: impl Future<Output = ()>,
) {
    let connections = GracefulShutdown::new();
    // Set once shutdown_timeout is over: connections still open are dropped (closed).
    let (hard_stop, stopped) = tokio::sync::watch::channel(false);
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
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = connections.watch(connection);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    tracing::trace!(error = %e, "connection ended with an error");
                },
                _ = stopped.wait_for(|stopped| *stopped) => {}
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(shutdown_timeout, connections.shutdown())
        .await
        .is_err()
    {
        // What those requests accepted is already durable; their clients see the connection
        // close, as after a crash, and retry with their idempotency keys.
        // Every connection task holds a receiver, as does this function.
        let connections_open = hard_stop.receiver_count().saturating_sub(1);
        tracing::warn!(
            connections_open,
            waited = ?shutdown_timeout,
            "requests still in progress at the end of shutdown_timeout; closing their connections"
        );
        hard_stop.send_replace(true);
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
