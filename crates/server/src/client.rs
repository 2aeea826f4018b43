//! A small blocking HTTP client for the CLI and the benchmark, the CLI's exit codes and
//! error classification, and its output functions.

use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use crate::errors::Code;

/// Exit codes of client commands (documented in the README).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const REFUSED: i32 = 4;
    pub const UNREACHABLE: i32 = 5;
    pub const DENIED: i32 = 6;
}

/// Standard output for client commands, `scenario` and `bench` (never `println!`, which
/// panics when the reader went away).
///
/// Why not `SIGPIPE` back to `SIG_DFL` for the whole process: the signal does not know which
/// pipe broke. `consume --exec` writes each body to its handler's stdin, and a handler that
/// exits without reading it (`--exec true`) would kill the consumer mid-stream, with acks
/// unsent. So the signal stays ignored (Rust's default), every write to standard output
/// goes through here, and only a broken standard output ends the process, the way any Unix
/// filter ends under `| head`: quietly, by SIGPIPE (status 141 in a shell).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    if let Err(err) = try_write_stdout(args) {
        stdout_failed(err);
    }
}

/// Like `write_stdout`, but returns the error (for callers that clean up first, such as
/// `consume`, which must not ack a message it could not print), then `stdout_failed`.
pub fn try_write_stdout(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.flush()
}

/// Ends the process after a failed write to standard output: by SIGPIPE when the reader
/// went away, else with an error and exit code 1 (a full disk, say).
pub fn stdout_failed(err: std::io::Error) -> ! {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring the default disposition and raising the signal; nothing else
        // runs in between that could observe the disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
        std::process::exit(128 + libc::SIGPIPE);
    }
    write_stderr(format_args!("error: writing standard output: {err}\n"));
    std::process::exit(exit::FAILED);
}

/// Standard error: a failure to write there cannot be reported anywhere, so it is ignored
/// (`eprintln!` would panic).
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` for client commands: see `write_stdout`.
macro_rules! outln {
    () => { $crate::client::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::client::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` for client commands: see `write_stderr`.
