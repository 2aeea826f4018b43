//! `tidewater queue|subscription|group forecast`: the backlog forecast of one queue,
//! subscription or group (GET .../forecast), as a table or `--json`.

use serde_json::Value;

use crate::cli::{age, print_json, table};
use crate::client::{Client, outln};

/// The objectives a forecast may be asked with (the server's `[forecast]` defaults
/// otherwise).
#[derive(Debug, Default, clap::Args)]
pub struct ObjectiveFlags {
    /// Measure the rates over this window (ms; default: the server's [forecast]
    /// rate_window_ms, 60000).
    #[arg(long, value_name = "MS")]
    rate_window_ms: Option<u64>,
    /// The oldest message should be younger than this (ms; default: [forecast]
    /// age_objective_ms, 300000).
    #[arg(long, value_name = "MS")]
    age_objective_ms: Option<u64>,
    /// Consumers needed to drain the backlog within this (ms; default: [forecast]
    /// drain_target_ms, 300000).
    #[arg(long, value_name = "MS")]
    drain_target_ms: Option<u64>,
}

impl ObjectiveFlags {
    fn query(&self) -> String {
        let parts: Vec<String> = [
            ("rate_window_ms", self.rate_window_ms),
            ("age_objective_ms", self.age_objective_ms),
            ("drain_target_ms", self.drain_target_ms),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// Fetches `{path}/forecast` and prints it.
pub fn show(
    client: &Client,
    path: &str,
    what: &str,
    flags: &ObjectiveFlags,
    as_json: bool,
) -> anyhow::Result<()> {
    let reply = client.get(&format!("{path}/forecast{}", flags.query()))?;
    if as_json {
        print_json(&reply);
        return Ok(());
    }
    let f = &reply["forecast"];
    outln!("{what}: {}", summary(f));
    table(&["FIGURE", "VALUE"], &rows(f, reply["kind"] == "group"));
    Ok(())
}

/// One line: where the backlog is going.
pub(crate) fn summary(f: &Value) -> String {
    match f["trend"].as_str().unwrap_or("unknown") {
        "empty" => "empty".into(),
        "draining" => format!("draining, empty in {}", ms(&f["drain_ms"])),
        "growing" => "growing: arrivals outpace service".into(),
        "stalled" => "stalled: nothing arrives and nothing is served".into(),
        _ => "not enough history yet to measure rates".into(),
    }
}

/// What holds the service, when a limit of the queue's own does: more consumers would not
/// help.
fn limit(f: &Value) -> Option<String> {
    match f["limited_by"].as_str()? {
        "dispatch_rate" => Some(format!(
            "dispatch rate {}: more consumers would be handed nothing more",
            rate(&f["service_ceiling_per_s"])
        )),
        "max_in_flight" => Some(
            "max_in_flight: every lease it allows is held; more consumers would be handed nothing more"
                .into(),
        ),
        "key_concurrency" => Some(
            "key_concurrency: every ready message waits for a slot of its key; more consumers would be handed nothing more (tidewater queue busiest)"
                .into(),
        ),
        other => Some(other.into()),
    }
}

fn ms(v: &Value) -> String {
    match v.as_u64() {
        Some(0) => "0s".into(),
        Some(ms) => age(ms),
        None => "-".into(),
    }
}

fn rate(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |r| format!("{r:.1}/s"))
}

fn rows(f: &Value, group: bool) -> Vec<Vec<String>> {
    let n = |k: &str| f[k].as_u64().map_or("-".into(), |n| n.to_string());
    let per_consumer = match (
        f["per_consumer_per_s"].as_f64(),
        f["per_consumer_source"].as_str(),
    ) {
        (Some(r), Some("busy")) => format!("{r:.1}/s (measured busy)"),
        (Some(r), _) => format!("{r:.1}/s (a lower bound: consumers were idle)"),
        _ => "-".into(),
    };
    let breach = match f["age_objective_breach_ms"].as_u64() {
        Some(0) => "crossed now".to_string(),
        Some(ms) => format!("crossed in {}", age(ms)),
        None => "not heading there".into(),
    };
    // A group has lag: no leases, no delays; its oldest is the oldest record not consumed.
    let head = if group {
        vec![
            vec!["lag".into(), n("backlog")],
            vec!["oldest not consumed".into(), ms(&f["oldest_age_ms"])],
        ]
    } else {
        vec![
            vec!["backlog".into(), n("backlog")],
            vec!["ready".into(), n("ready")],
            vec!["in flight".into(), n("in_flight")],
            vec!["delayed".into(), n("delayed")],
            vec!["oldest age".into(), ms(&f["oldest_age_ms"])],
        ]
    };
    let tail = vec![
        vec!["arrival rate".into(), rate(&f["arrival_per_s"])],
        vec!["service rate".into(), rate(&f["service_per_s"])],
        vec!["rate window".into(), ms(&f["window_ms"])],
        vec![
            if group { "members" } else { "consumers" }.into(),
            n("consumers"),
        ],
        vec!["per consumer".into(), per_consumer],
        vec!["drain time".into(), ms(&f["drain_ms"])],
        vec![
            format!("age objective {}", ms(&f["age_objective_ms"])),
            breach,
        ],
        vec![
            format!("consumers needed (drain in {})", ms(&f["drain_target_ms"])),
            n("consumers_needed"),
        ],
    ];
    let limited = limit(f).map(|why| vec!["limited by".into(), why]);
    head.into_iter().chain(tail).chain(limited).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_limit_has_a_row_that_says_more_consumers_would_not_help() {
        let mut f = json!({"trend": "growing", "backlog": 10, "limited_by": null,
            "service_ceiling_per_s": 40.0, "consumers_needed": 4});
        assert!(!super::rows(&f, false).iter().any(|r| r[0] == "limited by"));
        f["limited_by"] = json!("dispatch_rate");
        let rows = super::rows(&f, false);
        let row = rows.iter().find(|r| r[0] == "limited by").unwrap();
        assert_eq!(
            row[1],
            "dispatch rate 40.0/s: more consumers would be handed nothing more"
        );
        f["limited_by"] = json!("max_in_flight");
        assert!(
            super::limit(&f)
                .unwrap()
                .starts_with("max_in_flight: every lease")
        );
    }
}
