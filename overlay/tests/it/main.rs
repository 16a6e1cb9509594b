//! Integration tests of the overlay: in-process nodes on 127.0.0.1, port 0,
//! seeded identities, and event waits with timeouts.

mod adversarial;
mod budget;
mod jobs;
mod mesh;

use std::{future::Future, time::Duration};

use silk_overlay::OverlayEvent;
use tokio::sync::mpsc;

/// Upper bound for any single wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Waits for the first event `pick` maps to `Some`, skipping others.
pub(crate) async fn next_event<T>(
    events: &mut mpsc::Receiver<OverlayEvent>,
    what: &str,
    mut pick: impl FnMut(OverlayEvent) -> Option<T>,
) -> T {
    let wait = async {
        while let Some(event) = events.recv().await {
            if let Some(found) = pick(event) {
                return Some(found);
            }
        }
        None
    };
    match tokio::time::timeout(WAIT, wait).await {
        Ok(Some(found)) => found,
        Ok(None) => panic!("event stream ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {WAIT:?}"),
    }
}

/// Re-evaluates `check` (every 20 ms) until it yields `Some`, or panics after [`WAIT`].
pub(crate) async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

/// [`eventually`] with another limit than [`WAIT`].
pub(crate) async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let wait = async {
        loop {
            poll.tick().await;
            if let Some(found) = check().await {
                return found;
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(found) => found,
        Err(_) => panic!("{what} did not happen within {limit:?}"),
    }
}
