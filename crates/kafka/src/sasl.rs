//! SASL on the Kafka listener, as Kafka's broker speaks it: SaslHandshake v1 (KIP-43) picks a
//! mechanism, then SaslAuthenticate (KIP-152) carries its messages. Mechanisms: PLAIN and
//! SCRAM-SHA-256/512 (RFC 5802/7677, tidewater-auth's `scram`), with API keys: the username
//! is the key id, the password its secret; and OAUTHBEARER (RFC 7628, KIP-255), whose
//! bearer token is checked as an HTTP bearer token is: a JWT against the identity
//! provider's keys (`[auth.jwt]`), or an API key's `<key id>.<secret>`. A connection that
//! fails is answered SASL_AUTHENTICATION_FAILED and closed at its next request; one that has
//! not authenticated may send nothing but ApiVersions and SASL's own requests. Failed
//! attempts count against the address, as on every listener.
//!
//! A credential that expires (a JWT's `exp`, a key's expiry) gives the session that
//! lifetime (`session_lifetime_ms`, KIP-368): the client authenticates again on the same
//! connection before it ends, as the same principal; a connection that has not is closed
//! at its next request after it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use rand::Rng;
use tidewater_auth::scram::{self, Mechanism as Scram, ServerFirst};
use tidewater_auth::{Identity, Refused};

use crate::Kafka;
use crate::access::Access;
use crate::versions::text;

const MECHANISMS: [&str; 4] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// Where a connection's SASL exchange is.
pub(crate) enum Sasl {
    Start,
    Chosen(Mechanism),
    /// SCRAM: server-first sent, client-final awaited.
    Scram(Box<ServerFirst>),
    Done,
    /// Refused: the connection closes at its next request.
    Failed,
}

#[derive(Clone, Copy)]
pub(crate) enum Mechanism {
    Plain,
    Scram(Scram),
    OAuthBearer,
}

/// A connection's identity and SASL state.
pub(crate) struct Session {
    pub peer: SocketAddr,
    pub sasl: Sasl,
    /// What its requests may do: `Open` with authentication off, else set once SASL
    /// succeeds (None before).
    pub access: Option<Access>,
    /// Authenticating again (KIP-368): the principal it must stay.
    reauthenticating: Option<String>,
}

impl Session {
    pub(crate) fn new(kafka: &Kafka, peer: SocketAddr, certificate: Option<String>) -> Session {
        let access = match (&kafka.config.auth, certificate) {
            (None, _) => Some(Access::Open),
            (Some(_), Some(principal)) => Some(Access::Known {
                state: kafka.broker.auth(),
                identity: Arc::new(Identity::of_certificate(&principal)),
            }),
            (Some(_), None) => None,
        };
        Session {
            peer,
            sasl: Sasl::Start,
            access,
            reauthenticating: None,
        }
    }
}

pub(crate) fn handshake(
    kafka: &Kafka,
    session: &mut Session,
    req: SaslHandshakeRequest,
) -> SaslHandshakeResponse {
    let mut response = SaslHandshakeResponse::default();
    response.mechanisms = MECHANISMS
        .iter()
        .map(|m| StrBytes::from_static_str(m))
        .collect();
    let chosen = match req.mechanism.as_str() {
        "PLAIN" => Some(Mechanism::Plain),
        "OAUTHBEARER" => Some(Mechanism::OAuthBearer),
        name => Scram::parse(name).map(Mechanism::Scram),
    };
    response.error_code = match (&kafka.config.auth, &session.sasl, chosen) {
        // Authentication is off: nothing to authenticate with (Kafka's PLAINTEXT listener).
        (None, _, _) => ResponseError::UnsupportedSaslMechanism.code(),
        (Some(_), Sasl::Start, Some(chosen)) => {
            session.sasl = Sasl::Chosen(chosen);
            0
        }
        // Again on an authenticated connection (KIP-368): as the same principal.
        (Some(_), Sasl::Done, Some(chosen)) => {
            session.reauthenticating = match &session.access {
                Some(Access::Known { identity, .. }) => Some(identity.principal.clone()),
                _ => None,
            };
            session.sasl = Sasl::Chosen(chosen);
            0
        }
        (Some(_), Sasl::Start | Sasl::Done, None) => ResponseError::UnsupportedSaslMechanism.code(),
        (Some(_), _, _) => ResponseError::IllegalSaslState.code(),
    };
    response
}

