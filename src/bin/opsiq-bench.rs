//! `opsiq-bench`: end-to-end load test of the delivery path through the public API.
//!
//! Starts `opsiq serve` (the binary next to this one) on a fresh database, a local receiver, and
//! `--fanout` endpoints pointing at it; fires `--events` events closed-loop (`--concurrency` calls
//! in flight) or open-loop (`--rate` per second); waits until every delivery arrived; prints
//! accepted/s, delivered/s, end-to-end latency (send → arrival) p50/p99, CPU seconds per process
//! and peak RSS.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use clap::Parser;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(name = "opsiq-bench", about = "End-to-end delivery benchmark for opsiq")]
struct Args {
    /// Number of events to send.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Calls in flight (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Events per second (open loop); overrides --concurrency.
    #[arg(long)]
    rate: Option<u64>,
    /// Endpoints subscribed to every event.
    #[arg(long, default_value_t = 1)]
    fanout: usize,
    /// Database URL; default a fresh SQLite file in a temporary directory. A postgres:// URL must
    /// name an empty database.
    #[arg(long)]
    database_url: Option<String>,
    /// Warm-up events sent (and delivered) before measuring.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    opsiq::crypto::install_tls_provider();
    let dir = tempfile_dir()?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.display()));
    let exe = std::env::current_exe()?.with_file_name("opsiq");

    // The receiver: records when each event id arrives.
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let rx_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let rx_addr = rx_listener.local_addr()?;
    let a = arrivals.clone();
    let receiver = axum::Router::new().fallback(move |body: Bytes| {
        let a = a.clone();
        async move {
            let now = Instant::now();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(id) = v["id"].as_str()
            {
                let mut a = a.lock().unwrap();
                a.at.entry(id.to_string()).or_default().push(now);
                a.count += 1;
            }
            "ok"
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
    let key = serde_json::from_slice::<serde_json::Value>(&init.stdout)?["admin_key"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let mut server = tokio::process::Command::new(&exe)
        .current_dir(&dir)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let server_pid = server.id().unwrap_or(0);
    let mut lines = tokio::io::BufReader::new(server.stdout.take().expect("stdout")).lines();
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

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()?;
    for i in 0..args.fanout {
        let resp = http
            .post(format!("{base}/v1/endpoints"))
            .bearer_auth(&key)
            .json(&json!({"url": format!("http://{rx_addr}/hook/{i}")}))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 201,
            "endpoint creation failed: {}",
            resp.text().await?
        );
    }

    let send: SendFn = {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        Arc::new(move |i: usize| {
            let (http, base, key) = (http.clone(), base.clone(), key.clone());
            Box::pin(async move {
                let started = Instant::now();
                let resp = http
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(&key)
                    .header("Idempotency-Key", format!("bench-{i}"))
                    .json(&json!({"type": "invoice.paid", "data": {"invoice_id": format!("in_{i}"), "amount": 4200, "currency": "eur"}}))
                    .send()
                    .await;
                let id = match resp {
                    Ok(r) if r.status() == 202 => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["event_id"].as_str().map(str::to_string)),
                    _ => None,
                };
                (id, started, started.elapsed())
            })
        })
    };

    // Warm up connections, caches and the database.
    run_closed(&send, 0..args.warmup, 16).await;
    wait_delivered(&arrivals, args.warmup * args.fanout, Duration::from_secs(120)).await?;
    {
        let mut a = arrivals.lock().unwrap();
        *a = Arrivals::default();
    }

    let cpu_server_0 = proc_cpu_seconds(server_pid);
    let cpu_self_0 = proc_cpu_seconds(std::process::id());
    let started = Instant::now();
    let range = args.warmup..args.warmup + args.events;
    let sent = match args.rate {
        Some(rate) => run_open(&send, range, rate).await,
        None => run_closed(&send, range, args.concurrency).await,
    };
    let accepted_elapsed = started.elapsed();
    let accepted = sent.iter().filter(|s| s.0.is_some()).count();
    wait_delivered(&arrivals, accepted * args.fanout, Duration::from_secs(600)).await?;
    let delivered_elapsed = started.elapsed();
    let cpu_server = proc_cpu_seconds(server_pid) - cpu_server_0;
    let cpu_self = proc_cpu_seconds(std::process::id()) - cpu_self_0;

    let arrived = std::mem::take(&mut arrivals.lock().unwrap().at);
    let mut e2e = Vec::with_capacity(accepted * args.fanout);
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
        "opsiq-bench: {} events, fan-out {}, {mode}, database {}",
        args.events,
        args.fanout,
        url.split("://").next().unwrap_or("")
    );
    println!(
        "  accepted     {accepted} in {:.2} s = {:.0} events/s",
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
        "  end to end   p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&e2e, 0.5)),
        ms(percentile(&e2e, 0.99))
    );
    println!("  CPU          server {cpu_server:.2} s, bench+receiver {cpu_self:.2} s");
    println!(
        "  peak RSS     server {:.1} MiB, bench+receiver {:.1} MiB",
        peak_rss_mib(server_pid),
        peak_rss_mib(std::process::id())
    );
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("opsiq-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
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
