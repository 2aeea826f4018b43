//! TLS on the listeners against a real server: curl with `--cacert`, the Rust client over the
//! binary protocol, client certificates naming the principal (mutual TLS), and a new
//! certificate taken on SIGHUP without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidewater_client::{
    Client, ClientOptions, ClientTls, Message, ProducerOptions, Roots, TlsOptions,
};

use crate::binary::runtime;
use crate::support::{LOG_TO, Server, TLS_CA};

/// A CA and what it signs, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A certificate for `names` (SANs; `cn` as the subject's common name) signed by the CA:
    /// (certificate file, key file).
    fn issue(&self, file: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

const ADMIN: &str = "twadmin.Secret-for-the-tls-tests-0123456789abcdef";

fn tls_server(dir: &Path, pki: &Pki, extra: &str) -> Server {
    let (cert, key) = pki.issue("server", "tidewater", &["localhost", "127.0.0.1"]);
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_auth = \"optional\"\nreload_check_ms = 100\n{extra}",
            cert,
            key,
            pki.ca_file("main"),
        ),
    )
    .unwrap();
    let ca = pki.ca_file("main");
    let log = dir.join("server.log");
    let server = Server::start_env(
        &dir.join("data"),
        Some(config),
        &[
            ("TIDEWATER_ADMIN_KEY", ADMIN),
            (TLS_CA, ca.to_str().unwrap()),
            (LOG_TO, log.to_str().unwrap()),
        ],
    );
    server.remember_secret(ADMIN.split_once('.').unwrap().1);
    server
}

/// curl's answer: (HTTP status, body as JSON), or None when curl itself failed (a TLS
/// error, say).
fn curl(args: &[&str]) -> Option<(u16, Value)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    Some((
        status.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    ))
}

fn client(server: &Server, roots: Roots, token: Option<&str>) -> Client {
    let tls = ClientTls::new(&TlsOptions::new(roots)).unwrap();
    Client::new(
        &server.protocol,
        ClientOptions {
            tls: Some(tls),
            credentials: token.map(tidewater_client::Credentials::token),
            breaker_failures: 100,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            ..ClientOptions::default()
        },
    )
}

