//! Redrive: moving messages out of a dead-letter queue at a bounded rate.

use crate::queue::RecordSource as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tidewater_storage::Record;
use tokio::sync::Notify;

use super::guard::Settling;
use super::{Broker, QueueHandle, storage_error};
use crate::error::{BrokerError, ErrorCode};
use crate::plan::dead_letter::headers_as_text;
use crate::plan::dead_letter::{HEADER_SOURCE_QUEUE, redrive_matches};
use crate::plan::message::header;
use crate::queue::Unacked;

/// Redrives remembered for progress queries.
const MAX_REDRIVES_KEPT: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct RedriveRequest {
    /// Target queue; None = each message's source queue.
    pub to: Option<String>,
    pub rate_per_s: u64,
    /// 0 = all.
    pub max: u64,
    /// Only messages with this key.
    pub key: Option<String>,
    /// Only messages whose last error contains this text.
    pub error_contains: Option<String>,
    /// Only these messages, by id (the console's "redrive selected"); at most
    /// `max_receive_messages` of them.
    pub ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedriveProgress {
    pub id: String,
    pub queue: String,
    pub moved: u64,
    pub remaining: u64,
    pub skipped: u64,
    pub state: &'static str,
    pub error: Option<String>,
}

/// A redrive kept for progress queries and cancellation.
pub(super) struct RedriveTask {
    progress: Mutex<RedriveProgress>,
    /// The fixed target, if any (None: each message's source queue).
    to: Option<String>,
    cancel: AtomicBool,
    wake: Notify,
}

impl RedriveTask {
    fn running(&self) -> bool {
        self.progress.lock().state == "running"
    }
}

impl Broker {
    /// Starts moving messages out of a dead-letter queue at a bounded rate. A redrive moves
    /// only what the queue held when it started (never what arrives later, so it ends), never
    /// into the queue it reads from, and never against a running redrive the other way.
    pub fn start_redrive(
        &self,
        dlq: &str,
        req: RedriveRequest,
    ) -> Result<RedriveProgress, BrokerError> {
        let handle = self.queue(dlq)?;
        if req.rate_per_s == 0 || req.rate_per_s > 100_000 {
            return Err(BrokerError::invalid("rate_per_s must be 1..=100000"));
        }
        if let Some(ids) = &req.ids {
            let max = self.inner.limits.max_receive_messages;
            if ids.is_empty() || ids.len() > max {
                return Err(BrokerError::invalid(format!(
                    "ids must name 1 to {max} messages (max_receive_messages)"
                )));
            }
        }
        if let Some(to) = &req.to {
            // A queue, or a subscription (`stream/subscription`: into its own log, so only
            // it sees the messages again).
            self.resolve(to)?;
            if to == dlq {
                return Err(BrokerError::new(
                    ErrorCode::ConfigConflict,
                    format!("a redrive cannot move messages from '{dlq}' into '{dlq}' itself"),
                ));
            }
        }
        let mut redrives = self.inner.redrives.lock();
        if let Some(to) = &req.to
            && let Some(other) = redrives.iter().find(|r| {
                r.running() && r.to.as_deref() == Some(dlq) && r.progress.lock().queue == *to
            })
        {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                format!(
                    "redrive {} is moving messages from '{to}' into '{dlq}': this one would move them back (a cycle); cancel it first",
                    other.progress.lock().id
                ),
            ));
        }
        if redrives.len() >= MAX_REDRIVES_KEPT {
            // Forget the oldest finished one; if all are running, refuse.
            let Some(at) = redrives.iter().position(|r| !r.running()) else {
                return Err(BrokerError::new(
                    ErrorCode::Overloaded,
                    format!("{MAX_REDRIVES_KEPT} redrives are running; wait for one to finish or cancel one"),
                )
                .retry_after(1_000));
            };
            redrives.remove(at);
        }
        let id = format!(
            "rd-{}",
            self.inner.next_redrive.fetch_add(1, Ordering::Relaxed)
        );
        let (total, end) = {
            let state = handle.state.lock();
            (state.unsettled(), state.visible_end())
        };
        let task = Arc::new(RedriveTask {
            progress: Mutex::new(RedriveProgress {
                id: id.clone(),
                queue: dlq.to_string(),
                moved: 0,
                remaining: match (req.max, &req.ids) {
                    (_, Some(ids)) => total.min(ids.len() as u64),
                    (0, None) => total,
                    (max, None) => total.min(max),
                },
                skipped: 0,
                state: "running",
                error: None,
            }),
            to: req.to.clone(),
            cancel: AtomicBool::new(false),
            wake: Notify::new(),
        });
        redrives.push(task.clone());
        drop(redrives);
        let broker = self.clone();
        let snapshot = task.progress.lock().clone();
        tokio::spawn(async move {
            let result = broker.run_redrive(&handle, &req, end, &task).await;
            let mut p = task.progress.lock();
            match result {
                Ok(()) if task.cancel.load(Ordering::SeqCst) => p.state = "cancelled",
                Ok(()) => {
                    p.state = "done";
                    p.remaining = 0;
                }
                Err(err) => {
                    p.state = "failed";
                    p.error = Some(err.to_string());
                }
            }
        });
        Ok(snapshot)
    }

    pub fn redrive_progress(&self, id: &str) -> Result<RedriveProgress, BrokerError> {
        self.find_redrive(id).map(|r| r.progress.lock().clone())
    }

    pub(super) fn find_redrive(&self, id: &str) -> Result<Arc<RedriveTask>, BrokerError> {
        let redrives = self.inner.redrives.lock();
        redrives
            .iter()
            .find(|r| r.progress.lock().id == id)
            .cloned()
            .ok_or_else(|| {
                BrokerError::new(ErrorCode::RedriveNotFound, format!("no redrive '{id}'"))
            })
    }

    /// Redrives kept (the last 100), oldest first.
    pub fn list_redrives(&self) -> Vec<RedriveProgress> {
        let redrives = self.inner.redrives.lock();
        redrives.iter().map(|r| r.progress.lock().clone()).collect()
    }

    /// Stops a running redrive after the step in progress (what it moved stays moved).
    /// Cancelling a finished one changes nothing.
    pub async fn cancel_redrive(&self, id: &str) -> Result<RedriveProgress, BrokerError> {
        let task = self.find_redrive(id)?;
        task.cancel.store(true, Ordering::SeqCst);
        task.wake.notify_one();
        // The task notices within one step; wait (bounded) so the reply shows the end.
        for _ in 0..100 {
            if !task.running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(task.progress.lock().clone())
    }

    pub(super) async fn run_redrive(
        &self,
        dlq: &Arc<QueueHandle>,
        req: &RedriveRequest,
        end: u64,
        task: &RedriveTask,
    ) -> Result<(), BrokerError> {
        let progress = &task.progress;
        let steps_per_s = req.rate_per_s.clamp(1, 10);
        let per_step = (req.rate_per_s / steps_per_s).clamp(1, 1_000) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(1_000 / steps_per_s));
        let mut scan_from = 0u64;
        let mut moved_total = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = task.wake.notified() => {}
            }
            if task.cancel.load(Ordering::SeqCst) || dlq.deleted.load(Ordering::SeqCst) {
                return Ok(());
            }
            let budget = if req.max > 0 {
                (req.max - moved_total).min(per_step as u64) as usize
            } else {
                per_step
            };
            if budget == 0 {
                return Ok(());
            }
            // Only what the queue held at the start: a redrive always ends.
            let mut offsets = dlq.state.lock().pending_offsets(scan_from, budget * 4);
            offsets.retain(|&offset| offset < end);
            let Some(&last) = offsets.last() else {
                return Ok(());
            };
            scan_from = last + 1;
            // Read, filter, group by target.
            let mut by_target: HashMap<String, Vec<Record>> = HashMap::new();
            let mut skipped = 0;
            for offset in offsets {
                if by_target.values().map(Vec::len).sum::<usize>() >= budget {
                    scan_from = offset;
                    break;
                }
                let Some(record) = dlq.reader.read(offset, 1, 1).map_err(storage_error)?.pop()
                else {
                    continue;
                };
                if record.offset != offset || !redrive_matches(&record, req) {
                    skipped += 1;
                    continue;
                }
                let target = req
                    .to
                    .clone()
                    .or_else(|| header(&record, HEADER_SOURCE_QUEUE));
                match target {
                    // Never into the queue it reads from.
                    Some(target) if target != dlq.name => {
                        by_target.entry(target).or_default().push(record);
                    }
                    _ => skipped += 1,
                }
            }
            let mut moved = 0;
            for (target_name, records) in by_target {
                let Ok(target) = self.resolve(&target_name) else {
                    skipped += records.len() as u64;
                    continue;
                };
                let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
                let claimed: std::collections::HashSet<u64> =
                    dlq.state.lock().claim(&offsets).into_iter().collect();
                let records: Vec<(Record, Vec<(String, String)>)> = records
                    .into_iter()
                    .filter(|r| claimed.contains(&r.offset))
                    .map(|r| {
                        let headers = headers_as_text(&r);
                        (r, headers)
                    })
                    .collect();
                let items = records
                    .iter()
                    .map(|(r, _)| Unacked {
                        offset: r.offset,
                        delivery_count: 0,
                        size: r.size(),
                    })
                    .collect();
                let settling = Settling::marked(dlq, items, &self.inner.clock);
                let n = settling.len() as u64;
                self.move_records(&target, dlq, records, settling, |state, n| {
                    state.counters.redriven += n;
                })
                .await?;
                moved += n;
            }
            moved_total += moved;
            let remaining = dlq.state.lock().unsettled();
            let mut p = progress.lock();
            p.moved = moved_total;
            p.skipped += skipped;
            p.remaining = remaining.saturating_sub(p.skipped);
            if req.max > 0 {
                p.remaining = p.remaining.min(req.max - moved_total);
            }
        }
    }
}