pub(crate) fn authenticate(
    kafka: &Kafka,
    session: &mut Session,
    req: SaslAuthenticateRequest,
) -> SaslAuthenticateResponse {
    let mut response = SaslAuthenticateResponse::default();
    let Some(guard) = kafka.config.auth.clone() else {
        response.error_code = ResponseError::IllegalSaslState.code();
        response.error_message = text("authentication is off on this listener");
        return response;
    };
    let state = kafka.broker.auth();
    let now = kafka.broker.now_ms();
    let peer = session.peer.ip();
    let outcome: Result<Option<Identity>, String> = match std::mem::replace(
        &mut session.sasl,
        Sasl::Failed,
    ) {
        Sasl::Chosen(Mechanism::Plain) => {
            plain(&guard, &state, now, peer, &req.auth_bytes).map(Some)
        }
        Sasl::Chosen(Mechanism::OAuthBearer) => {
            oauthbearer(&guard, &state, now, peer, &req.auth_bytes).map(Some)
        }
        Sasl::Chosen(Mechanism::Scram(mechanism)) => match guard.check_peer(peer, now, "kafka") {
            Err(refused) => Err(refused.to_string()),
            Ok(()) => {
                let first = scram::server_first(
                    mechanism,
                    &req.auth_bytes,
                    |user| state.key(user).and_then(|k| k.scram(mechanism).cloned()),
                    &nonce(),
                    |user| scram::fake_salt(&kafka.process_secret, user),
                );
                match first {
                    Ok(first) => {
                        response.auth_bytes = Bytes::from(first.message.clone().into_bytes());
                        session.sasl = Sasl::Scram(Box::new(first));
                        return response;
                    }
                    Err(err) => {
                        guard.failed(peer, now, "kafka", "-", &err);
                        Err(format!("Authentication failed: {err}"))
                    }
                }
            }
        },
        Sasl::Scram(first) => {
            let user = first.user.clone();
            match first.client_final(&req.auth_bytes) {
                Ok((last, user)) => match state.key(&user) {
                    Some(key) if !key.expired(now) => {
                        response.auth_bytes = Bytes::from(last.into_bytes());
                        Ok(Some(Identity::of_key(key)))
                    }
                    _ => {
                        guard.failed(peer, now, "kafka", &user, &"the key has expired");
                        Err("Authentication failed: the key has expired".into())
                    }
                },
                Err(err) => {
                    let key = if tidewater_auth::keys::check_key_id(&user).is_ok() {
                        user.as_str()
                    } else {
                        "-"
                    };
                    guard.failed(peer, now, "kafka", key, &err);
                    Err(format!(
                        "Authentication failed during authentication due to invalid credentials with SASL mechanism {}",
                        "SCRAM"
                    ))
                }
            }
        }
        Sasl::Start | Sasl::Done | Sasl::Failed => {
            Err("SaslAuthenticate out of turn: send SaslHandshake first".into())
        }
    };
    // Authenticating again must not change who the connection is.
    let outcome = match (outcome, session.reauthenticating.take()) {
        (Ok(Some(identity)), Some(before)) if identity.principal != before => {
            guard.failed(
                peer,
                now,
                "kafka",
                "-",
                &"re-authentication as another principal",
            );
            Err(format!(
                "Authentication failed: re-authentication must keep the principal ('{before}'), not become '{}'",
                identity.principal
            ))
        }
        // (SCRAM's first message returned above: the principal waits for its last.)
        (outcome, _) => outcome,
    };
    match outcome {
        Ok(Some(identity)) => {
            // A credential that expires: the client authenticates again before then.
            if let Some(at) = identity.expires_at_ms {
                response.session_lifetime_ms = at.saturating_sub(now).max(1);
            }
            tracing::debug!(peer = %session.peer, principal = %identity.principal, "Kafka connection authenticated");
            session.access = Some(Access::Known {
                state,
                identity: Arc::new(identity),
            });
            session.sasl = Sasl::Done;
        }
        Ok(None) => {}
        Err(message) => {
            session.sasl = Sasl::Failed;
            response.error_code = ResponseError::SaslAuthenticationFailed.code();
            response.error_message = text(message);
            response.auth_bytes = Bytes::new();
        }
    }
    response
}

