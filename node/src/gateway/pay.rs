//! The gateway's payments around one job: the worst case reserved on the
//! lane to the worker before the job, the job settled with what was
//! delivered after it, and the cumulative cheque delivered to the worker,
//! re-sent by the courier until the worker answers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use silk_overlay::{JobFrame, OverlayHandle, PeerId};

use super::routing::Candidate;
use super::Gateway;
use crate::billing::{Billing, Delivery};
use crate::payments::Reservation;
use crate::protocol::{self, JobMessage, JobRequest, JobUsage, PaymentTerms};

impl Gateway {
    /// Reserves the job's worst case on the lane to `c`, which is paid at
    /// `payout`.
    pub(crate) async fn prepare_payment(
        &self,
        billing: &Arc<Billing>,
        c: &Candidate,
        payout: &str,
        max_coefficient_milli: u32,
        request: &JobRequest,
    ) -> Result<PaidJob, String> {
        let worker: silk_chain::Address = payout
            .parse()
            .map_err(|e| format!("announces an unusable payout address {payout:?}: {e}"))?;
        let coefficient_milli = u32::try_from(c.price_milli)
            .map_err(|_| format!("announces an absurd coefficient {}", c.price_milli))?;
        let prompt_bound = request.prompt_tokens_bound();
        let (reservation, terms) = billing
            .reserve(
                &worker,
                coefficient_milli,
                Some(max_coefficient_milli),
                prompt_bound,
                u64::from(request.max_tokens),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(PaidJob {
            billing: Arc::clone(billing),
            reservation,
            terms,
            coefficient_milli,
            prompt_bound,
        })
    }
}

/// A job's payment while it runs on a remote worker.
pub(crate) struct PaidJob {
    billing: Arc<Billing>,
    reservation: Reservation,
    terms: PaymentTerms,
    coefficient_milli: u32,
    prompt_bound: u64,
}

impl PaidJob {
    /// The terms the worker is told.
    pub(crate) fn terms(&self) -> &PaymentTerms {
        &self.terms
    }

    /// Gives the reservation back: no worker took the job.
    pub(crate) async fn release(self) {
        self.billing.release(self.reservation).await;
    }

    /// Settles the job (`usage` absent when it failed midway, `delivery`
    /// what the caller got) and sends the cheque to `peer` in the
    /// background. Returns the cost, or `None` if settling failed.
    pub(crate) async fn finish(
        self,
        overlay: &OverlayHandle,
        peer: PeerId,
        usage: Option<&JobUsage>,
        delivery: Delivery,
    ) -> Option<silk_chain::Coins> {
        match self
            .billing
            .settle(
                self.reservation,
                &self.terms,
                self.coefficient_milli,
                self.prompt_bound,
                usage,
                delivery,
            )
            .await
        {
            Ok(bill) => {
                // Crash test: dead with the cheque signed and stored, and
                // neither the worker nor the caller told; the next
                // cumulative cheque must carry it.
                fail::fail_point!("gateway-cheque-signed", |_| std::process::abort());
                tokio::spawn(deliver_cheque(
                    overlay.clone(),
                    Arc::clone(&self.billing),
                    peer,
                    bill.delivery,
                ));
                Some(bill.cost)
            }
            Err(e) => {
                tracing::error!(worker = %peer, error = %e, "could not settle a job");
                None
            }
        }
    }
}

/// How often the courier looks for held cheques to re-send.
const COURIER_TICK: Duration = Duration::from_secs(2);
/// The longest the courier waits between two tries at one worker the
/// mesh announces.
const COURIER_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the courier tries a worker the mesh no longer announces: it
/// cannot be reached, and it is tried at once when its announcement is back.
const COURIER_ABSENT_RETRY: Duration = Duration::from_secs(30 * 60);

/// When the courier next tries each worker (by wallet). A worker the mesh
/// announces is tried with a backoff doubling from [`COURIER_TICK`] to
/// [`COURIER_MAX_BACKOFF`]; once a try misses a worker the mesh does not
/// announce, it waits [`COURIER_ABSENT_RETRY`], or until the worker
/// announces itself again. A gateway holding cheques for many workers that
/// left for good then dials none of them every minute, and one that comes
/// back is paid within a tick.
#[derive(Debug, Default)]
struct CourierSchedule {
    workers: HashMap<String, Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    next: Instant,
    wait: Duration,
    /// Announced when the last try missed.
    announced: bool,
}

impl CourierSchedule {
    /// Whether to try the worker with `wallet` now.
    fn due(&self, wallet: &str, announced: bool, now: Instant) -> bool {
        self.workers
            .get(wallet)
            .is_none_or(|s| now >= s.next || (announced && !s.announced))
    }

