//! `web_fetch`: http(s) only, size and time caps, and no connection to an address in the deny
//! set (loopback, private, link-local — cloud metadata included —, unique-local, shared,
//! unspecified, multicast, reserved, IPv4-mapped and other IPv6 forms that carry an IPv4
//! address) unless the runner's allow-list names it.
//!
//! Every hop is checked the same way: the host is resolved here, every address checked, and
//! the connection pinned to the checked addresses (`resolve_to_addrs`), so a DNS answer that
//! changes between the check and the connect (rebinding) is never used. Redirects are followed
//! by hand, each target checked like the first. IP literals in any form the URL standard
//! accepts (`2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) are parsed to addresses first.
//! No proxy from the environment is used.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{html, Policy, ToolError, WebFetchInput};

const MAX_REDIRECTS: usize = 5;
const USER_AGENT: &str = concat!("sluice-runner/", env!("CARGO_PKG_VERSION"), " (web_fetch)");

/// Runs a fetch on a small runtime of its own (the confined child has none).
pub fn fetch_blocking(input: &WebFetchInput, policy: &Policy) -> Result<Value, ToolError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ToolError::new("fetch_failed", format!("cannot start a runtime: {e}")))?;
    runtime.block_on(fetch(input, policy))
}

/// A network allowed despite the deny set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// `10.0.0.0/8`, `127.0.0.1` (a single address), `fd00::/8`.
    pub fn parse(text: &str) -> Result<Network, String> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a bad prefix length"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why an address is in the deny set, or `None` when it is a public address.
pub fn denied(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => denied_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.to_ipv4_mapped().is_some() {
                Some("IPv4-mapped")
            } else if segments[..6] == [0; 6] {
                Some("IPv4-compatible")
            } else if segments[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if segments[0] & 0xffc0 == 0xfe80 || segments[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else if segments[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if segments[..2] == [0x64, 0xff9b] || segments[..2] == [0x2001, 0] {
                Some("translated IPv4 (NAT64/Teredo)")
            } else if segments[0] == 0x2002 {
                // 6to4 carries an IPv4 address in bits 16..48.
                let embedded = Ipv4Addr::new(
                    (segments[1] >> 8) as u8,
                    segments[1] as u8,
                    (segments[2] >> 8) as u8,
                    segments[2] as u8,
                );
                denied_v4(embedded).map(|_| "6to4 of a denied IPv4 address")
            } else if segments[..2] == [0x2001, 0xdb8] {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn denied_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_private() {
        Some("private")
    } else if a == 169 && b == 254 {
        Some("link-local (cloud metadata)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared address space")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignments")
    } else if (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        Some("documentation")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if a >= 224 {
        Some("multicast or reserved")
    } else {
        None
    }
}

/// Checks one address against the deny set and the allow-list.
pub fn check(ip: IpAddr, allow: &[Network]) -> Result<(), ToolError> {
    match denied(ip) {
        Some(_) if allow.iter().any(|n| n.contains(ip)) => Ok(()),
        Some(reason) => Err(ToolError::new(
            "address_refused",
            format!("{ip} is a {reason} address; web_fetch does not connect there"),
        )),
        None => Ok(()),
    }
}

/// The addresses a URL's host stands for, every one checked; an error if any is refused.
async fn addresses(url: &url::Url, allow: &[Network]) -> Result<Vec<SocketAddr>, ToolError> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| ToolError::new("invalid_url", "the URL has no port"))?;
    let ips: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(domain)) => tokio::net::lookup_host((domain, port))
            .await
            .map_err(|e| {
                ToolError::new("dns_failed", format!("cannot resolve {domain:?}: {e}")).retryable()
            })?
            .map(|addr| addr.ip())
            .collect(),
        None => return Err(ToolError::new("invalid_url", "the URL has no host")),
    };
    if ips.is_empty() {
        return Err(ToolError::new("dns_failed", "the host has no addresses").retryable());
    }
    // One refused address refuses the host: a mixed answer is how rebinding starts.
    for ip in &ips {
        check(*ip, allow)?;
    }
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

fn parse_url(text: &str) -> Result<url::Url, ToolError> {
    let url = url::Url::parse(text).map_err(|e| ToolError::new("invalid_url", format!("{e}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(ToolError::new(
                "unsupported_scheme",
                format!("only http and https are fetched, not {other:?}"),
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ToolError::new(
            "invalid_url",
            "URLs with credentials are refused",
        ));
    }
    Ok(url)
}

/// One response, its body read up to the cap.
struct Response {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
    truncated: bool,
}

/// Fetches the URL, following up to five redirects, each checked.
pub async fn fetch(input: &WebFetchInput, policy: &Policy) -> Result<Value, ToolError> {
    let allow = policy
        .fetch_allow
        .iter()
        .map(|n| Network::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ToolError::new("invalid_policy", e))?;
    let max_bytes = input
        .max_bytes
        .unwrap_or(policy.fetch_max_bytes)
        .clamp(1, policy.fetch_max_bytes) as usize;
    let timeout = Duration::from_millis(
        input
            .timeout_ms
            .unwrap_or(policy.fetch_timeout_ms)
            .clamp(1, policy.fetch_timeout_ms),
    );
    let started = Instant::now();
    let mut url = parse_url(&input.url)?;
    let mut redirects = Vec::new();
    loop {
        let remaining = timeout
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        let response = tokio::time::timeout(remaining, async {
            let addrs = addresses(&url, &allow).await?;
            get(&url, &addrs, max_bytes).await
        })
        .await
        .map_err(|_| timed_out())??;
        let header = |name: hyper::header::HeaderName| {
            response
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if (300..400).contains(&response.status) {
            if let Some(location) = header(hyper::header::LOCATION) {
                if redirects.len() >= MAX_REDIRECTS {
                    return Err(ToolError::new(
                        "too_many_redirects",
                        format!("more than {MAX_REDIRECTS} redirects"),
                    ));
                }
                let next = url
                    .join(&location)
                    .map_err(|e| ToolError::new("invalid_url", format!("bad redirect: {e}")))?;
                redirects.push(next.to_string());
                url = parse_url(next.as_str())?;
                continue;
            }
        }
        let content_type = header(hyper::header::CONTENT_TYPE);
        let raw = String::from_utf8_lossy(&response.body);
        let text = if content_type.as_deref().is_some_and(|t| t.contains("html")) {
            html::to_text(&raw)
        } else {
            raw.into_owned()
        };
        return Ok(json!({
            "url": url.as_str(),
            "status": response.status,
            "content_type": content_type,
            "headers": {
                "content-length": header(hyper::header::CONTENT_LENGTH),
                "last-modified": header(hyper::header::LAST_MODIFIED),
            },
            "redirects": redirects,
            "text": text,
            "bytes": response.body.len(),
            "truncated": response.truncated,
        }));
    }
}

/// Connects to the first reachable checked address — never to anything resolved later — and
/// makes one HTTP/1.1 GET over it (TLS with the host's name for https).
async fn get(
    url: &url::Url,
    addrs: &[SocketAddr],
    max_bytes: usize,
) -> Result<Response, ToolError> {
    let mut last_err = None;
    let mut stream = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => {
                stream = Some(tcp);
                break;
            }
            Err(err) => last_err = Some(err),
        }
    }
    let Some(tcp) = stream else {
        let why = last_err.map(|e| e.to_string()).unwrap_or_default();
        return Err(ToolError::new(
            "connect_failed",
            format!("cannot connect to the host: {why}"),
        )
        .retryable());
    };
    let host = url.host_str().unwrap_or_default();
    let host_header = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let request = hyper::Request::get(if target.is_empty() { "/" } else { target })
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::USER_AGENT, USER_AGENT)
        .header(
            hyper::header::ACCEPT,
            "text/html,text/plain,application/json,*/*;q=0.5",
        )
        .header(hyper::header::ACCEPT_ENCODING, "identity")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| ToolError::new("invalid_url", e.to_string()))?;
    if url.scheme() == "https" {
        let name = match url.host() {
            Some(url::Host::Domain(d)) => rustls::pki_types::ServerName::try_from(d.to_string())
                .map_err(|e| ToolError::new("invalid_url", e.to_string()))?,
            Some(url::Host::Ipv4(ip)) => rustls::pki_types::ServerName::from(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => rustls::pki_types::ServerName::from(IpAddr::V6(ip)),
            None => return Err(ToolError::new("invalid_url", "the URL has no host")),
        };
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                ToolError::new("tls_failed", format!("TLS handshake failed: {e}")).retryable()
            })?;
        exchange(hyper_util::rt::TokioIo::new(tls), request, max_bytes).await
    } else {
        exchange(hyper_util::rt::TokioIo::new(tcp), request, max_bytes).await
    }
}

