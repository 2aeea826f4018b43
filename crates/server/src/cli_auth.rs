//! Client commands for authentication: API keys and grants (over HTTP, `/v1/auth/`), who
//! am I, and the first admin key made against a stopped server's data directory.
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::cli::{print_json, table};
use crate::client::{Client, bad_input, errln, outln, path_segment};

#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Who the server takes you for (the --token's principal), and its grants.
    Whoami,
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Grant, list and revoke permissions.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Make the first admin key in a data directory, with the server stopped; prints its
    /// token once. The key's principal is `admin`, granted everything.
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Make a key; its secret is shown once, in the token `<key id>.<secret>`.
    Create(KeyCreateArgs),
    /// The keys in force (never their secrets).
    List,
    /// Revoke a key: requests presenting it are refused from the next one (open binary
    /// connections within a second).
    Revoke { id: String },
}

#[derive(Debug, clap::Args)]
pub struct KeyCreateArgs {
    /// Who the key's requests come from (grants name principals and roles).
    #[arg(long)]
    principal: String,
    /// A role the key has (repeat for several).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// The tenant its requests count against (default: the principal).
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// Stops working after this long: 90d, 12h, 30m, 45s.
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum AclCommand {
    /// Allow a principal (or a role) operations on resources.
    Grant(AclGrantArgs),
    /// Every grant in force.
    List,
    /// Revoke a grant by its id.
    Revoke { id: String },
}

#[derive(Debug, clap::Args)]
pub struct AclGrantArgs {
    #[arg(long, conflicts_with = "role", required_unless_present = "role")]
    principal: Option<String>,
    #[arg(long)]
    role: Option<String>,
    /// cluster, queue, stream, group, subscription, hook, or * for every kind.
    #[arg(long)]
    resource: String,
    /// The name (a subscription is STREAM/SUBSCRIPTION), a prefix, or a glob ('*' all).
    #[arg(long, default_value = "")]
    name: String,
    /// How --name matches: exact, prefix, glob.
    #[arg(long = "match", default_value = "exact")]
    matching: String,
    /// Operations, comma-separated: produce, consume, describe, admin, set_tenant.
    #[arg(long, value_delimiter = ',', required = true)]
    ops: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// The server's data directory (the server must be stopped).
    #[arg(long, default_value = "data")]
    data: PathBuf,
}

pub fn auth(client: &Client, command: AuthCommand, as_json: bool) -> anyhow::Result<()> {
    match command {
        AuthCommand::Whoami => {
            let reply = client.get("/v1/auth/whoami")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            if reply["authentication"] == json!(false) {
                outln!("authentication is off: every request is allowed");
                return Ok(());
            }
            outln!(
                "principal {}  tenant {}  key {}{}",
                text(&reply["principal"]),
                text(&reply["tenant"]),
                text(&reply["key_id"]),
                roles_suffix(&reply["roles"])
            );
            print_acls(reply["grants"].as_array().map_or(&[][..], Vec::as_slice));
            Ok(())
        }
        AuthCommand::Key(KeyCommand::Create(args)) => {
            let mut body = json!({
                "principal": args.principal,
                "roles": args.roles,
                "description": args.description,
            });
            if let Some(tenant) = args.tenant {
                body["tenant"] = json!(tenant);
            }
            if let Some(text) = args.expires_in {
                body["expires_in_ms"] = json!(parse_duration_ms(&text)?);
            }
            let reply = client.post("/v1/auth/keys", &body)?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let key = &reply["key"];
            outln!(
                "created key {} for principal {}{}",
                text(&key["id"]),
                text(&key["principal"]),
                roles_suffix(&key["roles"])
            );
            outln!(
                "token (shown once, keep it secret): {}",
                text(&reply["token"])
            );
            Ok(())
        }
        AuthCommand::Key(KeyCommand::List) => {
            let reply = client.get("/v1/auth/keys")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = reply["keys"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|k| {
                    vec![
                        text(&k["id"]),
                        text(&k["principal"]),
                        list(&k["roles"]),
                        // No tenant of its own: the principal's.
                        if k["tenant"].is_null() {
                            text(&k["principal"])
                        } else {
                            text(&k["tenant"])
                        },
                        time(&k["expires_at_ms"]),
                        text(&k["description"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "PRINCIPAL",
                    "ROLES",
                    "TENANT",
                    "EXPIRES",
                    "DESCRIPTION",
                ],
                &rows,
            );
            Ok(())
        }
        AuthCommand::Key(KeyCommand::Revoke { id }) => {
            let reply = client.delete(&format!("/v1/auth/keys/{}", path_segment(&id)))?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            outln!("revoked key {id}");
            Ok(())
        }
        AuthCommand::Acl(AclCommand::Grant(args)) => {
            let mut body = json!({
                "resource": args.resource,
                "name": args.name,
                "match": args.matching,
                "operations": args.ops,
            });
            match (args.principal, args.role) {
                (Some(p), _) => body["principal"] = json!(p),
                (None, Some(r)) => body["role"] = json!(r),
                (None, None) => return Err(bad_input("give --principal or --role")),
            }
            let reply = client.post("/v1/auth/acls", &body)?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            outln!("granted {}", text(&reply["acl"]["id"]));
            print_acls(std::slice::from_ref(&reply["acl"]));
            Ok(())
        }
        AuthCommand::Acl(AclCommand::List) => {
            let reply = client.get("/v1/auth/acls")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            print_acls(reply["acls"].as_array().map_or(&[][..], Vec::as_slice));
            Ok(())
        }
        AuthCommand::Acl(AclCommand::Revoke { id }) => {
            let reply = client.delete(&format!("/v1/auth/acls/{}", path_segment(&id)))?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            outln!("revoked grant {id}");
            Ok(())
        }
        AuthCommand::Bootstrap(args) => bootstrap(&args, as_json),
    }
}

/// Opens the data directory (refused while a server holds it), makes the admin key and
/// its grant, closes it.
fn bootstrap(args: &BootstrapArgs, as_json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&args.data)?;
    let broker = tidewater_core::Broker::open(&args.data, tidewater_core::BrokerOptions::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "opening {}: {e} (is a server running on it? stop it first)",
                args.data.display()
            )
        })?;
    let made = runtime.block_on(async {
        if broker.auth().keys().next().is_some() {
            errln!("note: this data directory has keys already; making another admin key");
        }
        crate::auth::bootstrap(&broker, None).await
    });
    broker.shutdown();
    let made = made.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if as_json {
        print_json(&json!({ "key": made.info, "token": made.token() }));
        return Ok(());
    }
    outln!(
        "created admin key {} (principal {}, granted everything)",
        made.info.id,
        made.info.principal
    );
    outln!("token (shown once, keep it secret): {}", made.token());
    Ok(())
}

fn print_acls(acls: &[Value]) {
    let rows: Vec<Vec<String>> = acls
        .iter()
        .map(|a| {
            let who = match (&a["principal"], &a["role"]) {
                (Value::String(p), _) => format!("principal:{p}"),
                (_, Value::String(r)) => format!("role:{r}"),
                _ => "?".into(),
            };
            vec![
                text(&a["id"]),
                who,
                text(&a["resource"]),
                text(&a["name"]),
                text(&a["match"]),
                list(&a["operations"]),
            ]
        })
        .collect();
    table(
        &["ID", "WHO", "RESOURCE", "NAME", "MATCH", "OPERATIONS"],
        &rows,
    );
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(text)
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn roles_suffix(roles: &Value) -> String {
    match list(roles).as_str() {
        "-" => String::new(),
        roles => format!("  roles {roles}"),
    }
}

/// When a key expires, from now.
fn time(v: &Value) -> String {
    let Some(at) = v.as_i64() else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    if at <= now {
        "expired".into()
    } else {
        format!("in {}", crate::cli::age((at - now) as u64))
    }
}

/// `90d`, `12h`, `30m`, `45s`, `500ms` as milliseconds.
fn parse_duration_ms(text: &str) -> anyhow::Result<u64> {
    let bad = || {
        bad_input(format!(
            "'{text}' is not a duration like 90d, 12h, 30m, 45s"
        ))
    };
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per).filter(|&ms| ms > 0).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("90d").unwrap(), 90 * 86_400_000);
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("12").is_err());
        assert!(parse_duration_ms("h").is_err());
    }
}
