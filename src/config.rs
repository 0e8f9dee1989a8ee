//! Layered configuration: built-in defaults < TOML file (`--config`) < `OPSIQ_*` environment <
//! command-line flags. Everything is validated once here, so the rest of the crate works with
//! typed values (`Duration`, `SocketAddr`, …) and never re-parses strings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A configuration problem found at start; the process prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layered sources could not be read or merged.
    #[error("configuration could not be read: {0}")]
    Load(String),
    /// A value was read but makes no sense.
    #[error("invalid configuration value for `{field}`: {message}")]
    Invalid {
        /// The configuration key at fault.
        field: &'static str,
        /// Why the value was refused.
        message: String,
    },
}

/// The raw, string-typed layer that figment merges; see [`Config`] for the meaning of each field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// `sqlite://path` or `postgres://…`.
    pub database_url: String,
    /// Allows delivery to loopback and private addresses.
    pub dev: bool,
    /// Comma-separated delays between delivery attempts.
    pub retry_schedule: String,
    /// How long delivery records, attempts and events are kept.
    pub retention: String,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Deepest accepted JSON nesting in request bodies.
    pub max_json_depth: usize,
    /// Longest a client may take to send a request's headers, and again its body.
    pub read_timeout: String,
    /// Longest a graceful stop waits for requests in progress.
    pub shutdown_timeout: String,
    /// `human` or `json`.
    pub log_format: String,
    /// Declarative action files.
    pub actions_dir: PathBuf,
    /// Declarative event type schemas.
    pub events_dir: PathBuf,
    /// Policy model and default rows.
    pub policies_dir: PathBuf,
    /// Base64 of a 32-byte key that encrypts secrets at rest; wins over `master_key_file`.
    pub master_key: Option<String>,
    /// File holding the master key; `opsiq init` creates it.
    pub master_key_file: PathBuf,
    /// How long a rotated-out endpoint secret keeps signing.
    pub secret_overlap: String,
    /// TCP connect timeout for deliveries.
    pub connect_timeout: String,
    /// Total timeout of one delivery attempt.
    pub request_timeout: String,
    /// How many deliveries may be in flight at once in this process.
    pub max_in_flight: usize,
    /// How many API requests may be in progress at once; more are refused with 503 at once
    /// rather than queued (health and metrics routes are never refused).
    pub max_requests_in_flight: usize,
    /// How long a claimed delivery stays reserved for the process that claimed it.
    pub lease: String,
    /// How often the worker looks for due deliveries it was not handed directly.
    pub poll_interval: String,
    /// Runs the delivery worker in this process.
    pub worker: bool,
    /// How often old records are purged.
    pub purge_interval: String,
    /// Longest time a process keeps cached configuration (actions, endpoints, rules, event
    /// types, API keys); on PostgreSQL other replicas' changes also clear it at once.
    pub cache_ttl: String,
    /// Invocations per second one agent may make (token bucket).
    pub agent_rate_per_s: u32,
    /// Invocations per second of one action across agents (token bucket).
    pub action_rate_per_s: u32,
    /// Comma-separated origins (`https://app.example.com`) whose browser pages may call `/mcp`.
    pub mcp_allowed_origins: String,
    /// The URL clients reach this server at (`https://gateway.example.com`), which the MCP
    /// resource metadata names.
    pub public_url: String,
    /// Comma-separated authorization servers (issuer URLs) that MCP clients are told issue
    /// tokens for `/mcp`; with them (and `public_url`) the resource metadata is published.
    pub mcp_authorization_servers: String,
    /// Scheduling priority (nice, -20 to 19) of SQLite's writer thread; 0 leaves it as it is.
    pub sqlite_writer_nice: i32,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            database_url: "sqlite://opsiq.db".into(),
            dev: false,
            retry_schedule: DEFAULT_RETRY_SCHEDULE.into(),
            retention: "30d".into(),
            body_limit: 1024 * 1024,
            max_json_depth: 64,
            read_timeout: "30s".into(),
            shutdown_timeout: "30s".into(),
            log_format: "human".into(),
            actions_dir: "schemas/actions".into(),
            events_dir: "schemas/events".into(),
            policies_dir: "policies".into(),
            master_key: None,
            master_key_file: "opsiq.key".into(),
            secret_overlap: "24h".into(),
            connect_timeout: "5s".into(),
            request_timeout: "15s".into(),
            max_in_flight: 512,
            max_requests_in_flight: 1024,
            lease: "60s".into(),
            poll_interval: "1s".into(),
            worker: true,
            purge_interval: "1h".into(),
            cache_ttl: "1s".into(),
            agent_rate_per_s: 100,
            action_rate_per_s: 1000,
            mcp_allowed_origins: String::new(),
            public_url: String::new(),
            mcp_authorization_servers: String::new(),
            sqlite_writer_nice: -5,
        }
    }
}