    /// A try missed the worker.
    fn missed(&mut self, wallet: String, announced: bool, now: Instant) {
        let last = self.workers.get(&wallet).copied();
        let wait = if announced {
            last.filter(|s| s.announced)
                .map_or(COURIER_TICK, |s| (s.wait * 2).min(COURIER_MAX_BACKOFF))
        } else {
            COURIER_ABSENT_RETRY
        };
        self.workers.insert(
            wallet,
            Slot {
                next: now + wait,
                wait,
                announced,
            },
        );
    }

    /// The worker took its cheque (or refused it for good).
    fn delivered(&mut self, wallet: &str) {
        self.workers.remove(wallet);
    }

    /// Forgets workers with no cheque held any more.
    fn retain(&mut self, held: impl Fn(&str) -> bool) {
        self.workers.retain(|w, _| held(w));
    }
}

/// How a worker answered one try at delivering a cheque.
enum Answer {
    /// It stored the cheque.
    Acknowledged,
    /// It refused it: sending it again changes nothing.
    Refused,
    /// No answer (unreachable, stopped midway): try again later.
    Unreachable,
    /// This node is shutting down.
    Stopped,
}

/// One try at delivering `message` (a cheque) to `peer`.
async fn try_deliver(overlay: &OverlayHandle, peer: PeerId, message: Vec<u8>) -> Answer {
    let stream =
        tokio::time::timeout(Duration::from_secs(10), overlay.open_job(peer, message)).await;
    let mut stream = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(silk_overlay::OverlayError::Stopped)) => return Answer::Stopped,
        Ok(Err(e)) => {
            tracing::debug!(worker = %peer, error = %e, "cheque delivery failed");
            return Answer::Unreachable;
        }
        Err(_) => return Answer::Unreachable,
    };
    match tokio::time::timeout(Duration::from_secs(10), stream.next_frame()).await {
        Ok(Some(Ok(JobFrame::End(bytes)))) => {
            match postcard::from_bytes::<protocol::ChequeAck>(&bytes) {
                Ok(ack) => {
                    tracing::debug!(worker = %peer, cumulative = ack.cumulative_nano, outstanding = ack.outstanding_nano, "cheque acknowledged")
                }
                Err(e) => tracing::warn!(worker = %peer, error = %e, "undecodable cheque ack"),
            }
            Answer::Acknowledged
        }
        Ok(Some(Ok(JobFrame::Error { code, message }))) => {
            tracing::warn!(worker = %peer, ?code, %message, "worker refused a cheque");
            Answer::Refused
        }
        other => {
            tracing::debug!(worker = %peer, ?other, "no cheque ack");
            Answer::Unreachable
        }
    }
}

/// Sends a job's cheque to the worker that earned it, retrying a few times.
/// A cheque that gets no answer is held (in the payments store) and the
/// courier ([`Gateway::cheque_courier`]) re-sends it until the worker
/// answers; a later cheque on the lane covers it (they are cumulative).
async fn deliver_cheque(
    overlay: OverlayHandle,
    billing: Arc<Billing>,
    peer: PeerId,
    delivery: protocol::ChequeDelivery,
) {
    let message = protocol::encode(&JobMessage::Cheque(delivery.clone()));
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match try_deliver(&overlay, peer, message.clone()).await {
            Answer::Acknowledged | Answer::Refused => {
                billing.delivered(&delivery).await;
                return;
            }
            Answer::Stopped => break,
            Answer::Unreachable => {}
        }
    }
    tracing::info!(worker = %peer, job = delivery.job, "cheque not delivered; held to re-send");
    billing.hold_undelivered(peer.to_string(), &delivery).await;
}

