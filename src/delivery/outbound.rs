//! The one place that sends HTTP to customers. Every outbound request goes through [`Outbound`]:
//! no redirects followed, no system proxy, connect and total timeouts, at most 64 KiB of the
//! response read, connection reuse, and — unless `--dev` — an SSRF guard that refuses private,
//! loopback, link-local, CGNAT, multicast, documentation and metadata addresses, both for IP
//! literals in the URL and for every address DNS answers. The check happens in the resolver that
//! the connection uses, so a name that re-resolves to a private address (DNS rebinding) fails too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The most of a response body that is read and kept.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Answers whether delivering to `ip` is refused by the SSRF guard.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, including the cloud metadata address
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let seg = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated, still routed by some)
        || (seg[0] == 0x2001 && seg[1] == 0) // Teredo 2001::/32 tunnels to obfuscated IPv4
        || (seg[0] == 0x0064 && seg[1] == 0xff9b && seg[2] == 1) // local-use NAT64 64:ff9b:1::/48
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x0100 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0) // discard 100::/64
        // NAT64 and 6to4 embed an IPv4 address that may be private.
        || (seg[0] == 0x0064 && seg[1] == 0xff9b && forbidden_v4(Ipv4Addr::new(
            (seg[6] >> 8) as u8, seg[6] as u8, (seg[7] >> 8) as u8, seg[7] as u8)))
        || (seg[0] == 0x2002 && forbidden_v4(Ipv4Addr::new(
            (seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8)))
        // IPv4-compatible ::a.b.c.d (deprecated but still routed by some stacks) and
        // IPv4-translated ::ffff:0:a.b.c.d (SIIT)
        || ((seg[..6].iter().all(|s| *s == 0)
            || (seg[..4].iter().all(|s| *s == 0) && seg[4] == 0xffff && seg[5] == 0))
            && forbidden_v4(Ipv4Addr::new(
                (seg[6] >> 8) as u8, seg[6] as u8, (seg[7] >> 8) as u8, seg[7] as u8)))
}

/// Refusal by the SSRF guard; found in the error chain to classify the attempt.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} resolves only to addresses that deliveries may not reach (private, loopback, link-local or reserved)"
)]
pub struct BlockedAddress {
    host: String,
}

/// A DNS resolver that drops forbidden addresses and fails when none is left.
#[derive(Debug, Clone, Copy)]
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed: Vec<SocketAddr> = addrs.filter(|a| !is_forbidden(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(BlockedAddress { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Checks what can be checked about a URL before any connection: scheme, credentials, and IP
/// literals (which bypass the resolver). With `allow_private`, only the scheme is checked.
pub fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials".into());
    }
    let Some(host) = url.host() else {
        return Err("must have a host".into());
    };
    if allow_private {
        return Ok(());
    }
    let literal = match host {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                return Err(
                    "points at localhost, which deliveries may not reach (use --dev for local testing)"
                        .into(),
                );
            }
            None
        }
    };
    match literal {
        Some(ip) if is_forbidden(ip) => Err(format!(
            "points at {ip}, a private, loopback or reserved address that deliveries may not reach (use --dev for local testing)"
        )),
        _ => Ok(()),
    }
}

/// What one attempt got back.
#[derive(Debug, Clone, Default)]
pub struct AttemptResult {
    /// The response status, if a response arrived.
    pub status: Option<u16>,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// The response body, at most 64 KiB, as text (lossy).
    pub body: String,
    /// `blocked_address`, `timeout`, `connect`, `dns`, `invalid_url` or `request` when no response arrived.
    pub error_class: Option<&'static str>,
    /// A sentence about the failure.
    pub error_message: Option<String>,
    /// How long the attempt took.
    pub duration: Duration,
    /// `Retry-After` of a 429/503, in seconds.
    pub retry_after: Option<Duration>,
}

impl AttemptResult {
    /// A 2xx answer.
    pub fn is_success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The outbound HTTP client, shared by every delivery.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    allow_private: bool,
}