/// The default retry delays; the last one is "the rest of 24 hours" after the first six.
pub const DEFAULT_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,6h24m55s";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Coloured, one line per event, for people.
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Validated configuration, shared as `Arc<Config>`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// `sqlite://path` or `postgres://…`.
    pub database_url: String,
    /// Allows delivery to loopback and private addresses (never the default).
    pub dev: bool,
    /// Delays between delivery attempts: attempt n+1 waits `retry_schedule[n-1]`.
    pub retry_schedule: Vec<Duration>,
    /// How long delivery records, attempts and events are kept.
    pub retention: Duration,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Deepest accepted JSON nesting in request bodies.
    pub max_json_depth: usize,
    /// Longest a client may take to send a request's headers, and again its body: a client
    /// that trickles them would otherwise hold a connection, and a request slot, for good.
    pub read_timeout: Duration,
    /// Longest a graceful stop waits for requests in progress (a long poll, a slow `sync` call,
    /// a stalled body) before it closes their connections; what they accepted is recorded.
    pub shutdown_timeout: Duration,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Declarative action files (`*.json`), applied to every tenant at start.
    pub actions_dir: PathBuf,
    /// Event type schemas (`*.json`) added to, or replacing, the compiled-in catalog.
    pub events_dir: PathBuf,
    /// `model.conf` and `policy.csv`.
    pub policies_dir: PathBuf,
    /// Base64 master key given directly (environment), wins over the key file.
    pub master_key: Option<String>,
    /// File that holds the master key.
    pub master_key_file: PathBuf,
    /// How long a rotated-out endpoint secret keeps signing.
    pub secret_overlap: Duration,
    /// TCP connect timeout for deliveries.
    pub connect_timeout: Duration,
    /// Total timeout of one delivery attempt.
    pub request_timeout: Duration,
    /// How many deliveries may be in flight at once in this process.
    pub max_in_flight: usize,
    /// How many API requests may be in progress at once; more are refused with 503 at once
    /// rather than queued (health and metrics routes are never refused).
    pub max_requests_in_flight: usize,
    /// How long a claimed delivery stays reserved for the process that claimed it.
    pub lease: Duration,
    /// How often the worker looks for due deliveries it was not handed directly.
    pub poll_interval: Duration,
    /// Runs the delivery worker in this process.
    pub worker: bool,
    /// How often old records are purged.
    pub purge_interval: Duration,
    /// Longest time a process keeps cached configuration; see [`RawConfig::cache_ttl`].
    pub cache_ttl: Duration,
    /// Invocations per second one agent may make (token bucket).
    pub agent_rate_per_s: u32,
    /// Invocations per second of one action across agents (token bucket).
    pub action_rate_per_s: u32,
    /// Origins whose browser pages may call `/mcp`, as [`normalize_origin`] writes them.
    pub mcp_allowed_origins: Vec<String>,
    /// The URL clients reach this server at, without a trailing slash.
    pub public_url: Option<String>,
    /// Authorization servers named in the MCP resource metadata (none: it is not published).
    pub mcp_authorization_servers: Vec<String>,
    /// Scheduling priority of SQLite's writer thread (0: left as it is).
    pub sqlite_writer_nice: i32,
}

/// An origin as `scheme://host[:port]`, lower case and without a default port, or `None` if
/// `text` is not an http(s) origin (a path, a query or credentials make it none).
pub fn normalize_origin(text: &str) -> Option<String> {
    let url = plain_http_url(text)?;
    (url.path() == "/").then(|| url.origin().ascii_serialization())
}