impl Gateway {
    /// Re-sends every held cheque (see [`deliver_cheque`]) until its worker
    /// answers, on a [`CourierSchedule`]; held
    /// cheques survive a restart, so this also finishes what the last run
    /// left undelivered. Runs until the node stops.
    pub async fn cheque_courier(self: Arc<Self>) {
        let Some(billing) = self.billing.clone() else {
            return;
        };
        let mut schedule = CourierSchedule::default();
        let mut tick = tokio::time::interval(COURIER_TICK);
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let held = billing.undelivered().await;
            schedule.retain(|w| {
                held.iter()
                    .any(|(_, d)| d.cheque.cheque.worker.to_raw() == w)
            });
            if held.is_empty() {
                continue;
            }
            let announced: HashSet<String> = self
                .known_workers()
                .iter()
                .map(|a| a.peer_id.to_string())
                .collect();
            let now = Instant::now();
            let due: Vec<_> = held
                .into_iter()
                .filter(|(peer, d)| {
                    schedule.due(
                        &d.cheque.cheque.worker.to_raw(),
                        announced.contains(peer),
                        now,
                    )
                })
                .collect();
            let tries = due.into_iter().map(|(peer, d)| {
                let overlay = self.overlay.clone();
                async move {
                    let answer = match peer.parse::<PeerId>() {
                        Ok(p) => {
                            try_deliver(&overlay, p, protocol::encode(&JobMessage::Cheque(d.clone())))
                                .await
                        }
                        Err(e) => {
                            // Only this node writes the store; a bad id there
                            // is a defect, and no retry can fix it.
                            tracing::error!(peer, error = %e, "a held cheque names no valid peer; dropped");
                            Answer::Refused
                        }
                    };
                    (peer, d, answer)
                }
            });
            for (peer, d, answer) in futures::future::join_all(tries).await {
                let wallet = d.cheque.cheque.worker.to_raw();
                match answer {
                    Answer::Acknowledged | Answer::Refused => {
                        tracing::info!(worker = %d.cheque.cheque.worker, job = d.job, cumulative = d.cheque.cheque.cumulative.nano(), "held cheque delivered");
                        billing.delivered(&d).await;
                        schedule.delivered(&wallet);
                    }
                    Answer::Stopped => return,
                    Answer::Unreachable => {
                        schedule.missed(wallet, announced.contains(&peer), Instant::now());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_worker_is_retried_with_a_doubling_backoff_up_to_a_minute() {
        let mut s = CourierSchedule::default();
        let t0 = Instant::now();
        assert!(s.due("w", true, t0), "a new cheque goes out at once");
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            s.missed("w".into(), true, now);
            let wait = s.workers["w"].wait;
            assert!(!s.due("w", true, now + wait - Duration::from_millis(1)));
            assert!(s.due("w", true, now + wait));
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
        s.delivered("w");
        assert!(
            s.due("w", true, now),
            "delivered: the next cheque goes at once"
        );
    }

    #[test]
    fn a_worker_gone_from_the_mesh_is_left_alone_until_it_announces_again() {
        let mut s = CourierSchedule::default();
        let t0 = Instant::now();
        // Missed while announced, then it left the mesh.
        s.missed("w".into(), true, t0);
        assert!(s.due("w", false, t0 + COURIER_TICK));
        s.missed("w".into(), false, t0 + COURIER_TICK);
        for minutes in [1, 10, 29] {
            let later = t0 + Duration::from_secs(60 * minutes);
            assert!(
                !s.due("w", false, later),
                "tried again after {minutes} min while gone"
            );
        }
        // Its announcement is back: tried at the next tick, not in half an hour.
        assert!(s.due("w", true, t0 + Duration::from_secs(60)));
        // Still gone after the retry period: tried once more, then left again.
        let retry = t0 + COURIER_TICK + COURIER_ABSENT_RETRY;
        assert!(s.due("w", false, retry));
        s.missed("w".into(), false, retry);
        assert!(!s.due("w", false, retry + Duration::from_secs(60)));
        // Announced and missed again: the backoff starts over from a tick.
        s.missed("w".into(), true, retry);
        assert_eq!(s.workers["w"].wait, COURIER_TICK);
        s.retain(|w| w != "w");
        assert!(s.workers.is_empty());
    }
}