impl Outbound {
    /// Builds the client; `allow_private` lifts the SSRF guard (`--dev`).
    pub fn new(connect_timeout: Duration, request_timeout: Duration, allow_private: bool) -> Self {
        crate::crypto::install_tls_provider();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .tcp_nodelay(true)
            // hyper's default of 100 would turn a 2xx with more headers into a failed attempt,
            // sent again; what is kept of them is capped below.
            .http1_max_headers(1024)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256);
        if !allow_private {
            builder = builder.dns_resolver(GuardedResolver);
        }
        let client = builder
            .build()
            .expect("the outbound HTTP client configuration is valid");
        Self {
            client,
            allow_private,
        }
    }

    /// Whether the SSRF guard is lifted.
    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// GETs `url` (a JWKS document, say) under the same guard and limits.
    pub async fn get(&self, url: &str) -> AttemptResult {
        let started = Instant::now();
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return failure("invalid_url", e.to_string()),
        };
        if let Err(message) = check_url(&parsed, self.allow_private) {
            return failure("blocked_address", format!("the URL {message}"));
        }
        let mut result = match self.client.get(parsed).send().await {
            Ok(resp) => read_response(resp).await,
            Err(e) => classify(&e),
        };
        result.duration = started.elapsed();
        result
    }

    /// POSTs `body` with `headers` to `url` (parsed once by the caller, or why it does not
    /// parse) and reports what happened; never fails.
    pub async fn post(
        &self,
        url: &Result<reqwest::Url, String>,
        headers: &[(&'static str, String)],
        body: bytes::Bytes,
    ) -> AttemptResult {
        let started = Instant::now();
        let mut result = self.post_inner(url, headers, body).await;
        result.duration = started.elapsed();
        result
    }

    async fn post_inner(
        &self,
        url: &Result<reqwest::Url, String>,
        headers: &[(&'static str, String)],
        body: bytes::Bytes,
    ) -> AttemptResult {
        let parsed = match url {
            Ok(u) => u,
            Err(e) => return failure("invalid_url", e.clone()),
        };
        if let Err(message) = check_url(parsed, self.allow_private) {
            return failure("blocked_address", format!("the URL {message}"));
        }
        let mut req = self.client.post(parsed.clone());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        match req.body(body).send().await {
            Ok(resp) => read_response(resp).await,
            Err(e) => classify(&e),
        }
    }
}

/// Reads status, headers and at most [`MAX_RESPONSE_BYTES`] of the body.
async fn read_response(mut resp: reqwest::Response) -> AttemptResult {
    {
        let status = resp.status().as_u16();
        // Kept up to the same size as the body: headers past it are left out of the log.
        let mut kept = 0;
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .take_while(|(k, v)| {
                kept += k.as_str().len() + v.len();
                kept <= MAX_RESPONSE_BYTES
            })
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_RESPONSE_BYTES - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= MAX_RESPONSE_BYTES {
                        drop_cut_character(&mut body);
                        break;
                    }
                }
                Ok(None) => break,
                // The status already arrived; a body cut short does not change the outcome.
                Err(_) => break,
            }
        }
        AttemptResult {
            status: Some(status),
            headers,
            body: storable_text(&body),
            retry_after,
            ..AttemptResult::default()
        }
    }
}

/// An endpoint's answer as text the delivery log can keep on every database: invalid UTF-8 and
/// NUL characters (which PostgreSQL's text cannot hold, failing the outcome's write and so
/// sending the delivery again at each lease) become U+FFFD.
fn storable_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.into_owned()
    }
}

