//! The web console: three files embedded in the binary (crates/server/console/), served at
//! `/` and `/console/*` on the HTTP listener (and on `[console] listen` when set). The page
//! only calls the API, with the API key the user signs in with; it fetches nothing from
//! anywhere else (its Content-Security-Policy says so to the browser too).

use crate::errors::Code;
use crate::http::{ApiError, AppState};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// Same origin only: no inline script or style, no other host, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `[console]` in the configuration file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console at `/` on the HTTP listener.
    pub enabled: bool,
    /// A listener of its own for the console (and the API it calls), besides the HTTP one.
    pub listen: Option<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            listen: None,
        }
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(Code::NotFound, format!("no {what} here"))
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Always checked again: an upgraded server serves its own console at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

pub(crate) async fn index(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.console {
        return Err(not_found("console (it is off: [console] enabled = false)"));
    }
    Ok(file("text/html; charset=utf-8", INDEX))
}

pub(crate) async fn asset(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if !state.console {
        return Err(not_found("console (it is off: [console] enabled = false)"));
    }
    match name.as_str() {
        "app.js" => Ok(file("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(file("text/css; charset=utf-8", APP_CSS)),
        _ => Err(not_found(&format!(
            "console file '{}'",
            name.chars().take(40).collect::<String>()
        ))),
    }
}