macro_rules! errln {
    ($($arg:tt)*) => { $crate::client::write_stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(crate) use {errln, outln};

#[derive(Debug)]
pub enum ClientError {
    /// The server answered with an error body.
    Api {
        status: u16,
        code: String,
        message: String,
        /// When to retry (429, 507 and 503 `overloaded` replies carry it).
        retry_after_ms: Option<u64>,
    },
    /// No answer (connection refused, timeout, DNS).
    Unreachable(String),
    /// The command line asks for something impossible; nothing was sent.
    Usage(String),
    Other(String),
}

/// A bad-input error (exit 2) for a command line the server never sees.
pub fn bad_input(what: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ClientError::Usage(what.into()))
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Api {
                status,
                code,
                message,
                ..
            } => write!(f, "{message} ({code}, HTTP {status})"),
            ClientError::Unreachable(what) if what.contains("--protocol-server") => {
                write!(f, "cannot reach the server: {what}")
            }
            ClientError::Unreachable(what) => write!(
                f,
                "cannot reach the server: {what}. Is `tidewater serve` running? (--server or TIDEWATER_SERVER)"
            ),
            ClientError::Usage(what) | ClientError::Other(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for ClientError {}

/// The HTTP status a server error code travels with (`Code::http_status`, the table of
/// docs/errors.md); None for a code this build does not know (a newer server).
pub fn status_of_code(code: &str) -> Option<u16> {
    Code::ALL
        .iter()
        .find(|c| c.as_str() == code)
        .map(|c| c.http_status())
}

/// The exit code for an error status: the one table behind every client command's exit
/// code, whichever protocol the command speaks.
pub fn exit_code_of_status(status: u16) -> i32 {
    match status {
        404 => exit::NOT_FOUND,
        // Backpressure and a full disk: nothing was stored, retry later.
        429 | 507 => exit::REFUSED,
        400 | 413 => exit::USAGE,
        // No credentials, bad ones, or no grant: --token, or ask an admin.
        401 | 403 => exit::DENIED,
        _ => exit::FAILED,
    }
}

impl ClientError {
    /// An error the server answered over the binary protocol (an `Error` frame, or the
    /// last throttle reply once the client stopped waiting): labelled with the status the
    /// code has over HTTP, so both protocols report, and exit, alike.
    pub fn from_server_code(code: String, message: String) -> ClientError {
        match status_of_code(&code) {
            Some(status) => ClientError::Api {
                status,
                code,
                message,
                retry_after_ms: None,
            },
            None => ClientError::Other(format!("{message} ({code})")),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            // The code decides when known: HTTP answers `overloaded` with 503 at its
            // connection cap, and that is backpressure (4) like its 429.
            ClientError::Api { status, code, .. } => {
                exit_code_of_status(status_of_code(code).unwrap_or(*status))
            }
            ClientError::Unreachable(_) => exit::UNREACHABLE,
            ClientError::Usage(_) => exit::USAGE,
            ClientError::Other(_) => exit::FAILED,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

const MAX_REPLY_BYTES: u64 = 1 << 30;

/// The CLI's `--token` (`TIDEWATER_TOKEN`), for every request it makes.
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

pub fn set_token(token: Option<String>) {
    let _ = TOKEN.set(token.filter(|t| !t.is_empty()));
}

/// The token the CLI presents, if any.
pub fn token() -> Option<&'static str> {
    TOKEN.get().and_then(|t| t.as_deref())
}

/// The CLI's TLS flags (`--cacert`, `--insecure`, `--client-cert`, `--client-key`).
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    pub cacert: Option<std::path::PathBuf>,
    pub insecure: bool,
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
    /// The server's URL is https://: the binary protocol speaks TLS too (one `[tls]`
    /// serves every listener).
    pub https: bool,
}

static TLS: std::sync::OnceLock<TlsFlags> = std::sync::OnceLock::new();

pub fn set_tls(flags: TlsFlags) {
    let _ = TLS.set(flags);
}

fn tls_flags() -> TlsFlags {
    TLS.get().cloned().unwrap_or_default()
}

/// The binary protocol client's TLS, when the server is reached over https.
pub fn binary_tls() -> anyhow::Result<Option<tidewater_client::ClientTls>> {
    let flags = tls_flags();
    if !flags.https {
        return Ok(None);
    }
    let roots = match (&flags.cacert, flags.insecure) {
        (_, true) => tidewater_client::Roots::Insecure,
        (Some(path), false) => tidewater_client::Roots::CaFile(path.clone()),
        (None, false) => tidewater_client::Roots::System,
    };
    let mut options = tidewater_client::TlsOptions::new(roots);
    if let (Some(cert), Some(key)) = (&flags.client_cert, &flags.client_key) {
        options.client_certificate = Some((cert.clone(), key.clone()));
    }
    tidewater_client::ClientTls::new(&options)
        .map(Some)
        .map_err(|e| anyhow::Error::new(ClientError::Usage(format!("TLS: {e}"))))
}

/// ureq's TLS settings from the flags.
fn ureq_tls(flags: &TlsFlags) -> Result<ureq::tls::TlsConfig, String> {
    use ureq::tls::{
        Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, parse_pem,
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut builder = TlsConfig::builder().disable_verification(flags.insecure);
    if let Some(path) = &flags.cacert {
        let pem = read(path)?;
        let certs: Vec<Certificate<'static>> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&flags.client_cert, &flags.client_key) {
        let pem = read(cert)?;
        let chain: Vec<Certificate<'static>> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        let key =
            PrivateKey::from_pem(&read(key)?).map_err(|e| format!("{}: {e}", key.display()))?;
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(builder.build())
}

impl Client {
    pub fn new(base: &str) -> Client {
        let flags = tls_flags();
        let tls = ureq_tls(&flags).unwrap_or_else(|e| {
            crate::client::errln!("error: TLS: {e}");
            std::process::exit(exit::USAGE);
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        // `--server 127.0.0.1:7070` means the HTTP server there (as `--protocol-server`
        // takes HOST:PORT).
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        Client { agent, base }
    }

    /// Sends a request with an optional raw JSON body; returns status and parsed reply.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Value), ClientError> {
        let bytes = self.call_raw(method, path, body)?;
        let value = if bytes.1.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes.1)
                .map_err(|e| ClientError::Other(format!("unreadable reply: {e}")))?
        };
        Ok((bytes.0, value))
    }

    pub fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = format!("{}{}", self.base, path);
        let bearer = token().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => {
                let mut request = self.agent.get(&url);
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.call()
            }
            ("DELETE", _) => {
                let mut request = self.agent.delete(&url);
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.call()
            }
            (method, body) => {
                let mut request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request
                    .header("content-type", "application/json")
                    .send(body.unwrap_or(b""))
            }
        };
        let mut response = result.map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => ClientError::Unreachable(tls_hint(&url, &e.to_string())),
            other => ClientError::Other(tls_hint(&url, &other.to_string())),
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| ClientError::Unreachable(format!("{url}: reading reply: {e}")))?;
        if status >= 400 {
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                code: value["code"].as_str().unwrap_or("unknown").to_string(),
                message: value["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
                retry_after_ms: value["retry_after_ms"].as_u64(),
            });
        }
        Ok((status, bytes))
    }

    /// The full URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.call("GET", path, None)?.1)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.call("DELETE", path, None)?.1)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self
            .call("POST", path, Some(&serde_json::to_vec(body).expect("json")))?
            .1)
    }
}

