//! Push delivery's I/O: one worker per push endpoint takes messages from its source with
//! `receive` (so the source's flow control applies: dispatch rate, per-key concurrency,
//! fairness, priorities, adaptive throttling), POSTs them signed (Standard Webhooks), and
//! settles them by the reply (`tidewater_core::push::settlement`), within the endpoint's
//! concurrency and behind its circuit breaker. What the replies mean and when the breaker
//! opens is sans-IO, in `tidewater_core::push`; this is the HTTP client around it.
//!
//! SSRF: every address a URL's host resolves to (and an address written in the URL) is
//! checked: loopback, private, link-local (cloud metadata), shared, unspecified and
//! multicast addresses are refused unless `[push] allow_private` or the host or its
//! address is in `[push] allow`. The check is in the resolver the client connects with,
//! so a name that changes its answer after the endpoint was made is checked again.
//! Redirects are not followed (a 3xx is a failed delivery).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tidewater_auth::webhook::{Scheme, keys, sign_standard};
use tidewater_core::push::{
    Allow, BreakerState, MAX_PUSH_CONCURRENCY, Outcome, PushConfig, PushFormat, Settlement,
    settlement,
};
use tidewater_core::queue::Delivery;
use tidewater_core::{Broker, NackReason, PushHandle};
use tokio::sync::{Semaphore, watch};

use crate::metrics::Metrics;

/// `[push]` in the configuration file (docs/configuration.md, docs/edges.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// Let endpoints reach loopback, private, link-local and other non-public addresses.
    pub allow_private: bool,
    /// Hosts (exact names) and addresses or networks (`10.1.2.3`, `10.0.0.0/8`) endpoints
    /// may reach even when they are not public.
    pub allow: Vec<String>,
    /// PEM certificates trusted besides the public roots (an internal CA).
    pub ca_file: Option<PathBuf>,
}

/// An entry of `[push] allow`.
#[derive(Debug, Clone)]
enum Allowed {
    Host(String),
    Net(IpAddr, u8),
}

#[derive(Debug)]
struct Policy {
    allow_private: bool,
    allow: Vec<Allowed>,
}

impl PushSettings {
    /// Checks the settings at start (before the data is opened).
    pub fn check(&self) -> anyhow::Result<()> {
        self.policy()?;
        tls_config(self)?;
        Ok(())
    }

    fn policy(&self) -> anyhow::Result<Policy> {
        let mut allow = Vec::new();
        for entry in &self.allow {
            let (addr, bits) = match entry.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (entry.as_str(), None),
            };
            match addr.parse::<IpAddr>() {
                Ok(ip) => {
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    let bits = match bits {
                        Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| {
                            anyhow::anyhow!("[push] allow: '{entry}' has a bad prefix length")
                        })?,
                        None => max,
                    };
                    allow.push(Allowed::Net(ip, bits));
                }
                Err(_) if bits.is_none() && !entry.is_empty() => {
                    allow.push(Allowed::Host(entry.to_ascii_lowercase()))
                }
                Err(_) => anyhow::bail!(
                    "[push] allow: '{entry}' is neither a host name nor an address or network"
                ),
            }
        }
        Ok(Policy {
            allow_private: self.allow_private,
            allow,
        })
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether an address is public: not loopback, private, link-local, shared, unspecified,
/// documentation, benchmarking, broadcast or multicast.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let embedded = |a: u16, b: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (a >> 8) as u8,
                    a as u8,
                    (b >> 8) as u8,
                    b as u8,
                ))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            // IPv4 inside IPv6: compatible (::a.b.c.d), NAT64 (64:ff9b::/96), 6to4 (2002::/16).
            if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(segments[6], segments[7]));
            }
            if segments[0] == 0x2002 {
                return is_public(embedded(segments[1], segments[2]));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0xdb8) // documentation
        }
    }
}

