//! Who may do what: operations, resources, and the grants (ACLs) that allow an operation on
//! the resources a pattern matches. Nothing is allowed that no grant allows.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What a request does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Publish to a queue, produce to a stream.
    Produce,
    /// Receive, ack, nack, extend; fetch a stream; join a group and commit its offsets.
    Consume,
    /// Read state: stats, configuration, peek, lag, metadata.
    Describe,
    /// Create, configure, purge, delete, redrive, reset offsets; on the cluster: keys and
    /// ACLs.
    Admin,
    /// Publish or produce with a tenant other than one's own (gateways publishing on
    /// behalf of others).
    SetTenant,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Produce,
        Operation::Consume,
        Operation::Describe,
        Operation::Admin,
        Operation::SetTenant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Describe => "describe",
            Operation::Admin => "admin",
            Operation::SetTenant => "set_tenant",
        }
    }

    pub fn parse(text: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.as_str() == text)
    }

    /// Whether a grant of `self` allows `wanted`: an operation allows itself, and whoever
    /// may produce, consume or administer a resource may also describe it (as Kafka's
    /// READ, WRITE and ALTER imply DESCRIBE).
    pub fn allows(self, wanted: Operation) -> bool {
        self == wanted
            || (wanted == Operation::Describe
                && matches!(
                    self,
                    Operation::Produce | Operation::Consume | Operation::Admin
                ))
    }
}

/// The kinds of resources requests act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// The server as a whole: keys, ACLs, metrics, listing.
    Cluster,
    Queue,
    Stream,
    Group,
    /// A stream's work-queue subscription, named `stream/subscription`.
    Subscription,
    /// A webhook ingress.
    Hook,
    /// A push endpoint (delivery to a URL).
    Push,
    /// In a grant only: every kind.
    #[serde(rename = "*")]
    Any,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 8] = [
        ResourceKind::Cluster,
        ResourceKind::Queue,
        ResourceKind::Stream,
        ResourceKind::Group,
        ResourceKind::Subscription,
        ResourceKind::Hook,
        ResourceKind::Push,
        ResourceKind::Any,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Cluster => "cluster",
            ResourceKind::Queue => "queue",
            ResourceKind::Stream => "stream",
            ResourceKind::Group => "group",
            ResourceKind::Subscription => "subscription",
            ResourceKind::Hook => "hook",
            ResourceKind::Push => "push",
            ResourceKind::Any => "*",
        }
    }

    pub fn parse(text: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// The operations that mean something on this kind (a grant of any other is refused).
    pub fn operations(self) -> &'static [Operation] {
        use Operation::*;
        match self {
            ResourceKind::Cluster => &[Describe, Admin],
            ResourceKind::Queue | ResourceKind::Stream => {
                &[Produce, Consume, Describe, Admin, SetTenant]
            }
            ResourceKind::Group | ResourceKind::Subscription => &[Consume, Describe, Admin],
            ResourceKind::Hook => &[Produce, Describe, Admin, SetTenant],
            ResourceKind::Push => &[Describe, Admin],
            ResourceKind::Any => &Operation::ALL,
        }
    }
}

/// One resource a request acts on. The cluster's name is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    pub kind: ResourceKind,
    pub name: &'a str,
}

impl<'a> Resource<'a> {
    pub const CLUSTER: Resource<'static> = Resource {
        kind: ResourceKind::Cluster,
        name: "",
    };

    pub fn new(kind: ResourceKind, name: &'a str) -> Resource<'a> {
        Resource { kind, name }
    }
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == ResourceKind::Cluster {
            f.write_str("the cluster")
        } else {
            write!(f, "{} '{}'", self.kind.as_str(), self.name)
        }
    }
}

/// How a grant's name matches resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// The name itself.
    #[default]
    Exact,
    /// Every name that starts with it.
    Prefix,
    /// `*` matches any run of characters (none included), `?` any one character.
    Glob,
}

impl Match {
    pub fn as_str(self) -> &'static str {
        match self {
            Match::Exact => "exact",
            Match::Prefix => "prefix",
            Match::Glob => "glob",
        }
    }

    pub fn parse(text: &str) -> Option<Match> {
        [Match::Exact, Match::Prefix, Match::Glob]
            .into_iter()
            .find(|m| m.as_str() == text)
    }

    pub fn matches(self, pattern: &str, name: &str) -> bool {
        match self {
            Match::Exact => pattern == name,
            Match::Prefix => name.starts_with(pattern),
            Match::Glob => glob(pattern.as_bytes(), name.as_bytes()),
        }
    }
}

/// `*` and `?` over bytes (names are ASCII), in time linear in both lengths times the
/// stars' backtracking, without recursion: the classic two-pointer walk that remembers the
/// last star.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// To whom a grant applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// One principal (`anonymous` for requests without credentials).
    Principal(String),
    /// Every principal with this role (a key's roles, or a JWT's roles claim).
    Role(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Principal(p) => write!(f, "principal '{p}'"),
            Subject::Role(r) => write!(f, "role '{r}'"),
        }
    }
}

/// A grant: `subject` may perform `operations` on the resources of kind `resource` whose
/// names `name` matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    pub id: String,
    #[serde(flatten)]
    pub subject: Subject,
    pub resource: ResourceKind,
    pub name: String,
    #[serde(rename = "match")]
    pub matching: Match,
    pub operations: BTreeSet<Operation>,
    pub created_at_ms: i64,
}

impl Acl {
    pub fn applies_to(&self, resource: &Resource<'_>) -> bool {
        (self.resource == ResourceKind::Any || self.resource == resource.kind)
            && (resource.kind == ResourceKind::Cluster
                || self.matching.matches(&self.name, resource.name))
    }