/// PLAIN: `authzid \0 authcid \0 password`; the authzid, if any, must be the authcid.
fn plain(
    guard: &tidewater_auth::Guard,
    state: &tidewater_auth::AuthState,
    now: i64,
    peer: std::net::IpAddr,
    bytes: &[u8],
) -> Result<Identity, String> {
    let mut parts = bytes.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        guard.failed(peer, now, "kafka", "-", &"malformed PLAIN message");
        return Err("Authentication failed: malformed SASL/PLAIN message".into());
    };
    let (Ok(authzid), Ok(user), Ok(password)) = (
        std::str::from_utf8(authzid),
        std::str::from_utf8(user),
        std::str::from_utf8(password),
    ) else {
        guard.failed(peer, now, "kafka", "-", &"PLAIN message not UTF-8");
        return Err("Authentication failed: SASL/PLAIN message not UTF-8".into());
    };
    if !authzid.is_empty() && authzid != user {
        guard.failed(
            peer,
            now,
            "kafka",
            "-",
            &"authorization id other than the user",
        );
        return Err(
            "Authentication failed: an authorization id other than the user is not supported"
                .into(),
        );
    }
    guard
        .authenticate_key(state, now, user, password, peer, "kafka")
        .map_err(|refused| match refused {
            Refused::Blocked { .. } => format!("Authentication failed: {refused}"),
            Refused::Failed(_) | Refused::Token(_) => {
                "Authentication failed: Invalid username or password".into()
            }
        })
}

/// OAUTHBEARER's client response (RFC 7628 §3.1):
/// `gs2-header \x01 auth=Bearer <token> \x01 [key=value \x01]* \x01`, the GS2 header being
/// `n,` (or `y,`) with an optional `a=<authzid>` and a comma. The token is checked as an HTTP
/// bearer token is; extensions (KIP-342) are ignored; the authzid, if any, must be the
/// token's principal.
fn oauthbearer(
    guard: &tidewater_auth::Guard,
    state: &tidewater_auth::AuthState,
    now: i64,
    peer: std::net::IpAddr,
    bytes: &[u8],
) -> Result<Identity, String> {
    let malformed = |why: &str| {
        guard.failed(peer, now, "kafka", "-", &why);
        format!("Authentication failed: malformed SASL/OAUTHBEARER message: {why}")
    };
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
    let rest = text
        .strip_prefix("n,")
        .or_else(|| text.strip_prefix("y,"))
        .ok_or_else(|| malformed("no GS2 header (n,,)"))?;
    let (authzid, rest) = rest
        .split_once(',')
        .ok_or_else(|| malformed("no GS2 header (n,,)"))?;
    let authzid = match authzid {
        "" => None,
        a => Some(
            a.strip_prefix("a=")
                .ok_or_else(|| malformed("the authorization id is not a=<name>"))?,
        ),
    };
    let pairs = rest
        .strip_prefix('\x01')
        .and_then(|r| r.strip_suffix("\x01\x01"))
        .ok_or_else(|| malformed("the key-value pairs are not \\x01-separated"))?;
    let mut token = None;
    for pair in pairs.split('\x01') {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| malformed("a key-value pair without '='"))?;
        if key == "auth" {
            token = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
        }
    }
    let token = token.ok_or_else(|| malformed("no auth=Bearer <token>"))?;
    let identity = guard
        .authenticate(state, now, Some(token), None, peer, "kafka")
        .map_err(|refused| format!("Authentication failed: {refused}"))?;
    if let Some(authzid) = authzid
        && authzid != identity.principal
    {
        guard.failed(
            peer,
            now,
            "kafka",
            "-",
            &"authorization id other than the token's principal",
        );
        return Err(
            "Authentication failed: an authorization id other than the token's principal is not supported"
                .into(),
        );
    }
    Ok(identity)
}

/// A fresh server nonce: 24 random bytes as base64 (no commas).
fn nonce() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