impl Policy {
    /// An address the URL names itself is connected to without asking the resolver: check
    /// it here, as the client will read it (the URL parser turns `2130706433`, `0x7f.1` or
    /// `127.1` into 127.0.0.1).
    fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| format!("the URL does not parse: {e}"))?;
        let host = parsed.host_str().ok_or("the URL has no host")?;
        // Addresses come out of the parser normalized: dotted IPv4, bracketed IPv6.
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(()); // a name: the resolver checks what it resolves to
        };
        if self.allows(&ip.to_string(), ip) {
            return Ok(());
        }
        Err(format!(
            "{ip} is not a public address: refused ([push] allow_private or allow)"
        ))
    }

    fn allows(&self, host: &str, ip: IpAddr) -> bool {
        self.allow_private
            || is_public(ip)
            || self.allow.iter().any(|a| match a {
                Allowed::Host(h) => h == host,
                Allowed::Net(net, bits) => in_net(ip, *net, *bits),
            })
    }
}

/// The client's resolver: the system's answers, less the addresses the policy refuses.
struct CheckedResolver(Arc<Policy>);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.allows(&host, a.ip()))
                .collect();
            if allowed.is_empty() && !found.is_empty() {
                return Err(format!(
                    "{host} resolves only to non-public addresses ({}): refused ([push] allow_private or allow)",
                    found[0].ip()
                )
                .into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn tls_config(settings: &PushSettings) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("[push] ca_file {}: {e}", path.display()))?;
        for cert in rustls_pemfile_certs(&pem)? {
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("[push] ca_file {}: {e}", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not PEM certificates: {e}"))
}

/// What the workers share: the broker, the TLS configuration, the address policy,
/// metrics. Each worker has an HTTP client of its own (its connect timeout, its pool).
pub struct Pusher {
    broker: Broker,
    tls: rustls::ClientConfig,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
}

impl Pusher {
    pub fn new(
        broker: Broker,
        settings: &PushSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Pusher>> {
        Ok(Arc::new(Pusher {
            broker,
            tls: tls_config(settings)?,
            policy: Arc::new(settings.policy()?),
            metrics,
        }))
    }

    /// An endpoint's client: TLS ours, DNS answers checked, no redirects, no proxy.
    fn client(&self, connect_timeout_ms: u64) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(self.tls.clone())
            .dns_resolver(CheckedResolver(self.policy.clone()))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("tidewater/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_millis(connect_timeout_ms))
            .pool_max_idle_per_host(MAX_PUSH_CONCURRENCY as usize)
            .build()
            .expect("a client of a checked TLS configuration builds")
    }

    /// Runs a worker per endpoint until `stop`: started when an endpoint is made, ended
    /// when it is deleted.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            workers.retain(|_, w| !w.is_finished());
            for push in self.broker.push_handles() {
                if !workers.contains_key(&push.name) {
                    let name = push.name.clone();
                    let worker = tokio::spawn(self.clone().worker(push, stop.clone()));
                    workers.insert(name, worker);
                }
            }
            tokio::select! {
                _ = self.broker.pushes_changed() => {}
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        for (_, worker) in workers {
            let _ = worker.await;
        }
    }

    async fn worker(self: Arc<Self>, push: Arc<PushHandle>, mut stop: watch::Receiver<bool>) {
        let mut config = push.config();
        let mut client = self.client(config.connect_timeout_ms);
        let mut permits = Arc::new(Semaphore::new(config.concurrency as usize));
        let mut missing_logged = false;
        // The host only: a URL's path or query may hold a token (Slack's incoming webhooks).
        let host = tidewater_core::push::parse_url(&config.url)
            .map(|(_, host, port)| format!("{host}:{port}"))
            .unwrap_or_default();
        tracing::info!(push = %push.name, source = %config.source.name(), host = %host, "push endpoint started");
        loop {
            if push.is_deleted() || *stop.borrow() {
                break;
            }
            let current = push.config();
            if current != config {
                if current.concurrency != config.concurrency {
                    // Requests in flight keep their permits of the old semaphore.
                    permits = Arc::new(Semaphore::new(current.concurrency as usize));
                }
                if current.connect_timeout_ms != config.connect_timeout_ms {
                    client = self.client(current.connect_timeout_ms);
                }
                config = current;
            }
            let now = self.broker.now_ms();
            // While the breaker is not closed, held messages go first as probes: new ones
            // stay in the queue.
            if push
                .counters
                .held
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
                && push.breaker.lock().state(now) != BreakerState::Closed
            {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let allow = push.breaker.lock().allow(now);
            let probe = match allow {
                Allow::Yes => false,
                Allow::Probe => true,
                Allow::Until(at) => {
                    let wait = Duration::from_millis(u64::try_from(at - now).unwrap_or(0).max(1));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = push.changed.notified() => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                _ = push.changed.notified() => {
                    self.give_back_probe(&push, probe);
                    continue;
                }
                _ = stop.changed() => {
                    self.give_back_probe(&push, probe);
                    continue;
                }
            };
            let source = config.source.name().to_string();
            let lease_ms = config.timeout_ms + 10_000;
            let received = tokio::select! {
                got = self.broker.receive_as(
                    tidewater_core::forecast::consumer_id(format!("push:{}", push.name).as_bytes()),
                    &source, config.batch as usize, 1_000, Some(lease_ms)) => got,
                _ = push.changed.notified() => Ok(Vec::new()),
                _ = stop.changed() => Ok(Vec::new()),
            };
            if push.is_deleted()
                && let Ok(deliveries) = &received
                && !deliveries.is_empty()
            {
                let receipts: Vec<&str> = deliveries.iter().map(|d| d.receipt.as_str()).collect();
                let _ = self
                    .broker
                    .nack(
                        &source,
                        &receipts,
                        Some(0),
                        Some("push: endpoint deleted"),
                        NackReason::Failed,
                    )
                    .await;
                break;
            }
            let deliveries = match received {
                Ok(d) => {
                    missing_logged = false;
                    d
                }
                Err(err) => {
                    if !missing_logged {
                        tracing::warn!(push = %push.name, source = %source, error = %err, "push endpoint cannot receive from its source; trying every second");
                        missing_logged = true;
                    }
                    self.give_back_probe(&push, probe);
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = push.changed.notified() => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            if deliveries.is_empty() {
                self.give_back_probe(&push, probe);
                continue;
            }
            let this = self.clone();
            let (push, config, client) = (push.clone(), config.clone(), client.clone());
            tokio::spawn(async move {
                this.deliver(&client, &push, &config, deliveries, probe)
                    .await;
                drop(permit);
            });
        }
        if push.is_deleted() {
            self.metrics.push_deleted(&push.name);
        }
        tracing::info!(push = %push.name, "push endpoint stopped");
    }

    fn give_back_probe(&self, push: &PushHandle, probe: bool) {
        if probe {
            push.breaker.lock().record(self.broker.now_ms(), true, None);
        }
    }

    /// Sends one request's messages until the reply settles them. A Retry-After the
    /// receiver asks for is waited out holding the leases, then the request goes again (not
    /// a failed delivery). A failure while the breaker is open (this one may have opened
    /// it) is held the same way and sent again as the half-open probe: messages are not
    /// burned as failed deliveries while the receiver is down.
    async fn deliver(
        &self,
        client: &reqwest::Client,
        push: &PushHandle,
        config: &PushConfig,
        deliveries: Vec<Delivery>,
        mut probe: bool,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let source = config.source.name();
        let receipts: Vec<String> = deliveries.iter().map(|d| d.receipt.clone()).collect();
        let n = deliveries.len() as u64;
        push.counters.in_flight.fetch_add(n, Relaxed);
        let settled = loop {
            let started = std::time::Instant::now();
            push.counters.requests.fetch_add(1, Relaxed);
            let outcome = self.send(client, config, source, &deliveries).await;
            self.metrics
                .push_latency(&push.name, started.elapsed().as_secs_f64());
            push.counters.reply(&outcome);
            let now = self.broker.now_ms();
            push.breaker.lock().record(now, probe, outcome.health());
            probe = false;
            let settled = settlement(&outcome, config.on_client_error);
            let overloaded = matches!(settled, Settlement::NackOverloaded(_));
            match settled {
                Settlement::Ack => {
                    push.counters.delivered.fetch_add(n, Relaxed);
                    break self.broker.ack(source, &receipts).await.map(|_| ());
                }
                Settlement::RetryAfter(ms) => {
                    push.breaker.lock().pause(now.saturating_add(ms as i64));
                    if !self
                        .hold(push, config, &receipts, now.saturating_add(ms as i64))
                        .await
                    {
                        break Ok(());
                    }
                }
                Settlement::Delay(ms, error) => {
                    push.breaker.lock().pause(now.saturating_add(ms as i64));
                    let max = self.broker.limits().max_delay_ms;
                    break self
                        .broker
                        .nack(
                            source,
                            &receipts,
                            Some(ms.min(max)),
                            Some(&error),
                            NackReason::Overloaded,
                        )
                        .await
                        .map(|_| ());
                }
                Settlement::Nack(error) | Settlement::NackOverloaded(error) => {
                    let state = push.breaker.lock().state(now);
                    if state == BreakerState::Closed {
                        let reason = if overloaded {
                            NackReason::Overloaded
                        } else {
                            NackReason::Failed
                        };
                        break self
                            .broker
                            .nack(source, &receipts, None, Some(&error), reason)
                            .await
                            .map(|_| ());
                    }
                    // Open: wait for a probe's turn, holding the leases.
                    match self.wait_for_probe(push, config, &receipts).await {
                        Some(as_probe) => probe = as_probe,
                        None => break Ok(()),
                    }
                }
                // Without a dead-letter queue a reject would drop them: given back instead.
                Settlement::Reject(error) if !self.broker.has_dead_letter_queue(source) => {
                    break self
                        .broker
                        .nack(source, &receipts, None, Some(&error), NackReason::Failed)
                        .await
                        .map(|_| ());
                }
                Settlement::Reject(error) => {
                    break self
                        .broker
                        .reject(source, &receipts, Some(&error))
                        .await
                        .map(|_| ());
                }
            }
        };
        if let Err(err) = settled {
            tracing::warn!(push = %push.name, error = %err, "settling pushed messages failed; their leases will expire and they will be delivered again");
        }
        push.counters.in_flight.fetch_sub(n, Relaxed);
    }

    /// Holds `receipts`' leases until `until` (ms). False when they cannot be held (the
    /// leases are gone, or the endpoint was deleted): they will be delivered again.
    async fn hold(
        &self,
        push: &PushHandle,
        config: &PushConfig,
        receipts: &[String],
        until: i64,
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let source = config.source.name();
        let wait = u64::try_from(until - self.broker.now_ms()).unwrap_or(0);
        let lease = (wait + config.timeout_ms + 10_000).min(tidewater_core::config::MAX_LEASE_MS);
        match self.broker.extend(source, receipts, Some(lease)) {
            Ok(reply) if reply.failed.is_empty() => {}
            _ => return false,
        }
        push.counters.held.fetch_add(receipts.len() as u64, Relaxed);
        let changed = push.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !push.is_deleted() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = changed => {}
            }
        }
        push.counters.held.fetch_sub(receipts.len() as u64, Relaxed);
        if push.is_deleted() {
            // Given back at once for the source's other consumers (or a new endpoint).
            let _ = self
                .broker
                .nack(
                    source,
                    receipts,
                    Some(0),
                    Some("push: endpoint deleted"),
                    NackReason::Failed,
                )
                .await;
            return false;
        }
        true
    }

    /// Waits until the breaker lets a request go (Some(true): as a probe), holding the
    /// leases; None when they cannot be held.
    async fn wait_for_probe(
        &self,
        push: &PushHandle,
        config: &PushConfig,
        receipts: &[String],
    ) -> Option<bool> {
        loop {
            let now = self.broker.now_ms();
            let allow = push.breaker.lock().allow(now);
            match allow {
                Allow::Yes => return Some(false),
                Allow::Probe => return Some(true),
                Allow::Until(at) => {
                    if !self.hold(push, config, receipts, at).await {
                        return None;
                    }
                }
            }
        }
    }

    /// One POST of `deliveries` to the endpoint.
    async fn send(
        &self,
        client: &reqwest::Client,
        config: &PushConfig,
        source: &str,
        deliveries: &[Delivery],
    ) -> Outcome {
        if let Err(refused) = self.policy.check_url(&config.url) {
            return Outcome::Connect(refused);
        }
        let Ok(keys) = keys(
            &Scheme::StandardWebhooks,
            std::slice::from_ref(&config.secret),
        ) else {
            return Outcome::Connect("the endpoint's secret is unreadable".into());
        };
        let now_s = self.broker.now_ms().div_euclid(1_000);
        let (id, body, content_type, headers) = request_of(config, source, deliveries);
        let signature = sign_standard(&keys[0], &id, now_s, &body);
        let mut request = client
            .post(&config.url)
            .timeout(Duration::from_millis(config.timeout_ms))
            .header("content-type", content_type)
            .header("webhook-id", &id)
            .header("webhook-timestamp", now_s.to_string())
            .header("webhook-signature", signature)
            .header("tidewater-source", source);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        // timeout_ms bounds the whole request (connecting included); connect_timeout_ms
        // the connection alone (the client's).
        match request.body(body).send().await {
            Err(err) if err.is_timeout() => Outcome::Timeout,
            // Without the URL: the error goes into the message's history and the logs, and
            // a URL's path or query may hold a token.
            Err(err) => Outcome::Connect(error_chain(&err.without_url())),
            Ok(mut response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after_ms(v, self.broker.now_ms()));
                // Read a little of the body so the connection can be reused; no more.
                let mut read = 0usize;
                while read < 64 << 10 {
                    match response.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                Outcome::Status {
                    status,
                    retry_after_ms: retry_after,
                }
            }
        }
    }
}

/// A Retry-After header's value (seconds, or an HTTP date) in ms from `now_ms`.
fn retry_after_ms(value: &str, now_ms: i64) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1_000));
    }
    let at = crate::time::parse_http_date(value)?;
    Some(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0))
}