    pub fn allows(&self, op: Operation, resource: &Resource<'_>) -> bool {
        self.applies_to(resource) && self.operations.iter().any(|g| g.allows(op))
    }
}

/// A grant as asked for, before it has an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclSpec {
    #[serde(flatten)]
    pub subject: Subject,
    pub resource: ResourceKind,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match", default)]
    pub matching: Match,
    pub operations: BTreeSet<Operation>,
}

/// Longest name pattern of a grant.
pub const MAX_PATTERN_LEN: usize = 512;

/// Longest principal or role name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a name of a principal, a role or a tenant: 1 to 128 bytes, no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a {what} name is 1 to {MAX_NAME_LEN} bytes, not {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("a {what} name has no control characters"));
    }
    Ok(())
}

impl AclSpec {
    /// Refuses a grant that could never allow anything, or names what cannot exist.
    pub fn validate(&self) -> Result<(), String> {
        match &self.subject {
            Subject::Principal(p) => check_name("principal", p)?,
            Subject::Role(r) => check_name("role", r)?,
        }
        if self.operations.is_empty() {
            return Err("a grant names at least one operation".into());
        }
        let valid = self.resource.operations();
        if let Some(op) = self.operations.iter().find(|op| !valid.contains(op)) {
            return Err(format!(
                "operation '{}' means nothing on a {} (it takes {})",
                op.as_str(),
                self.resource.as_str(),
                valid
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.resource == ResourceKind::Cluster {
            if !(self.name.is_empty() || self.name == "*") {
                return Err("a grant on the cluster names no resource (leave name empty)".into());
            }
            return Ok(());
        }
        if self.name.len() > MAX_PATTERN_LEN {
            return Err(format!(
                "a grant's name pattern is at most {MAX_PATTERN_LEN} bytes"
            ));
        }
        if self.name.is_empty() && self.matching != Match::Prefix {
            return Err(
                "a grant names its resources: a name, a prefix (match=prefix) or a glob (match=glob, '*' for all)"
                    .into(),
            );
        }
        if self.name.chars().any(char::is_control) {
            return Err("a grant's name pattern has no control characters".into());
        }
        Ok(())
    }

    pub fn into_acl(self, id: String, created_at_ms: i64) -> Acl {
        let name = if self.resource == ResourceKind::Cluster {
            String::new()
        } else {
            self.name
        };
        Acl {
            id,
            subject: self.subject,
            resource: self.resource,
            name,
            matching: self.matching,
            operations: self.operations,
            created_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_stars_and_question_marks() {
        let cases = [
            ("*", "", true),
            ("*", "orders", true),
            ("orders-*", "orders-eu", true),
            ("orders-*", "orders", false),
            ("*-dlq", "orders-dlq", true),
            ("*-dlq", "orders-dlq-x", false),
            ("o?ders", "orders", true),
            ("o?ders", "oders", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**", "x", true),
            ("a*", "b", false),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                glob(pattern.as_bytes(), name.as_bytes()),
                want,
                "{pattern} ~ {name}"
            );
        }
    }

    #[test]
    fn produce_consume_and_admin_imply_describe_and_nothing_else() {
        for op in Operation::ALL {
            for wanted in Operation::ALL {
                let implied = op == wanted
                    || (wanted == Operation::Describe
                        && !matches!(op, Operation::Describe | Operation::SetTenant));
                assert_eq!(op.allows(wanted), implied, "{op:?} -> {wanted:?}");
            }
        }
    }

    fn spec(kind: ResourceKind, name: &str, matching: Match, ops: &[Operation]) -> AclSpec {
        AclSpec {
            subject: Subject::Principal("alice".into()),
            resource: kind,
            name: name.into(),
            matching,
            operations: ops.iter().copied().collect(),
        }
    }

    #[test]
    fn a_grant_matches_its_kind_and_names_only() {
        let acl = spec(
            ResourceKind::Queue,
            "orders-",
            Match::Prefix,
            &[Operation::Consume],
        )
        .into_acl("a1".into(), 0);
        let queue = |n| Resource::new(ResourceKind::Queue, n);
        assert!(acl.allows(Operation::Consume, &queue("orders-eu")));
        assert!(acl.allows(Operation::Describe, &queue("orders-eu")));
        assert!(!acl.allows(Operation::Produce, &queue("orders-eu")));
        assert!(!acl.allows(Operation::Consume, &queue("order")));
        assert!(!acl.allows(
            Operation::Consume,
            &Resource::new(ResourceKind::Stream, "orders-eu")
        ));
        let all =
            spec(ResourceKind::Any, "*", Match::Glob, &Operation::ALL).into_acl("a2".into(), 0);
        assert!(all.allows(Operation::Admin, &Resource::CLUSTER));
        assert!(all.allows(Operation::SetTenant, &queue("x")));
    }

    #[test]
    fn grants_that_mean_nothing_are_refused() {
        let bad = [
            spec(
                ResourceKind::Group,
                "g",
                Match::Exact,
                &[Operation::Produce],
            ),
            spec(
                ResourceKind::Cluster,
                "",
                Match::Exact,
                &[Operation::Consume],
            ),
            spec(ResourceKind::Queue, "", Match::Exact, &[Operation::Consume]),
            spec(ResourceKind::Queue, "q", Match::Exact, &[]),
            spec(
                ResourceKind::Cluster,
                "x",
                Match::Exact,
                &[Operation::Admin],
            ),
        ];
        for spec in bad {
            assert!(spec.validate().is_err(), "{spec:?}");
        }
        assert!(
            spec(
                ResourceKind::Queue,
                "",
                Match::Prefix,
                &[Operation::Consume]
            )
            .validate()
            .is_ok()
        );
    }
}