/// `text` as an http(s) URL with a host and no query, fragment or credentials.
fn plain_http_url(text: &str) -> Option<reqwest::Url> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    plain.then_some(url)
}

/// Refuses a key of the configuration file that is no setting (a misspelt `databse_url` would
/// otherwise leave its setting at the default without a word).
fn check_file_keys(path: &Path) -> Result<(), ConfigError> {
    let in_file: figment::value::Dict = Figment::from(Toml::file(path))
        .extract()
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    let known = serde_json::to_value(RawConfig::default()).map_err(|e| ConfigError::Load(e.to_string()))?;
    match in_file.keys().find(|key| known.get(key.as_str()).is_none()) {
        Some(key) => Err(ConfigError::Load(format!(
            "`{key}` in {} is not a setting (see the README's Configuration)",
            path.display()
        ))),
        None => Ok(()),
    }
}

impl Config {
    /// Merges defaults, the optional TOML file, `OPSIQ_*` variables and `overrides` (flags).
    pub fn load(file: Option<&Path>, overrides: &impl Serialize) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            check_file_keys(path)?;
            figment = figment.merge(Toml::file(path));
        }
        let raw: RawConfig = figment
            .merge(Env::prefixed("OPSIQ_").ignore(&["test_postgres_url"]))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        Self::from_raw(raw)
    }

    /// Validates a raw layer into typed configuration.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen = raw.listen.parse().map_err(|_| ConfigError::Invalid {
            field: "listen",
            message: format!("`{}` is not an address like 127.0.0.1:8080", raw.listen),
        })?;
        if !(raw.database_url.starts_with("sqlite:")
            || raw.database_url.starts_with("postgres://")
            || raw.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                field: "database_url",
                message: "must start with sqlite:// or postgres://".into(),
            });
        }
        let retry_schedule = parse_schedule(&raw.retry_schedule)?;
        let log_format = match raw.log_format.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid {
                    field: "log_format",
                    message: format!("`{other}` is neither `human` nor `json`"),
                });
            }
        };
        if raw.body_limit < 1024 {
            return Err(ConfigError::Invalid {
                field: "body_limit",
                message: "must be at least 1024 bytes".into(),
            });
        }
        if !(2..=512).contains(&raw.max_json_depth) {
            return Err(ConfigError::Invalid {
                field: "max_json_depth",
                message: "must be between 2 and 512".into(),
            });
        }
        if raw.max_in_flight == 0 {
            return Err(ConfigError::Invalid {
                field: "max_in_flight",
                message: "must be at least 1".into(),
            });
        }
        if raw.max_requests_in_flight == 0 {
            return Err(ConfigError::Invalid {
                field: "max_requests_in_flight",
                message: "must be at least 1".into(),
            });
        }
        if !(-20..=19).contains(&raw.sqlite_writer_nice) {
            return Err(ConfigError::Invalid {
                field: "sqlite_writer_nice",
                message: "must be between -20 and 19".into(),
            });
        }
        let public_url = Some(raw.public_url.trim())
            .filter(|url| !url.is_empty())
            .map(|url| {
                secure_url(url)
                    .map(|url| url.as_str().trim_end_matches('/').to_string())
                    .ok_or_else(|| ConfigError::Invalid {
                        field: "public_url",
                        message: format!("`{url}` is not an https URL like https://gateway.example.com"),
                    })
            })
            .transpose()?;
        let mcp_authorization_servers = parse_authorization_servers(&raw.mcp_authorization_servers)?;
        if !mcp_authorization_servers.is_empty() && public_url.is_none() {
            return Err(ConfigError::Invalid {
                field: "mcp_authorization_servers",
                message: "needs public_url too: the resource metadata must name the URL clients use".into(),
            });
        }
        let request_timeout = parse_duration("request_timeout", &raw.request_timeout)?;
        let lease = parse_duration("lease", &raw.lease)?;
        if lease <= request_timeout {
            return Err(ConfigError::Invalid {
                field: "lease",
                message: "must be longer than request_timeout, or a slow attempt could be sent twice".into(),
            });
        }
        Ok(Self {
            listen,
            database_url: raw.database_url,
            dev: raw.dev,
            retry_schedule,
            retention: parse_duration("retention", &raw.retention)?,
            body_limit: raw.body_limit,
            max_json_depth: raw.max_json_depth,
            read_timeout: parse_duration("read_timeout", &raw.read_timeout)?,
            shutdown_timeout: parse_duration("shutdown_timeout", &raw.shutdown_timeout)?,
            log_format,
            actions_dir: raw.actions_dir,
            events_dir: raw.events_dir,
            policies_dir: raw.policies_dir,
            master_key: raw.master_key.filter(|k| !k.is_empty()),
            master_key_file: raw.master_key_file,
            secret_overlap: parse_duration("secret_overlap", &raw.secret_overlap)?,
            connect_timeout: parse_duration("connect_timeout", &raw.connect_timeout)?,
            request_timeout,
            max_in_flight: raw.max_in_flight,
            max_requests_in_flight: raw.max_requests_in_flight,
            lease,
            poll_interval: parse_duration("poll_interval", &raw.poll_interval)?,
            worker: raw.worker,
            purge_interval: parse_duration("purge_interval", &raw.purge_interval)?,
            cache_ttl: parse_duration("cache_ttl", &raw.cache_ttl)?,
            agent_rate_per_s: positive("agent_rate_per_s", raw.agent_rate_per_s)?,
            action_rate_per_s: positive("action_rate_per_s", raw.action_rate_per_s)?,
            mcp_allowed_origins: parse_origins(&raw.mcp_allowed_origins)?,
            public_url,
            mcp_authorization_servers,
            sqlite_writer_nice: raw.sqlite_writer_nice,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are valid by construction; a failure here is a bug caught by the tests.
        Self::from_raw(RawConfig::default()).expect("built-in defaults are valid")
    }
}

