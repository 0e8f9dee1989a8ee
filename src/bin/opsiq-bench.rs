//! `opsiq-bench`: end-to-end load tests through the public API.
//!
//! Starts `opsiq serve` (the binary next to this one) on a fresh database and a local receiver,
//! then runs one workload, closed-loop (`--concurrency` calls in flight) or open-loop (`--rate`
//! per second), waits until every delivery arrived, and prints accepted/s, delivered/s, API and
//! end-to-end latency (send → arrival at the receiver) p50/p99, CPU seconds per process and peak
//! RSS. Workloads:
//!
//! - `events`: `POST /v1/events` fanned out to `--fanout` endpoints (optionally with `--rules`
//!   active rules evaluated on every event);
//! - `invoke`: `POST /v1/actions/{name}/invoke` of an `async` action by an agent with a JWT
//!   (authentication, scope, casbin, schema, idempotency, durable write — the gateway overhead).
//!
//! `--startup N` instead measures start-to-ready (`/readyz`) on N empty SQLite databases.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    Events,
    Invoke,
}

#[derive(Debug, Parser)]
#[command(name = "opsiq-bench", about = "End-to-end benchmarks for opsiq")]
struct Args {
    /// What to send.
    #[arg(long, value_enum, default_value = "events")]
    workload: Workload,
    /// Number of calls to send.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Calls in flight (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Calls per second (open loop); overrides --concurrency.
    #[arg(long)]
    rate: Option<u64>,
    /// Endpoints subscribed to every event.
    #[arg(long, default_value_t = 1)]
    fanout: usize,
    /// Each endpoint's `max_in_flight` (none by default); on PostgreSQL, held across replicas.
    #[arg(long)]
    endpoint_max_in_flight: Option<u32>,
    /// Active rules triggered by every event (none of them matches, so nothing extra is sent).
    #[arg(long, default_value_t = 0)]
    rules: usize,
    /// Database URL; default a fresh SQLite file in a temporary directory. A postgres:// URL must
    /// name an empty database.
    #[arg(long)]
    database_url: Option<String>,
    /// Warm-up calls sent (and delivered) before measuring.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Measure start-to-ready this many times instead of running a workload.
    #[arg(long)]
    startup: Option<usize>,
    /// Write the server's `/metrics` text, as it stands after the run, to this file.
    #[arg(long)]
    metrics_out: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Arrivals {
    at: HashMap<String, Vec<Instant>>,
    count: usize,
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The server's `/metrics` text.
async fn server_metrics(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    Ok(http.get(format!("{base}/metrics")).send().await?.text().await?)
}

/// The server's latency histogram for `route` in `metrics` (its `/metrics` text) as (upper
/// bound in seconds, cumulative count).
fn latency_buckets(metrics: &str, route: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let route_label = format!("route=\"{route}\"");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("opsiq_http_request_duration_seconds_bucket{") else {
            continue;
        };
        if !rest.contains(&route_label) || !rest.contains("method=\"POST\"") {
            continue;
        }
        let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
        if let (Some(le), Some(count)) = (le, count) {
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse()? };
            buckets.push((le, count));
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// The `q` quantile of cumulative histogram buckets, interpolated within its bucket (as
/// Prometheus's `histogram_quantile` does).
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * share;
        }
        lower = (le, count);
    }
    lower.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn scratch_dir(tag: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("opsiq-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A running `opsiq serve`.
struct Server {
    child: tokio::process::Child,
    pid: u32,
    base: String,
}

async fn start_server(exe: &std::path::Path, dir: &std::path::Path, url: &str) -> anyhow::Result<Server> {
    let mut child = tokio::process::Command::new(exe)
        .current_dir(dir)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--database-url", url])
        .env("RUST_LOG", "warn")
        .env("OPSIQ_AGENT_RATE_PER_S", "1000000")
        .env("OPSIQ_ACTION_RATE_PER_S", "1000000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("server exited"))?;
        if let Some(b) = line.strip_prefix("listening on ") {
            break b.to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server { child, pid, base })
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = http
        .request(method, url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "setup call failed with {status}: {body}");
    Ok(body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    opsiq::crypto::install_tls_provider();
    let exe = std::env::current_exe()?.with_file_name("opsiq");
    if let Some(n) = args.startup {
        return measure_startup(&exe, n).await;
    }
    let dir = scratch_dir("run")?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.display()));

    // The receiver: records when each event or invocation id arrives.
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let rx_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let rx_addr = rx_listener.local_addr()?;
    let a = arrivals.clone();
    let receiver = axum::Router::new().fallback(move |body: Bytes| {
        let a = a.clone();
        async move {
            let now = Instant::now();
            if let Ok(v) = serde_json::from_slice::<Value>(&body)
                && let Some(id) = v["id"].as_str()
            {
                let mut a = a.lock().unwrap();
                a.at.entry(id.to_string()).or_default().push(now);
                a.count += 1;
            }
            "{}"
        }
    });
    tokio::spawn(async move { axum::serve(rx_listener, receiver).await });

    let init = tokio::process::Command::new(&exe)
        .current_dir(&dir)
        .args(["init", "--json", "--database-url", &url])
        .output()
        .await?;
    anyhow::ensure!(
        init.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let key = serde_json::from_slice::<Value>(&init.stdout)?["admin_key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut server = start_server(&exe, &dir, &url).await?;
    let base = server.base.clone();
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()?;
    let post = reqwest::Method::POST;

    let mut endpoint_ids = Vec::new();
    for i in 0..args.fanout.max(1) {
        let ep = call(
            &http,
            post.clone(),
            format!("{base}/v1/endpoints"),
            &key,
            json!({"url": format!("http://{rx_addr}/hook/{i}"), "event_types": ["invoice.*"],
                "max_in_flight": args.endpoint_max_in_flight}),
        )
        .await?;
        endpoint_ids.push(ep["id"].as_str().unwrap_or_default().to_string());
    }
    for i in 0..args.rules {
        call(
            &http,
            post.clone(),
            format!("{base}/v1/rules"),
            &key,
            json!({
            "name": format!("bench rule {i}"), "when": {"event_type": "invoice.*"},
            "if": {"all": [{"field": "data.currency", "op": "eq", "value": "jpy"},
                           {"field": "data.amount", "op": "gt", "value": 1_000_000 + i}]},
            "then": [{"emit": {"type": "bench.never", "data": {"n": i}}}]}),
        )
        .await?;
    }

    let token = match args.workload {
        Workload::Events => String::new(),
        Workload::Invoke => {
            call(&http, post.clone(), format!("{base}/v1/actions"), &key, json!({
                "name": "bench_action", "description": "Benchmark action", "mode": "async",
                "endpoint_id": endpoint_ids[0],
                "input_schema": {"type": "object", "properties": {"invoice_id": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}},
                                 "required": ["invoice_id", "amount"], "additionalProperties": false}})).await?;
            call(&http, reqwest::Method::PUT, format!("{base}/v1/policies"), &key,
                json!({"rows": [{"subject": "role:bench", "object": "bench_*", "act": "invoke", "effect": "allow"}]})).await?;
            call(
                &http,
                post.clone(),
                format!("{base}/v1/agents"),
                &key,
                json!({"id": "agt_bench", "name": "bench", "roles": ["bench"]}),
            )
            .await?;
            let t = call(
                &http,
                post.clone(),
                format!("{base}/v1/agents/agt_bench/tokens"),
                &key,
                json!({"scopes": ["invoke:*"], "ttl_seconds": 86400}),
            )
            .await?;
            t["token"].as_str().unwrap_or_default().to_string()
        }
    };

    let send: SendFn = {
        let (http, base, key, workload) = (http.clone(), base.clone(), key.clone(), args.workload);
        Arc::new(move |i: usize| {
            let (http, base, key, token) = (http.clone(), base.clone(), key.clone(), token.clone());
            Box::pin(async move {
                let started = Instant::now();
                let req = match workload {
                    Workload::Events => http
                        .post(format!("{base}/v1/events"))
                        .bearer_auth(&key)
                        .header("Idempotency-Key", format!("bench-{i}"))
                        .json(&json!({"type": "invoice.paid", "data": {"invoice_id": format!("in_{i}"), "amount": 4200, "currency": "eur"}})),
                    Workload::Invoke => http
                        .post(format!("{base}/v1/actions/bench_action/invoke"))
                        .bearer_auth(&token)
                        .header("Idempotency-Key", format!("bench-{i}"))
                        .json(&json!({"arguments": {"invoice_id": format!("in_{i}"), "amount": 4200}})),
                };
                let id = match req.send().await {
                    Ok(r) if r.status().is_success() => r.json::<Value>().await.ok().and_then(|v| {
                        v["event_id"]
                            .as_str()
                            .or(v["invocation_id"].as_str())
                            .map(str::to_string)
                    }),
                    _ => None,
                };
                (id, started, started.elapsed())
            })
        })
    };

    let per_call = match args.workload {
        Workload::Events => args.fanout.max(1),
        Workload::Invoke => 1,
    };
    run_closed(&send, 0..args.warmup, 16).await;
    wait_delivered(&arrivals, args.warmup * per_call, Duration::from_secs(120)).await?;
    *arrivals.lock().unwrap() = Arrivals::default();

    let route = match args.workload {
        Workload::Events => "/v1/events",
        Workload::Invoke => "/v1/actions/{name}/invoke",
    };
    let server_buckets_0 = latency_buckets(&server_metrics(&http, &server.base).await?, route)?;
    let cpu_server_0 = proc_cpu_seconds(server.pid);
    let cpu_self_0 = proc_cpu_seconds(std::process::id());
    let started = Instant::now();
    let range = args.warmup..args.warmup + args.events;
    let sent = match args.rate {
        Some(rate) => run_open(&send, range, rate).await,
        None => run_closed(&send, range, args.concurrency).await,
    };
    let accepted_elapsed = started.elapsed();
    let accepted = sent.iter().filter(|s| s.0.is_some()).count();
    wait_delivered(&arrivals, accepted * per_call, Duration::from_secs(600)).await?;
    let delivered_elapsed = started.elapsed();
    let cpu_server = proc_cpu_seconds(server.pid) - cpu_server_0;
    let metrics_after = server_metrics(&http, &server.base).await?;
    let server_buckets: Vec<(f64, f64)> = latency_buckets(&metrics_after, route)?
        .into_iter()
        .zip(server_buckets_0)
        .map(|((le, n), (_, n0))| (le, n - n0))
        .collect();
    let cpu_self = proc_cpu_seconds(std::process::id()) - cpu_self_0;
    if let Some(path) = &args.metrics_out {
        std::fs::write(path, &metrics_after)?;
    }

    let arrived = std::mem::take(&mut arrivals.lock().unwrap().at);
    let mut e2e = Vec::with_capacity(accepted * per_call);
    let mut api: Vec<Duration> = sent.iter().map(|s| s.2).collect();
    for (id, sent_at, _) in &sent {
        if let Some(id) = id
            && let Some(times) = arrived.get(id)
        {
            e2e.extend(times.iter().map(|t| t.duration_since(*sent_at)));
        }
    }
    e2e.sort();
    api.sort();
    let mode = match args.rate {
        Some(r) => format!("open loop {r}/s"),
        None => format!("closed loop C={}", args.concurrency),
    };
    println!(
        "opsiq-bench: {:?}, {} calls, fan-out {}, {} rules, {mode}, database {}",
        args.workload,
        args.events,
        args.fanout,
        args.rules,
        url.split("://").next().unwrap_or("")
    );
    println!(
        "  accepted     {accepted} in {:.2} s = {:.0} calls/s",
        accepted_elapsed.as_secs_f64(),
        accepted as f64 / accepted_elapsed.as_secs_f64()
    );
    println!(
        "  delivered    {} in {:.2} s = {:.0} deliveries/s",
        e2e.len(),
        delivered_elapsed.as_secs_f64(),
        e2e.len() as f64 / delivered_elapsed.as_secs_f64()
    );
    println!(
        "  API latency  p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&api, 0.5)),
        ms(percentile(&api, 0.99))
    );
    println!(
        "  in server    p50 {:.2} ms, p99 {:.2} ms (request in to answer out, from /metrics)",
        bucket_quantile(&server_buckets, 0.5) * 1000.0,
        bucket_quantile(&server_buckets, 0.99) * 1000.0
    );
    println!(
        "  end to end   p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&e2e, 0.5)),
        ms(percentile(&e2e, 0.99))
    );
    println!("  CPU          server {cpu_server:.2} s, bench+receiver {cpu_self:.2} s");
    println!(
        "  peak RSS     server {:.1} MiB, bench+receiver {:.1} MiB",
        peak_rss_mib(server.pid),
        peak_rss_mib(std::process::id())
    );
    let _ = server.child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Start to ready on an empty SQLite database, `n` times.
async fn measure_startup(exe: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let dir = scratch_dir(&format!("startup-{i}"))?;
        let url = format!("sqlite://{}/opsiq.db", dir.display());
        let started = Instant::now();
        let mut server = start_server(exe, &dir, &url).await?;
        loop {
            if http
                .get(format!("{}/readyz", server.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(started.elapsed());
        let _ = server.child.kill().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    times.sort();
    println!(
        "start to ready on an empty SQLite database, {n} runs: p50 {:.1} ms, max {:.1} ms",
        ms(percentile(&times, 0.5)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );
    Ok(())
}

type Sent = (Option<String>, Instant, Duration);
type SendFn =
    Arc<dyn Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = Sent> + Send>> + Send + Sync>;

/// Closed loop: `concurrency` workers, each sending its next call when the previous one answered.
async fn run_closed(send: &SendFn, range: std::ops::Range<usize>, concurrency: usize) -> Vec<Sent> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (next, send, end) = (next.clone(), send.clone(), range.end);
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return done;
                }
                done.push(send(i).await);
            }
        });
    }
    let mut out = Vec::with_capacity(range.len());
    while let Some(Ok(done)) = workers.join_next().await {
        out.extend(done);
    }
    out
}

/// Open loop: one call every `1/rate` seconds, whatever the answers do.
async fn run_open(send: &SendFn, range: std::ops::Range<usize>, rate: u64) -> Vec<Sent> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    for i in range {
        tick.tick().await;
        calls.spawn(send(i));
    }
    let mut out = Vec::new();
    while let Some(Ok(sent)) = calls.join_next().await {
        out.push(sent);
    }
    out
}

async fn wait_delivered(
    arrivals: &Mutex<Arrivals>,
    expected: usize,
    deadline: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while arrivals.lock().unwrap().count < expected {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "only {} of {expected} deliveries arrived within {deadline:?}",
            arrivals.lock().unwrap().count
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
