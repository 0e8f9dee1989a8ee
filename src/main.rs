//! The `opsiq` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use opsiq::config::{Config, LogFormat};
use serde::Serialize;

// Many short-lived buffers (request bodies, statements, signed headers) cross threads; glibc's
// allocator spent a fifth of the server's time on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "opsiq", version, about = "OpsIQ: the tool-call gateway for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (HTTP API, MCP server and delivery worker).
    Serve(ServeArgs),
    /// Create the database and a tenant, and print its owner API key once.
    Init(InitArgs),
    /// Run a local receiver that verifies and prints every delivery.
    Listen(ListenArgs),
    /// Verify a received webhook: body on stdin, headers as flags.
    Verify(VerifyArgs),
    /// The audit log of admin changes.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every tenant's hash chain; exit non-zero naming the first row that does not hold.
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args, Serialize)]
struct AuditVerifyArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
struct ListenArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 9999)]
    port: u16,
    /// Endpoint secret (whsec_…); repeat during a rotation.
    #[arg(long = "secret", required = true, value_parser = non_empty_secret)]
    secrets: Vec<String>,
    /// Forward verified requests to this URL and relay its answer.
    #[arg(long, value_parser = http_url)]
    forward: Option<String>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// Endpoint secret (whsec_…); repeat to accept any of several.
    #[arg(long = "secret", required = true, value_parser = non_empty_secret)]
    secrets: Vec<String>,
    /// The request's path and query, exactly as received (e.g. /hooks/opsiq?x=1).
    #[arg(long)]
    request_target: String,
    /// A received header as 'Name: value'; repeat for each.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Unix time to verify at (default: now).
    #[arg(long)]
    now: Option<i64>,
}

/// Flags shared by commands that open the database; unset flags leave lower layers in charge.
#[derive(Debug, Args, Serialize)]
struct CommonArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Database URL: sqlite://opsiq.db (default) or postgres://…
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database_url: Option<String>,
    /// Log format: human or json.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<String>,
}

#[derive(Debug, Args, Serialize)]
struct ServeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Allow delivery to loopback and private addresses. Never use in production.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dev: bool,
    /// Delays between delivery attempts, e.g. 5s,5m,30m,2h,5h,10h.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_schedule: Option<String>,
    /// How long delivery records are kept, e.g. 30d.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<String>,
}

#[derive(Debug, Args, Serialize)]
struct InitArgs {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
    /// Name of the tenant to create (default: "default").
    #[arg(long)]
    #[serde(skip)]
    tenant: Option<String>,
    /// Print {"tenant_id","admin_key"} as JSON.
    #[arg(long)]
    #[serde(skip)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Init(args) => init(args).await,
            Command::Listen(args) => listen(args).await,
            Command::Verify(args) => return Ok(verify(args)),
            Command::Audit(AuditCommand::Verify(args)) => return audit_verify(args).await,
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => fail(&format!("{e:#}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn load_config(file: Option<&PathBuf>, overrides: &impl Serialize) -> anyhow::Result<Config> {
    Ok(Config::load(file.map(PathBuf::as_path), overrides)?)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(args.common.config.as_ref(), &args)?;
    opsiq::telemetry::init_logging(config.log_format);
    if config.dev {
        tracing::warn!(
            "--dev: deliveries to loopback and private addresses are ALLOWED; never run this in production"
        );
    }
    // Refuse a database another process serves before opening it (and starting its workers).
    let server_lock = opsiq::db::ServerLock::take(&config.database_url)?;
    if let opsiq::db::ServerLock::Contended(path) = &server_lock {
        anyhow::bail!(
            "another opsiq process is serving this database (it holds {}); a SQLite database is \
             served by one process (several replicas need PostgreSQL)",
            path.display()
        );
    }
    let stop = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let state = opsiq::AppState::open_locked(config, server_lock).await?;
    if let Some(tenant) = state.bootstrap_first_tenant().await? {
        println!(
            "Created tenant \"default\" ({}) on this new database.",
            tenant.tenant_id
        );
        println!("Owner API key (shown once, keep it safe): {}", tenant.admin_key);
    }
    tracing::info!(%addr, "opsiq is ready");
    println!("listening on http://{addr}");
    opsiq::app::serve(state, listener, stop).await
}

async fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = load_config(args.common.config.as_ref(), &args)?;
    if config.log_format == LogFormat::Json {
        opsiq::telemetry::init_logging(config.log_format);
    }
    let created = opsiq::init(&config, args.tenant.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&created)?);
    } else {
        println!("Created tenant {}.", created.tenant_id);
        println!(
            "Owner API key (shown once, keep it safe):\n\n    {}\n",
            created.admin_key
        );
        println!("Next: opsiq serve, then call the API with `Authorization: Bearer <key>`.");
    }
    Ok(())
}