/// An error and its causes, on one line (reqwest's own message is often just "error
/// sending request").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Headers of a message that are not forwarded: HTTP's own and the request's.
fn reserved(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "expect"
            | "authorization"
            | "cookie"
    ) || name.starts_with("webhook-")
        || name.starts_with("tidewater-")
        || name.starts_with("proxy-")
}

/// The request for `deliveries`: its webhook-id, body, content type and extra headers.
fn request_of(
    config: &PushConfig,
    source: &str,
    deliveries: &[Delivery],
) -> (String, Vec<u8>, String, Vec<(String, String)>) {
    let _ = source;
    match config.format {
        PushFormat::Raw => {
            let d = &deliveries[0];
            let record = &d.record;
            let id = tidewater_core::broker::record_id(record);
            let mut content_type = "application/octet-stream".to_string();
            let mut headers = vec![
                (
                    "tidewater-delivery-count".to_string(),
                    d.delivery_count.to_string(),
                ),
                (
                    "tidewater-published-at".to_string(),
                    record.published_at_ms.to_string(),
                ),
            ];
            if let Some(key) = record
                .key
                .as_ref()
                .and_then(|k| std::str::from_utf8(k).ok())
                && reqwest::header::HeaderValue::from_str(key).is_ok()
            {
                headers.push(("tidewater-key".into(), key.to_string()));
            }
            for (name, value) in &record.headers {
                let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value))
                else {
                    continue;
                };
                let name = name.to_ascii_lowercase();
                if name == "content-type" {
                    content_type = value.to_string();
                    continue;
                }
                if reserved(&name)
                    || reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(value).is_err()
                {
                    continue;
                }
                headers.push((name, value.to_string()));
            }
            if reqwest::header::HeaderValue::from_str(&content_type).is_err() {
                content_type = "application/octet-stream".into();
            }
            (id, record.body.to_vec(), content_type, headers)
        }
        PushFormat::Json => {
            let messages: Vec<serde_json::Value> = deliveries
                .iter()
                .map(|d| {
                    let r = &d.record;
                    let mut m = serde_json::json!({
                        "id": tidewater_core::broker::record_id(r),
                        "delivery_count": d.delivery_count,
                        "published_at": r.published_at_ms,
                        "headers": r.headers.iter().map(|(k, v)| (
                            String::from_utf8_lossy(k).into_owned(),
                            serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                        )).collect::<serde_json::Map<_, _>>(),
                    });
                    match std::str::from_utf8(&r.body) {
                        Ok(text) => m["body"] = text.into(),
                        Err(_) => {
                            m["body_base64"] = base64::engine::general_purpose::STANDARD
                                .encode(&r.body)
                                .into()
                        }
                    }
                    if let Some(key) = &r.key {
                        m["key"] = String::from_utf8_lossy(key).into_owned().into();
                    }
                    m
                })
                .collect();
            let id = if deliveries.len() == 1 {
                tidewater_core::broker::record_id(&deliveries[0].record)
            } else {
                use sha2::Digest;
                let mut hash = sha2::Sha256::new();
                for d in deliveries {
                    hash.update(tidewater_core::broker::record_id(&d.record).as_bytes());
                    hash.update(b"\n");
                }
                let digest = hash.finalize();
                let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                format!("batch_{hex}")
            };
            let body = serde_json::to_vec(&serde_json::json!({ "messages": messages }))
                .expect("JSON serializes");
            (id, body, "application/json".into(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        assert_eq!(retry_after_ms("3", 0), Some(3_000));
        let at = 784_111_777_000;
        assert_eq!(
            retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", at - 5_000),
            Some(5_000)
        );
        assert_eq!(
            retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", at + 1),
            Some(0)
        );
        assert_eq!(retry_after_ms("soon", 0), None);
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for embedded in ["::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1"] {
            assert!(!is_public(embedded.parse().unwrap()), "{embedded}");
        }
        let strict = PushSettings::default().policy().unwrap();
        for url in [
            "http://2130706433/",
            "http://0x7f000001/",
            "http://127.1/",
            "http://0177.0.0.1/",
            "http://169.254.169.254./latest",
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]:8080/",
        ] {
            assert!(strict.check_url(url).is_err(), "{url}");
        }
        assert!(strict.check_url("https://93.184.216.34/").is_ok());
        assert!(strict.check_url("https://mail.example.com/x").is_ok());
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        let policy = PushSettings {
            allow: vec!["10.0.0.0/8".into(), "internal.example".into()],
            ..PushSettings::default()
        }
        .policy()
        .unwrap();
        assert!(policy.allows("x", "10.9.9.9".parse().unwrap()));
        assert!(!policy.allows("x", "192.168.0.1".parse().unwrap()));
        assert!(policy.allows("internal.example", "192.168.0.1".parse().unwrap()));
        assert!(
            PushSettings {
                allow: vec!["10.0.0.0/40".into()],
                ..PushSettings::default()
            }
            .policy()
            .is_err()
        );
    }
}
