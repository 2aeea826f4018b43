//! SCRAM (RFC 5802, RFC 7677), the server's side, as Kafka's SASL/SCRAM-SHA-256 and -512
//! use it: no channel binding, usernames as key ids. Sans-IO: the caller moves the messages.
//!
//! ```text
//! client-first   n,,n=<user>,r=<client nonce>[,<extensions>]
//! server-first   r=<client nonce><server nonce>,s=<salt>,i=<iterations>
//! client-final   c=biws,r=<nonce>,p=<proof>
//! server-final   v=<server signature>      (or e=<error>)
//! ```
//!
//! An unknown user gets a server-first like any other (a salt made from the name) and
//! fails at the proof, so the exchange does not tell which ids exist.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// The two mechanisms Kafka's clients offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mechanism {
    #[serde(rename = "SCRAM-SHA-256")]
    Sha256,
    #[serde(rename = "SCRAM-SHA-512")]
    Sha512,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "SCRAM-SHA-256" => Some(Mechanism::Sha256),
            "SCRAM-SHA-512" => Some(Mechanism::Sha512),
            _ => None,
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            Mechanism::Sha512 => {
                let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes any key");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => Sha256::digest(data).to_vec(),
            Mechanism::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn salted_password(self, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
                out.to_vec()
            }
            Mechanism::Sha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

/// The salt an unknown user is given: the same at each try (derived from the name and a
/// secret of the process), so the exchange does not tell known ids from unknown ones.
pub fn fake_salt(process_secret: &[u8; 32], user: &str) -> [u8; 16] {
    let mac = Mechanism::Sha256.hmac(process_secret, user.as_bytes());
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&mac[..16]);
    salt
}

/// Iterations of a derived credential: Kafka's minimum for both mechanisms.
pub const ITERATIONS: u32 = 4096;

/// What the server keeps to check a SCRAM proof (RFC 5802's StoredKey and ServerKey):
/// neither lets anyone compute a proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    pub mechanism: Mechanism,
    /// Base64.
    pub salt: String,
    pub iterations: u32,
    /// Base64.
    pub stored_key: String,
    /// Base64.
    pub server_key: String,
}

impl ScramCredential {
    pub fn derive(
        mechanism: Mechanism,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> ScramCredential {
        let salted = mechanism.salted_password(password, salt, iterations);
        let client_key = mechanism.hmac(&salted, b"Client Key");
        ScramCredential {
            mechanism,
            salt: STANDARD.encode(salt),
            iterations,
            stored_key: STANDARD.encode(mechanism.hash(&client_key)),
            server_key: STANDARD.encode(mechanism.hmac(&salted, b"Server Key")),
        }
    }
}

/// Why an exchange failed. The client is told only that authentication failed (and the
/// reason when it is about the message's form, never about the user).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("an authorization identity other than the user is not supported")]
    AuthzId,
    #[error("delegation tokens are not supported")]
    Token,
    #[error("the nonce does not continue the exchange's")]
    Nonce,
    #[error("invalid credentials")]
    Proof,
}

/// After server-first: what client-final is checked against.
#[derive(Debug)]
pub struct ServerFirst {
    pub message: String,
    pub user: String,
    mechanism: Mechanism,
    gs2_header: String,
    client_first_bare: String,
    nonce: String,
    credential: Option<ScramCredential>,
}

/// Reads client-first and answers server-first. `lookup` finds the user's credential;
/// `server_nonce` is fresh random printable text (no commas); `fake_salt` gives an unknown
/// user's salt from the name (the same at each try: `fake_salt` below).
pub fn server_first(
    mechanism: Mechanism,
    client_first: &[u8],
    lookup: impl FnOnce(&str) -> Option<ScramCredential>,
    server_nonce: &str,
    fake_salt: impl FnOnce(&str) -> [u8; 16],
) -> Result<ServerFirst, ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    // gs2-header: cbind-flag "," [authzid] ","
    let (flag, rest) = text
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("unknown channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    let gs2_header = format!("{flag},{authzid},");
    let mut attrs = bare.split(',');
    let user = attrs
        .next()
        .and_then(|a| a.strip_prefix("n="))
        .ok_or(ScramError::Malformed("no user name"))?;
    let user = unescape(user)?;
    if let Some(authzid) = authzid.strip_prefix("a=") {
        if unescape(authzid)? != user {
            return Err(ScramError::AuthzId);
        }
    } else if !authzid.is_empty() {
        return Err(ScramError::Malformed("bad authorization identity"));
    }
    let client_nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b','))
        .ok_or(ScramError::Malformed("no client nonce"))?;
    for extension in attrs {
        // Kafka's only extension: delegation tokens (tokenauth=true), which keys are not.
        if extension.starts_with("tokenauth=") && extension != "tokenauth=false" {
            return Err(ScramError::Token);
        }
    }
    let credential = lookup(&user).filter(|c| c.mechanism == mechanism);
    let (salt, iterations) = match &credential {
        Some(c) => (c.salt.clone(), c.iterations),
        None => (STANDARD.encode(fake_salt(&user)), ITERATIONS),
    };
    let nonce = format!("{client_nonce}{server_nonce}");
    let message = format!("r={nonce},s={salt},i={iterations}");
    Ok(ServerFirst {
        message,
        user,
        mechanism,
        gs2_header,
        client_first_bare: bare.to_string(),
        nonce,
        credential,
    })
}

