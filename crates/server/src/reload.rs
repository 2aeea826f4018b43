//! Files loaded again without a restart (the TLS certificate, the identity provider's
//! JWKS): at SIGHUP (`systemctl reload`), and when a check every so often finds them
//! changed. What a file that does not load does is the caller's (both keep what is in
//! force).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// Until the process ends: `reload` at each SIGHUP, `reload_if_changed` every `every`
/// (never without one).
pub(crate) fn spawn(
    every: Option<Duration>,
    reload: impl Fn() + Send + 'static,
    reload_if_changed: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = signal(SignalKind::hangup()).ok();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let tick = async {
                match every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = hup => reload(),
                () = tick => reload_if_changed(),
            }
        }
    })
}