#[test]
fn curl_and_the_rust_client_speak_tls_and_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let server = tls_server(dir.path(), &pki, "");
    let ca = pki.ca_file("main");
    let ca = ca.to_str().unwrap();
    let url = &server.url;
    assert_eq!(
        curl(&["--cacert", ca, &format!("{url}/readyz")]).unwrap().0,
        200
    );
    // Without the CA curl refuses the certificate; plain HTTP on the TLS port gets nothing.
    assert!(curl(&[&format!("{url}/readyz")]).is_none());
    let plain = url.replace("https://", "http://");
    assert!(curl(&[&format!("{plain}/readyz")]).is_none_or(|(status, _)| status != 200));
    let (status, _) = curl(&[
        "--cacert",
        ca,
        "-X",
        "PUT",
        "-H",
        "content-type: application/json",
        "-d",
        "{}",
        &format!("{url}/v1/queues/q"),
    ])
    .unwrap();
    assert_eq!(status, 201);
    // The Rust client over the binary protocol: the CA, then an unknown CA (refused).
    runtime().block_on(async {
        let client = client(&server, Roots::CaFile(pki.ca_file("main")), None);
        let producer = client.producer("q", ProducerOptions::default());
        producer.send(Message::new("over tls")).await.unwrap();
        let other = Pki::new(dir.path(), "other");
        let stranger = client_with(&server, Roots::CaFile(other.ca_file("other")));
        let refused = stranger
            .producer("q", ProducerOptions::default())
            .send(Message::new("x"))
            .await;
        assert!(refused.is_err(), "an unknown CA was trusted");
    });
    let peek = server.ok("GET", "/v1/queues/q/messages", None);
    assert_eq!(peek["messages"][0]["body"], "over tls");
    // The CLI: HTTP and the binary protocol both over TLS, given the CA; refused without.
    let cli = |args: &[&str]| {
        Command::new(crate::support::BIN)
            .args(["--server", url, "--protocol-server", &server.protocol])
            .args(args)
            .output()
            .unwrap()
    };
    let published = cli(&["--cacert", ca, "publish", "q", "from the cli"]);
    assert!(published.status.success(), "{published:?}");
    let listed = cli(&["--cacert", ca, "--json", "queue", "list"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["queues"][0]["stats"]["depth"], 2, "{listed}");
    let refused = cli(&["queue", "list"]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    let insecure = cli(&["--insecure", "queue", "list"]);
    assert!(insecure.status.success(), "{insecure:?}");
}

fn client_with(server: &Server, roots: Roots) -> Client {
    client(server, roots, None)
}

#[test]
fn a_client_certificate_names_the_principal_and_tokens_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let server = tls_server(dir.path(), &pki, "[auth]\nenabled = true\n");
    let ca = pki.ca_file("main");
    let ca = ca.to_str().unwrap();
    let (cert, key) = pki.issue("alice", "alice", &[]);
    let whoami = format!("{}/v1/auth/whoami", server.url);
    let (status, me) = curl(&[
        "--cacert",
        ca,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        &whoami,
    ])
    .unwrap();
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["principal"], "alice");
    assert_eq!(me["key_id"], Value::Null);
    // alice may do only what is granted to her.
    let queue = format!("{}/v1/queues/q", server.url);
    let as_alice = |method: &str, url: &str| {
        curl(&[
            "--cacert",
            ca,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-X",
            method,
            url,
        ])
        .unwrap()
    };
    assert_eq!(as_alice("PUT", &queue).0, 403);
    let bearer = format!("Authorization: Bearer {ADMIN}");
    let (status, _) = curl(&[
        "--cacert",
        ca,
        "-H",
        &bearer,
        "-H",
        "content-type: application/json",
        "-d",
        &json!({"principal": "alice", "resource": "queue", "name": "q", "operations": ["admin"]})
            .to_string(),
        &format!("{}/v1/auth/acls", server.url),
    ])
    .unwrap();
    assert_eq!(status, 201);
    assert_eq!(as_alice("PUT", &queue).0, 201);
    // No certificate, no token: anonymous.
    let (status, me) = curl(&["--cacert", ca, &whoami]).unwrap();
    assert_eq!((status, me["principal"].as_str()), (200, Some("anonymous")));
    // A certificate from another CA is refused at the handshake.
    let other = Pki::new(dir.path(), "other");
    let (cert, key) = other.issue("mallory", "alice", &[]);
    assert!(
        curl(&[
            "--cacert",
            ca,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            &whoami
        ])
        .is_none()
    );
}

#[test]
fn a_new_certificate_is_taken_on_sighup_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let server = tls_server(dir.path(), &pki, "");
    let old_ca = pki.ca_file("main");
    let readyz = format!("{}/readyz", server.url);
    assert_eq!(
        curl(&["--cacert", old_ca.to_str().unwrap(), &readyz])
            .unwrap()
            .0,
        200
    );
    // The operator replaces the files with a certificate from a new CA, and signals.
    let next = Pki::new(dir.path(), "next");
    let (cert, key) = next.issue("next-server", "tidewater", &["localhost", "127.0.0.1"]);
    std::fs::copy(&cert, dir.path().join("server.pem")).unwrap();
    std::fs::copy(&key, dir.path().join("server.key")).unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let new_ca = next.ca_file("next");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&["--cacert", new_ca.to_str().unwrap(), &readyz]).is_none() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not taken"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(curl(&["--cacert", old_ca.to_str().unwrap(), &readyz]).is_none());
    // A broken file does not take the server down: the last good certificate stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        curl(&["--cacert", new_ca.to_str().unwrap(), &readyz])
            .unwrap()
            .0,
        200
    );
}