/// An error's text, with what to do when it is about TLS: a certificate not trusted, or
/// plain HTTP sent to a TLS listener.
fn tls_hint(url: &str, error: &str) -> String {
    if error.contains("certificate")
        || error.contains("UnknownIssuer")
        || error.contains("NotValidForName")
    {
        format!(
            "{url}: {error} (TLS: the server's certificate is not trusted; give its CA with --cacert FILE or TIDEWATER_CACERT)"
        )
    } else if url.starts_with("http://")
        && (error.contains("invalid HTTP version") || error.contains("http parse fail"))
    {
        format!("{url}: {error} (the server speaks TLS? use --server https://...)")
    } else {
        format!("{url}: {error}")
    }
}

/// Percent-encodes a queue name for a URL path (names are restricted, but be safe).
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_are_labelled_with_their_real_status_and_exit_alike() {
        // Every code the server can send over the binary protocol gets the status it has
        // over HTTP, and the exit code of that status.
        for code in Code::ALL {
            let err = ClientError::from_server_code(code.as_str().into(), "m".into());
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("HTTP {}", code.http_status())),
                "{code:?}: {shown}"
            );
            assert_eq!(err.exit_code(), exit_code_of_status(code.http_status()));
        }
        let exit = |code: &str| ClientError::from_server_code(code.into(), "m".into());
        assert_eq!(exit("quota_exceeded").exit_code(), exit::REFUSED);
        assert!(exit("quota_exceeded").to_string().contains("HTTP 429"));
        assert_eq!(exit("disk_full").exit_code(), exit::REFUSED);
        assert!(exit("disk_full").to_string().contains("HTTP 507"));
        assert_eq!(exit("queue_full").exit_code(), exit::REFUSED);
        assert_eq!(exit("queue_not_found").exit_code(), exit::NOT_FOUND);
        assert_eq!(exit("exceeds_capacity").exit_code(), exit::USAGE);
        assert_eq!(exit("internal").exit_code(), exit::FAILED);
        // A code this build does not know is not given a made-up status.
        let unknown = exit("some_new_code");
        assert_eq!(unknown.exit_code(), exit::FAILED);
        assert!(!unknown.to_string().contains("HTTP"), "{unknown}");
        // HTTP's connection cap answers `overloaded` with 503: still backpressure.
        let capped = ClientError::Api {
            status: 503,
            code: "overloaded".into(),
            message: "m".into(),
            retry_after_ms: Some(1000),
        };
        assert_eq!(capped.exit_code(), exit::REFUSED);
    }
}