fn parse_origins(list: &str) -> Result<Vec<String>, ConfigError> {
    comma_list(
        list,
        "mcp_allowed_origins",
        "an origin like https://app.example.com",
        normalize_origin,
    )
}

/// The non-empty items of a comma-separated `list`, each as `parse` gives it; an item it refuses
/// is an error of `field` saying the item is not `what`. A blank list is none; one of commas
/// only is a mistake, not a way to say none.
fn comma_list(
    list: &str,
    field: &'static str,
    what: &str,
    parse: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    let items = list
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            parse(item).ok_or_else(|| ConfigError::Invalid {
                field,
                message: format!("`{item}` is not {what}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if items.is_empty() && !list.trim().is_empty() {
        return Err(ConfigError::Invalid {
            field,
            message: format!("`{list}` names nothing; leave it unset for none"),
        });
    }
    Ok(items)
}

/// `text` as an https URL (or http on a loopback host, for local trials), as OAuth 2.1 asks of
/// every party to a token.
fn secure_url(text: &str) -> Option<reqwest::Url> {
    plain_http_url(text).filter(|url| {
        url.scheme() == "https" || matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
    })
}

/// Comma-separated issuer URLs, kept as written (an issuer identifier is compared character for
/// character): https, or http on a loopback host for local trials, as OAuth 2.1 asks.
fn parse_authorization_servers(list: &str) -> Result<Vec<String>, ConfigError> {
    comma_list(
        list,
        "mcp_authorization_servers",
        "an https URL like https://login.example.com",
        |text| secure_url(text).map(|_| text.to_string()),
    )
}

fn positive(field: &'static str, n: u32) -> Result<u32, ConfigError> {
    if n == 0 {
        return Err(ConfigError::Invalid {
            field,
            message: "must be at least 1".into(),
        });
    }
    Ok(n)
}

/// Parses `5s`, `30m`, `2h`, `30d`, `6h24m55s` or `250ms`.
pub fn parse_duration(field: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| ConfigError::Invalid {
        field,
        message: format!("`{text}` is not a duration like 5s, 30m or 2h ({e})"),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            field,
            message: "must be longer than zero".into(),
        });
    }
    Ok(d)
}