/// The headers the HTTP client adds to every delivery beside the signed ones, as it sends them,
/// so that the delivery log and previews show the whole request.
pub fn transport_headers(url: &reqwest::Url, body_len: usize) -> [(&'static str, String); 3] {
    // The port only when it is not the scheme's default, as `Url::port` answers it.
    let host = url.host_str().unwrap_or_default();
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    [
        ("host", host),
        ("content-length", body_len.to_string()),
        ("accept", "*/*".to_string()),
    ]
}

/// Drops the UTF-8 sequence the size limit cut in two, if it cut one, so that the text kept
/// ends on a whole character instead of a replacement character.
fn drop_cut_character(body: &mut Vec<u8>) {
    let len = body.len();
    for back in 1..=len.min(4) {
        let byte = body[len - back];
        if byte & 0xC0 != 0x80 {
            // The first byte of the last sequence says how long it should be.
            let whole = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            if whole > back {
                body.truncate(len - back);
            }
            return;
        }
    }
}

fn failure(class: &'static str, message: String) -> AttemptResult {
    AttemptResult {
        error_class: Some(class),
        error_message: Some(message),
        ..AttemptResult::default()
    }
}

fn classify(e: &reqwest::Error) -> AttemptResult {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(blocked) = err.downcast_ref::<BlockedAddress>() {
            return failure("blocked_address", blocked.to_string());
        }
        source = err.source();
    }
    let class = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    // The full chain names the cause (refused, reset, DNS failure) without exposing anything secret.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        message.push_str(": ");
        message.push_str(&err.to_string());
        source = err.source();
    }
    failure(class, message)
}

/// Parses `Retry-After` as seconds or an HTTP date in any of the three forms RFC 9110 §5.6.7
/// asks a recipient to accept. A number too large to hold means "as late as allowed".
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_by_the_limit_is_dropped_whole() {
        for (text, cut_at, kept) in [
            ("aé", 2, "a"),
            ("a€", 3, "a"),
            ("a😀", 4, "a"),
            ("aé", 3, "aé"),
            ("ab", 2, "ab"),
        ] {
            let mut body = text.as_bytes()[..cut_at].to_vec();
            drop_cut_character(&mut body);
            assert_eq!(String::from_utf8(body).unwrap(), kept, "{text} cut at {cut_at}");
        }
        let mut empty = Vec::new();
        drop_cut_character(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn ssrf_table() {
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
            "fec0::1",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "64:ff9b:1::808:808",
        ] {
            assert!(is_forbidden(bad.parse().unwrap()), "{bad} must be refused");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "::ffff:0:808:808",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_forbidden(good.parse().unwrap()), "{good} must be allowed");
        }
    }

    #[test]
    fn url_checks() {
        let check = |u: &str, dev: bool| check_url(&reqwest::Url::parse(u).unwrap(), dev);
        assert!(check("http://127.0.0.1:8080/h", false).is_err());
        assert!(check("http://[::1]/h", false).is_err());
        assert!(check("http://localhost/h", false).is_err());
        assert!(check("http://LOCALHOST./h", false).is_err());
        assert!(
            check("http://0x7f000001/h", false).is_err(),
            "hex IPv4 literals normalise to 127.0.0.1"
        );
        assert!(
            check("http://2130706433/h", false).is_err(),
            "decimal IPv4 literals too"
        );
        assert!(check("ftp://example.com/h", false).is_err());
        assert!(check("https://user:pw@example.com/h", false).is_err());
        assert!(check("https://example.com/h?x=1", false).is_ok());
        assert!(check("http://127.0.0.1:8080/h", true).is_ok());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT").is_some());
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-5"), None);
        assert_eq!(parse_retry_after(""), None);
        let max = Some(Duration::from_secs(u64::MAX));
        assert_eq!(
            parse_retry_after("99999999999999999999"),
            max,
            "too large to hold"
        );
        // IMF-fixdate, the obsolete RFC 850 form and asctime, an hour ahead.
        let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
        let fixdate = httpdate::fmt_http_date(ahead);
        let parsed: time::OffsetDateTime = ahead.into();
        let rfc850 = parsed
            .format(time::macros::format_description!(
                "[weekday], [day]-[month repr:short]-[year repr:last_two] [hour]:[minute]:[second] GMT"
            ))
            .unwrap();
        let asctime = parsed
            .format(time::macros::format_description!(
                "[weekday repr:short] [month repr:short] [day padding:space] [hour]:[minute]:[second] [year]"
            ))
            .unwrap();
        for form in [fixdate, rfc850, asctime] {
            let wait = parse_retry_after(&form).unwrap_or_else(|| panic!("{form}"));
            assert!((3590..=3600).contains(&wait.as_secs()), "{form}: {wait:?}");
        }
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a past date"
        );
    }
}