impl ServerFirst {
    /// Checks client-final's proof; answers server-final and the authenticated user.
    pub fn client_final(self, client_final: &[u8]) -> Result<(String, String), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding attribute"))?;
        if STANDARD.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "channel binding differs from the GS2 header",
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let Some(credential) = self.credential else {
            return Err(ScramError::Proof);
        };
        let stored_key = STANDARD.decode(&credential.stored_key).unwrap_or_default();
        let server_key = STANDARD.decode(&credential.server_key).unwrap_or_default();
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.message, without_proof
        );
        let signature = self.mechanism.hmac(&stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::Proof);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        let computed = self.mechanism.hash(&client_key);
        if !bool::from(computed.ct_eq(&stored_key)) {
            return Err(ScramError::Proof);
        }
        let server_signature = self.mechanism.hmac(&server_key, auth_message.as_bytes());
        Ok((
            format!("v={}", STANDARD.encode(server_signature)),
            self.user,
        ))
    }
}

/// A saslname: `=2C` is ',', `=3D` is '='; any other '=' is malformed.
fn unescape(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The credential of a user stands for itself in the proof. Test helper: a client's proof.
#[cfg(test)]
fn client_proof(
    mechanism: Mechanism,
    password: &str,
    salt: &[u8],
    iterations: u32,
    auth_message: &str,
) -> Vec<u8> {
    let salted = mechanism.salted_password(password, salt, iterations);
    let client_key = mechanism.hmac(&salted, b"Client Key");
    let stored = mechanism.hash(&client_key);
    let signature = mechanism.hmac(&stored, auth_message.as_bytes());
    client_key
        .iter()
        .zip(&signature)
        .map(|(k, s)| k ^ s)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3: the SCRAM-SHA-256 example exchange, byte for byte.
    #[test]
    fn rfc_7677_example() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let credential = ScramCredential::derive(Mechanism::Sha256, "pencil", &salt, 4096);
        let first = server_first(
            Mechanism::Sha256,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            |user| (user == "user").then(|| credential.clone()),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            |_| [0; 16],
        )
        .unwrap();
        assert_eq!(
            first.message,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let (last, user) = first
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(last, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert_eq!(user, "user");
    }

    fn exchange(mechanism: Mechanism, user: &str, password: &str) -> Result<String, ScramError> {
        let credential = ScramCredential::derive(mechanism, "right", b"0123456789abcdef", 4096);
        let first = server_first(
            mechanism,
            format!("n,,n={user},r=abc").as_bytes(),
            |u| (u == "tw1").then(|| credential.clone()),
            "xyz",
            |_| [9; 16],
        )?;
        let salt = STANDARD
            .decode(
                first
                    .message
                    .split(",s=")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap(),
            )
            .unwrap();
        let without_proof = "c=biws,r=abcxyz";
        let auth = format!("n={user},r=abc,{},{without_proof}", first.message);
        let proof = client_proof(mechanism, password, &salt, 4096, &auth);
        let (_, who) = first
            .client_final(format!("{without_proof},p={}", STANDARD.encode(proof)).as_bytes())?;
        Ok(who)
    }

    #[test]
    fn both_mechanisms_accept_the_password_and_refuse_others() {
        for mechanism in [Mechanism::Sha256, Mechanism::Sha512] {
            assert_eq!(exchange(mechanism, "tw1", "right"), Ok("tw1".into()));
            assert_eq!(exchange(mechanism, "tw1", "wrong"), Err(ScramError::Proof));
            assert_eq!(
                exchange(mechanism, "nobody", "right"),
                Err(ScramError::Proof)
            );
        }
    }

    #[test]
    fn malformed_and_unsupported_first_messages_are_refused() {
        let refuse = |msg: &[u8]| {
            server_first(Mechanism::Sha256, msg, |_| None, "s", |_| [0; 16]).unwrap_err()
        };
        assert_eq!(refuse(b"p=tls-unique,,n=u,r=a"), ScramError::ChannelBinding);
        assert_eq!(refuse(b"n,a=other,n=u,r=a"), ScramError::AuthzId);
        assert_eq!(refuse(b"n,,n=u,r=a,tokenauth=true"), ScramError::Token);
        assert!(matches!(refuse(b"n,,n=u"), ScramError::Malformed(_)));
        assert!(matches!(refuse(b"n,,n=u=x,r=a"), ScramError::Malformed(_)));
        assert!(matches!(refuse(b"\xff"), ScramError::Malformed(_)));
        assert!(matches!(refuse(b""), ScramError::Malformed(_)));
    }

    #[test]
    fn user_names_unescape() {
        assert_eq!(unescape("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert!(unescape("a=2").is_err());
    }
}
