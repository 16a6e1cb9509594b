//! The gateway's payments around one job: the worst case reserved on the
//! lane to the worker before the job, the job settled with what was
//! delivered after it, and the cumulative cheque delivered to the worker.

use std::sync::Arc;
use std::time::Duration;

use silk_overlay::{JobFrame, OverlayHandle, PeerId};

use super::routing::Candidate;
use super::Gateway;
use crate::billing::Billing;
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

    /// Settles the job (`usage` absent when it failed midway, `delivered`
    /// the tokens the caller got) and sends the cheque to `peer` in the
    /// background. Returns the cost, or `None` if settling failed.
    pub(crate) async fn finish(
        self,
        overlay: &OverlayHandle,
        peer: PeerId,
        usage: Option<&JobUsage>,
        delivered: u32,
    ) -> Option<silk_chain::Coins> {
        match self
            .billing
            .settle(
                self.reservation,
                &self.terms,
                self.coefficient_milli,
                self.prompt_bound,
                usage,
                delivered,
            )
            .await
        {
            Ok(bill) => {
                // Crash test: dead with the cheque signed and stored, and
                // neither the worker nor the caller told; the next
                // cumulative cheque must carry it.
                fail::fail_point!("gateway-cheque-signed", |_| std::process::abort());
                tokio::spawn(deliver_cheque(overlay.clone(), peer, bill.delivery));
                Some(bill.cost)
            }
            Err(e) => {
                tracing::error!(worker = %peer, error = %e, "could not settle a job");
                None
            }
        }
    }
}

/// Sends a cheque to the worker that earned it, retrying a few times; a
/// cheque that never arrives is covered by the next one (they are cumulative).
async fn deliver_cheque(overlay: OverlayHandle, peer: PeerId, delivery: protocol::ChequeDelivery) {
    let message = protocol::encode(&JobMessage::Cheque(delivery));
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            overlay.open_job(peer, message.clone()),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(silk_overlay::OverlayError::Stopped)) => return,
            Ok(Err(e)) => {
                tracing::debug!(worker = %peer, error = %e, "cheque delivery failed; retrying");
                continue;
            }
            Err(_) => continue,
        };
        match stream.next_frame().await {
            Some(Ok(JobFrame::End(bytes))) => {
                match postcard::from_bytes::<protocol::ChequeAck>(&bytes) {
                    Ok(ack) => {
                        tracing::debug!(worker = %peer, cumulative = ack.cumulative_nano, outstanding = ack.outstanding_nano, "cheque acknowledged")
                    }
                    Err(e) => tracing::warn!(worker = %peer, error = %e, "undecodable cheque ack"),
                }
                return;
            }
            Some(Ok(JobFrame::Error { code, message })) => {
                tracing::warn!(worker = %peer, ?code, %message, "worker refused a cheque");
                return;
            }
            other => {
                tracing::debug!(worker = %peer, ?other, "no cheque ack; retrying");
            }
        }
    }
    tracing::warn!(worker = %peer, "could not deliver a cheque; the next one covers it");
}
