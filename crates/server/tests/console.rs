//! The web console's files as the server serves them: on the HTTP listener at `/`, with a
//! policy that keeps the page to its own origin; on a listener of its own (which serves the
//! API the page calls); and off. (The page itself is tested in Chromium:
//! tests/console/, scripts/console-test.)

use crate::support::{Server, agent, free_port};

fn get(url: &str) -> (u16, String, String, String) {
    let response = agent().get(url).call().unwrap();
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (kind, csp) = (header("content-type"), header("content-security-policy"));
    let body = response.into_body().read_to_string().unwrap();
    (status, kind, csp, body)
}

#[test]
fn the_console_is_served_from_the_binary_with_a_same_origin_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let (status, kind, csp, body) = get(&format!("{}/", server.url));
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(
        body.contains("/console/app.js") && !body.contains("http"),
        "{body}"
    );
    let (status, kind, _, js) = get(&format!("{}/console/app.js", server.url));
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/javascript"), "{kind}");
    // It calls the API on its own origin only: the one URL it names is SVG's namespace.
    let urls: Vec<&str> = js
        .match_indices("http")
        .map(|(at, _)| &js[at..(at + 30).min(js.len())])
        .collect();
    assert!(
        urls.iter()
            .all(|u| u.starts_with("http://www.w3.org/2000/svg")),
        "the script names another origin: {urls:?}"
    );
    let (status, kind, _, _) = get(&format!("{}/console/app.css", server.url));
    assert_eq!((status, kind.starts_with("text/css")), (200, true));
    server.err("GET", "/console/other.js", None, 404, "not_found");
}

#[test]
fn the_console_has_a_listener_of_its_own_or_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server::start(
        &dir.path().join("a"),
        Some(&format!("[console]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    let own = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{own}/")).0, 200);
    // The page calls the API on the same origin: that listener serves it.
    let (status, _, _, body) = get(&format!("{own}/v1/queues"));
    assert_eq!(status, 200, "{body}");

    let off = Server::start(&dir.path().join("b"), Some("[console]\nenabled = false\n"));
    off.err("GET", "/", None, 404, "not_found");
    off.err("GET", "/console/app.js", None, 404, "not_found");
    off.ok("GET", "/v1/queues", None);
}