async fn exchange<T>(
    io: T,
    request: hyper::Request<http_body_util::Empty<hyper::body::Bytes>>,
    max_bytes: usize,
) -> Result<Response, ToolError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_error)?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status().as_u16();
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(http_error)?;
        if let Ok(data) = frame.into_data() {
            let room = max_bytes.saturating_sub(bytes.len());
            bytes.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                truncated = true;
                break;
            }
        }
    }
    driver.abort();
    Ok(Response {
        status,
        headers: parts.headers,
        body: bytes,
        truncated,
    })
}

/// rustls with the ring provider and the Mozilla roots compiled in (no system files needed).
pub(crate) fn tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, ToolError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ToolError::new("tls_failed", e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

fn timed_out() -> ToolError {
    ToolError::new("fetch_timed_out", "the fetch took longer than its time cap").retryable()
}

fn http_error(err: hyper::Error) -> ToolError {
    ToolError::new("fetch_failed", format!("HTTP exchange failed: {err}")).retryable()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_set_covers_every_form() {
        for text in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "192.0.2.1",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert!(denied(ip).is_some(), "{text} must be denied");
        }
        for text in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert!(denied(ip).is_none(), "{text} must be allowed");
        }
    }

    #[test]
    fn the_allow_list_opens_only_what_it_names() {
        let allow = [
            Network::parse("127.0.0.1/32").unwrap(),
            Network::parse("fd00::/8").unwrap(),
        ];
        assert!(check("127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(check("127.0.0.2".parse().unwrap(), &allow).is_err());
        assert!(check("fd00::5".parse().unwrap(), &allow).is_ok());
        assert!(check("::ffff:127.0.0.1".parse().unwrap(), &allow).is_err());
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("nonsense").is_err());
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("9.9.9.9".parse().unwrap()));
    }

    #[test]
    fn url_forms_of_loopback_parse_to_loopback() {
        for text in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://[::ffff:7f00:1]/",
            "http://127.1/",
        ] {
            let url = parse_url(text).unwrap();
            let ip = match url.host() {
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
                other => panic!("{text}: {other:?}"),
            };
            assert!(denied(ip).is_some(), "{text}");
        }
        assert_eq!(
            parse_url("file:///etc/passwd").unwrap_err().code,
            "unsupported_scheme"
        );
        assert_eq!(
            parse_url("gopher://x/").unwrap_err().code,
            "unsupported_scheme"
        );
        assert_eq!(
            parse_url("http://u:p@example.com/").unwrap_err().code,
            "invalid_url"
        );
        assert_eq!(parse_url("not a url").unwrap_err().code, "invalid_url");
    }
}