/// Parses a comma-separated retry schedule; at most 24 hours and 50 steps in all.
pub fn parse_schedule(text: &str) -> Result<Vec<Duration>, ConfigError> {
    let steps = text
        .split(',')
        .map(|s| parse_duration("retry_schedule", s))
        .collect::<Result<Vec<_>, _>>()?;
    let total: Duration = steps.iter().sum();
    if steps.len() > 50 || total > Duration::from_secs(24 * 3600) {
        return Err(ConfigError::Invalid {
            field: "retry_schedule",
            message: "may have at most 50 steps spanning at most 24 hours".into(),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_spans_exactly_24_hours() {
        let steps = parse_schedule(DEFAULT_RETRY_SCHEDULE).unwrap();
        assert_eq!(steps.iter().sum::<Duration>(), Duration::from_secs(24 * 3600));
        assert_eq!(steps[0], Duration::from_secs(5));
    }

    #[test]
    fn nonsense_is_refused_with_the_field_named() {
        let raw = RawConfig {
            retry_schedule: "5s,soon".into(),
            ..RawConfig::default()
        };
        let err = Config::from_raw(raw).unwrap_err().to_string();
        assert!(err.contains("retry_schedule"), "{err}");
        let raw = RawConfig {
            listen: "nowhere".into(),
            ..RawConfig::default()
        };
        assert!(Config::from_raw(raw).is_err());
    }

    #[test]
    fn allowed_origins_are_kept_as_browsers_send_them() {
        let raw = RawConfig {
            mcp_allowed_origins: " https://App.Example.com:443/ , http://localhost:6274".into(),
            ..RawConfig::default()
        };
        let config = Config::from_raw(raw).unwrap();
        assert_eq!(
            config.mcp_allowed_origins,
            ["https://app.example.com", "http://localhost:6274"]
        );
        for refused in [
            "app.example.com",
            "https://a.example.com/path",
            "null",
            "ftp://a.example.com",
            "https://:pw@a.example.com",
        ] {
            let raw = RawConfig {
                mcp_allowed_origins: refused.into(),
                ..RawConfig::default()
            };
            let err = Config::from_raw(raw).unwrap_err().to_string();
            assert!(err.contains("mcp_allowed_origins"), "{refused}: {err}");
        }
    }

    #[test]
    fn urls_for_the_mcp_resource_metadata_are_checked() {
        let raw = RawConfig {
            public_url: " https://Gateway.Example.com/opsiq/ ".into(),
            mcp_authorization_servers: "https://tenant.auth0.example/, http://localhost:9000".into(),
            ..RawConfig::default()
        };
        let config = Config::from_raw(raw).unwrap();
        assert_eq!(
            config.public_url.as_deref(),
            Some("https://gateway.example.com/opsiq")
        );
        assert_eq!(
            config.mcp_authorization_servers,
            ["https://tenant.auth0.example/", "http://localhost:9000"]
        );
        assert_eq!(Config::default().public_url, None);
        assert!(Config::default().mcp_authorization_servers.is_empty());
        let refused = |public_url: &str, servers: &str| {
            let raw = RawConfig {
                public_url: public_url.into(),
                mcp_authorization_servers: servers.into(),
                ..RawConfig::default()
            };
            Config::from_raw(raw).unwrap_err().to_string()
        };
        for bad in [
            "gateway.example.com",
            "ftp://gateway.example.com",
            "https://gateway.example.com/?x=1",
            "https://gateway.example.com/#top",
            "https://user:pw@gateway.example.com",
        ] {
            assert!(refused(bad, "").contains("public_url"), "{bad}");
            let server = refused("https://gateway.example.com", bad);
            assert!(server.contains("mcp_authorization_servers"), "{bad}: {server}");
        }
        // Tokens from a server reached in the clear could be read on the way.
        let err = refused("https://gateway.example.com", "http://login.example.com");
        assert!(err.contains("mcp_authorization_servers"), "{err}");
        assert!(refused("http://gateway.example.com", "").contains("public_url"));
        // The metadata must name the URL clients use, which a request cannot be trusted to say.
        let err = refused("", "https://login.example.com");
        assert!(err.contains("needs public_url"), "{err}");
        // Commas alone name nothing, and are not taken for an unset list.
        let err = refused("https://gateway.example.com", " , ");
        assert!(
            err.contains("mcp_authorization_servers") && err.contains("names nothing"),
            "{err}"
        );
    }
}