async fn audit_verify(args: AuditVerifyArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.common.config.as_ref(), &args)?;
    // Checking a database must not create one where none was.
    if let Some(file) = opsiq::db::sqlite_file(&config.database_url)?
        && !file.exists()
    {
        anyhow::bail!("there is no database at {}", file.display());
    }
    // The chain's key comes from the master key; without it nothing could be checked.
    // As it is: checking must not migrate (or otherwise change) what it checks.
    let db = opsiq::db::Database::connect_existing(&config.database_url).await?;
    const UNREADABLE: &str = "cannot read the audit log; is this an OpsIQ database that `opsiq serve` or `opsiq init` has brought up to date?";
    // A wrong key would make every row look tampered with; say which it is.
    let keys =
        opsiq::tenants::open_master_key(&db, config.master_key.as_deref(), &config.master_key_file, false)
            .await
            .map_err(|e| {
                if e.is::<sqlx::Error>() || e.is::<opsiq::db::DbError>() {
                    e.context(UNREADABLE)
                } else {
                    e
                }
            });
    let keys = match keys {
        Ok((keys, _)) => keys,
        Err(e) => {
            db.close().await;
            return Err(e);
        }
    };
    let report = opsiq::audit::verify(&db, keys.audit_chain_key()).await;
    db.close().await;
    let report = report.context(UNREADABLE)?;
    match report.broken {
        None => {
            println!(
                "the audit log holds: {} rows in {} chains",
                report.rows, report.chains
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(row) => {
            eprintln!(
                "the audit log is broken at tenant {} row {} ({}): {}",
                row.tenant_id, row.seq, row.id, row.reason
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A `--secret` with something in it.
fn non_empty_secret(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("a secret must not be empty (the endpoint's is whsec_…)".into());
    }
    Ok(value.to_string())
}

/// An `http://` or `https://` URL.
fn http_url(value: &str) -> Result<String, String> {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(value.to_string()),
        Ok(_) => Err("must be an http:// or https:// URL".into()),
        Err(e) => Err(format!("is not a URL ({e})")),
    }
}

async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    println!(
        "verifying with {} secret(s); Ctrl-C to stop\n",
        args.secrets.len()
    );
    opsiq::delivery::listen::run(listener, args.secrets, args.forward).await
}

fn verify(args: VerifyArgs) -> ExitCode {
    use std::io::Read;
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        return fail(&format!("cannot read the body from stdin: {e}"));
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        match h.split_once(':') {
            Some((name, value)) => headers.push((name.trim().to_string(), value.trim().to_string())),
            None => return fail(&format!("--header '{h}' is not 'Name: value'")),
        }
    }
    let now = args
        .now
        .unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp());
    let secrets: Vec<&str> = args.secrets.iter().map(String::as_str).collect();
    match opsiq::delivery::verify::verify_request(
        &secrets,
        headers.as_slice(),
        &args.request_target,
        &body,
        now,
    ) {
        Ok(_) => {
            println!("valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // A refusal, like every failing command's reason, goes to stderr.
            eprintln!("invalid: {} ({e})", e.reason());
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers at once, so a signal arriving at any moment after
/// start is a graceful stop rather than the default abrupt exit, and answers a future that
/// resolves on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        tracing::info!("shutting down");
    })
}

/// Answers a future that resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
}
