//! Payments in the job lifecycle: what a gateway reserves, settles and pays
//! for each job, and what a worker checks before serving and after a job.
//!
//! # Flow
//!
//! ```text
//! gateway                                         worker
//! reserve worst case on the lane (opens or
//!   tops it up on chain when needed)
//! JobMessage::Generate{.., payment: terms} ──►    admit_client (lane checked on chain
//!                                                   once, credit, lane funds)
//!                                                 start_job: a row in redb (refused
//!                                                   while that job id is open)
//!                 ◄── tokens …, usage             end_job: the tokens produced, also
//!                                                   when the stream was cancelled
//! settle: sign the cumulative cheque for
//!   the tokens actually delivered
//! JobMessage::Cheque{job, cheque}          ──►    on_cheque: check against the job's
//!                 ◄── ChequeAck                     cost, commit cheque and job in one
//!                                                   transaction, then ack
//! ```
//!
//! A job whose cheque does not arrive within [`CHEQUE_WAIT`] of its end is
//! booked as unpaid work, so a client that stops paying falls behind and,
//! past its credit, is refused. Jobs live in the payments store from
//! admission to cheque, so a restart forgets none. A gateway never pays itself: jobs it serves on its
//! own engine carry no terms.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use silk_chain::{Address, Coins};
use tokio_util::sync::CancellationToken;

use crate::payments::{Balances, Payments, PaymentsError, Reservation, UndeliveredCheque};
use crate::protocol::{ChequeAck, ChequeDelivery, JobUsage, PaymentTerms, TokenChunk};

/// How long a worker waits for the cheque of a finished job before it
/// books the job as unpaid.
pub const CHEQUE_WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Most bytes of text one token can stand for. No tokenizer silk serves
/// has a longer token; a worker sending more text than this per token of
/// `max_tokens` is refused, which also bounds what a gateway buffers.
pub const MAX_TOKEN_BYTES: u64 = 256;

/// What a gateway received of one job, and so what it pays for (audit F8):
/// completion tokens that came with text (at most one per byte of text
/// received), never more than `max_tokens`; and nothing at all, prompt
/// included, when no such token came, unless the job scored its prompt and
/// the scores came (what such a job is for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    max_tokens: u32,
    /// Alternatives per token the job asked log-probabilities with.
    logprobs: Option<u8>,
    /// Alternatives per prompt token the job asked scores with, and the
    /// most prompt tokens it can have.
    prompt_logprobs: Option<(u8, u64)>,
    ids: u32,
    text_bytes: u64,
    /// The prompt's scores came.
    scored: bool,
}

impl Delivery {
    /// A job that may generate `max_tokens`.
    pub fn new(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            logprobs: None,
            prompt_logprobs: None,
            ids: 0,
            text_bytes: 0,
            scored: false,
        }
    }

    /// The job asked its prompt scored with `top` alternatives per token;
    /// the prompt has at most `prompt_bound` tokens.
    pub fn with_prompt_logprobs(mut self, top: Option<u8>, prompt_bound: u64) -> Self {
        self.prompt_logprobs = top.map(|k| (k, prompt_bound));
        self
    }

    /// Whether the prompt is paid for: a completion token came, or the
    /// prompt's scores did.
    pub fn prompt_served(&self) -> bool {
        self.paid_tokens() > 0 || self.scored
    }

    /// The job asked for log-probabilities with `top` alternatives each.
    pub fn with_logprobs(mut self, top: Option<u8>) -> Self {
        self.logprobs = top;
        self
    }

    /// Whether a chunk's log-probabilities are what the job asked for: at
    /// most one per token, each a probability's log (≤ 0, not NaN) with at
    /// most the asked number of alternatives, every token's bytes within
    /// [`MAX_TOKEN_BYTES`]; none when none were asked.
    fn check_logprobs(&self, chunk: &TokenChunk) -> Result<(), String> {
        self.check_prompt_logprobs(chunk)?;
        if chunk.logprobs.is_empty() {
            return Ok(());
        }
        let Some(top) = self.logprobs else {
            return Err("sent log-probabilities the job did not ask for".into());
        };
        if chunk.logprobs.len() > chunk.ids.len() {
            return Err(format!(
                "sent {} log-probabilities for {} tokens",
                chunk.logprobs.len(),
                chunk.ids.len()
            ));
        }
        let bad = |lp: f32| lp.is_nan() || lp > 0.0;
        let long = |b: &[u8]| b.len() as u64 > MAX_TOKEN_BYTES;
        for t in &chunk.logprobs {
            if bad(t.logprob) || long(&t.bytes) || t.top.len() > usize::from(top) {
                return Err(format!(
                    "sent a malformed log-probability (logprob {}, {} bytes, {} alternatives of {top} asked)",
                    t.logprob,
                    t.bytes.len(),
                    t.top.len()
                ));
            }
            if t.top.iter().any(|a| bad(a.logprob) || long(&a.bytes)) {
                return Err("sent a malformed alternative log-probability".into());
            }
        }
        Ok(())
    }

    /// Whether a chunk's prompt scores are what the job asked for: only
    /// when asked, once, before any token, in a chunk of nothing else, at
    /// most one per prompt token, each well-formed.
    fn check_prompt_logprobs(&self, chunk: &TokenChunk) -> Result<(), String> {
        if chunk.prompt_logprobs.is_empty() {
            return Ok(());
        }
        let Some((top, bound)) = self.prompt_logprobs else {
            return Err("sent prompt log-probabilities the job did not ask for".into());
        };
        if self.scored || self.ids > 0 || !chunk.ids.is_empty() || !chunk.text.is_empty() {
            return Err(
                "sent prompt log-probabilities after the prompt was scored or the answer began"
                    .into(),
            );
        }
        if chunk.prompt_logprobs.len() as u64 > bound {
            return Err(format!(
                "sent {} prompt log-probabilities for a prompt of at most {bound} tokens",
                chunk.prompt_logprobs.len()
            ));
        }
        let bad = |lp: f32| lp.is_nan() || lp > 0.0;
        let long = |b: &[u8]| b.len() as u64 > MAX_TOKEN_BYTES;
        for t in &chunk.prompt_logprobs {
            if bad(t.logprob)
                || long(&t.bytes)
                || t.top.len() > usize::from(top)
                || t.top.iter().any(|a| bad(a.logprob) || long(&a.bytes))
            {
                return Err("sent a malformed prompt log-probability".into());
            }
        }
        Ok(())
    }

    /// Takes in a chunk before it is passed on. Returns whether it moved
    /// the job forward (a paid token more), or why the worker broke the
    /// job's terms: more tokens than `max_tokens`, or more text than they
    /// can stand for. A refused chunk changes nothing.
    pub fn accept(&mut self, chunk: &TokenChunk) -> Result<bool, String> {
        self.check_logprobs(chunk)?;
        let ids = u32::try_from(chunk.ids.len())
            .ok()
            .and_then(|n| self.ids.checked_add(n))
            .filter(|&n| n <= self.max_tokens)
            .ok_or_else(|| {
                format!(
                    "sent {} tokens after {}, past max_tokens {}",
                    chunk.ids.len(),
                    self.ids,
                    self.max_tokens
                )
            })?;
        let text_bytes = self.text_bytes.saturating_add(chunk.text.len() as u64);
        if text_bytes > MAX_TOKEN_BYTES * u64::from(self.max_tokens) {
            return Err(format!(
                "sent {text_bytes} bytes of text, more than {MAX_TOKEN_BYTES} per token of max_tokens {}",
                self.max_tokens
            ));
        }
        let before = self.paid_tokens();
        self.ids = ids;
        self.text_bytes = text_bytes;
        let scored = !chunk.prompt_logprobs.is_empty();
        self.scored |= scored;
        Ok(self.paid_tokens() > before || scored)
    }

    /// Completion tokens to pay for.
    pub fn paid_tokens(&self) -> u32 {
        let by_text = u32::try_from(self.text_bytes).unwrap_or(u32::MAX);
        self.ids.min(by_text).min(self.max_tokens)
    }

    /// Tokens received, paid or not.
    pub fn tokens(&self) -> u32 {
        self.ids
    }
}

/// A node's payments as the job path uses them.
#[derive(Debug)]
pub struct Billing {
    payments: Payments,
    /// The last balances read from the chain, and when (see
    /// [`Billing::balances_cached`]).
    balances: tokio::sync::Mutex<Option<(std::time::Instant, Result<Balances, String>)>>,
}

/// A job's bill as the gateway settled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// What the job cost, in nanoTON.
    pub cost: Coins,
    /// The cheque to send to the worker.
    pub delivery: ChequeDelivery,
}

impl Billing {
    /// Wraps `payments`.
    /// Wraps `payments`. Jobs a crash interrupted mid-run are dropped from
    /// the worker's book (how many tokens they produced is unknown; a
    /// cheque that still comes for one counts as a top-up).
    pub fn new(payments: Payments) -> Self {
        match payments.worker_book().drop_interrupted_jobs() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(jobs = n, "jobs interrupted by a restart were dropped"),
            Err(e) => tracing::error!(error = %e, "could not read the worker's open jobs"),
        }
        Billing {
            payments,
            balances: tokio::sync::Mutex::default(),
        }
    }

    /// The payments underneath.
    pub fn payments(&self) -> &Payments {
        &self.payments
    }

    /// The wallet's and the contract's balances, read from the chain at
    /// most once per `max_age` (a dashboard polls; the chain's API has rate
    /// limits) and within `timeout`.
    pub async fn balances_cached(
        &self,
        max_age: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Result<Balances, String> {
        let mut cached = self.balances.lock().await;
        if let Some((at, b)) = &*cached {
            if at.elapsed() < max_age {
                return b.clone();
            }
        }
        let read = match tokio::time::timeout(timeout, self.payments.balances()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the chain did not answer within {} s",
                timeout.as_secs()
            )),
        };
        *cached = Some((std::time::Instant::now(), read.clone()));
        read
    }

    /// Where this node is paid as a worker.
    pub fn payout(&self) -> Address {
        self.payments.wallet_address()
    }

    /// The coefficient this node charges as a worker, per mille.
    pub fn coefficient_milli(&self) -> u32 {
        self.payments.config().coefficient_milli
    }

    /// The highest worker coefficient a request accepts by default, per mille.
    pub fn default_max_coefficient_milli(&self) -> u32 {
        self.payments.config().default_max_coefficient_milli
    }

    // ---- gateway ----

    /// Reserves the worst case of a job on the lane to `worker` (opening or
    /// topping up the lane on chain when needed) and returns the terms to
    /// send with the job.
    pub async fn reserve(
        &self,
        worker: &Address,
        coefficient_milli: u32,
        max_coefficient_milli: Option<u32>,
        prompt_tokens_bound: u64,
        max_tokens: u64,
    ) -> Result<(Reservation, PaymentTerms), PaymentsError> {
        let r = self
            .payments
            .reserve_with_lane(
                worker,
                coefficient_milli,
                max_coefficient_milli,
                prompt_tokens_bound,
                max_tokens,
            )
            .await?;
        let terms = PaymentTerms {
            contract: self.payments.client_contract().clone(),
            public_key: self.payments.public_key(),
            lane_id: r.lane_id,
            job: r.id,
        };
        Ok((r, terms))
    }

    /// Gives a reservation back (the job never started).
    pub async fn release(&self, reservation: Reservation) {
        let p = self.payments.clone();
        let id = reservation.id;
        let r = tokio::task::spawn_blocking(move || p.release(&reservation)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!(reservation = id, result = ?r, "could not release a reservation");
        }
    }

    /// Settles a job: `usage` is the worker's record (absent when the job
    /// failed midway) and `delivery` what the caller got. The gateway pays
    /// for at most [`Delivery::paid_tokens`] completion tokens and at most
    /// `prompt_tokens_bound` prompt tokens, at `coefficient_milli`; a job
    /// that failed midway pays its delivered tokens only, and one that
    /// served nothing (no token, no prompt scores) pays nothing.
    /// The new cumulative cheque is committed before this returns.
    pub async fn settle(
        &self,
        reservation: Reservation,
        terms: &PaymentTerms,
        coefficient_milli: u32,
        prompt_tokens_bound: u64,
        usage: Option<&JobUsage>,
        delivery: Delivery,
    ) -> Result<Bill, PaymentsError> {
        let delivered = delivery.paid_tokens();
        // Cached prompt tokens are the worker's claim: claiming fewer can
        // only cost what the whole prompt costs, the most it is paid.
        let (prompt, cached, completion) = match usage.filter(|_| delivery.prompt_served()) {
            Some(u) => {
                let prompt = u64::from(u.prompt_tokens).min(prompt_tokens_bound);
                (
                    prompt,
                    u64::from(u.cached_tokens).min(prompt),
                    u64::from(u.completion_tokens.min(delivered)),
                )
            }
            None => (0, 0, u64::from(delivered)),
        };
        let p = self.payments.clone();
        let (cheque, cost) = tokio::task::spawn_blocking(move || {
            p.after_job(&reservation, coefficient_milli, prompt, cached, completion)
        })
        .await
        .map_err(|e| PaymentsError::Store(format!("settlement task failed: {e}")))??;
        Ok(Bill {
            cost,
            delivery: ChequeDelivery {
                job: terms.job,
                public_key: terms.public_key,
                cheque,
            },
        })
    }

    /// Holds a cheque its worker did not acknowledge, for re-sending
    /// (committed; see [`crate::payments::ClientBook::hold_undelivered`]).
    pub async fn hold_undelivered(&self, peer: String, d: &ChequeDelivery) {
        let p = self.payments.clone();
        let held = UndeliveredCheque {
            peer,
            job: d.job,
            cheque: d.cheque.clone(),
        };
        let r = tokio::task::spawn_blocking(move || p.client_book().hold_undelivered(&held)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!(job = d.job, result = ?r, "could not hold an undelivered cheque");
        }
    }

    /// The cheques held for re-sending, as deliveries.
    pub async fn undelivered(&self) -> Vec<(String, ChequeDelivery)> {
        let p = self.payments.clone();
        let public_key = self.payments.public_key();
        match tokio::task::spawn_blocking(move || p.client_book().undelivered()).await {
            Ok(Ok(held)) => held
                .into_iter()
                .map(|h| {
                    let d = ChequeDelivery {
                        job: h.job,
                        public_key,
                        cheque: h.cheque,
                    };
                    (h.peer, d)
                })
                .collect(),
            r => {
                tracing::error!(result = ?r.map(|r| r.map(|v| v.len())), "could not read the undelivered cheques");
                Vec::new()
            }
        }
    }

    /// Records that a worker answered a cheque: one held for it on that
    /// lane, no higher, is no longer re-sent.
    pub async fn delivered(&self, d: &ChequeDelivery) {
        let p = self.payments.clone();
        let cheque = d.cheque.clone();
        let r = tokio::task::spawn_blocking(move || p.client_book().delivered(&cheque)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!(job = d.job, result = ?r, "could not record a delivered cheque");
        }
    }

    // ---- worker ----

    /// Whether to serve a job paid with `terms`.
    pub async fn admit(&self, terms: &PaymentTerms) -> Result<(), PaymentsError> {
        self.payments
            .admit_client(&terms.contract, &terms.public_key, terms.lane_id)
            .await
    }

    /// Opens the worker's row for a paid job before it runs (committed);
    /// refused while the client has a job with that id open (audit F3).
    pub async fn start_job(&self, terms: &PaymentTerms) -> Result<(), PaymentsError> {
        let p = self.payments.clone();
        let (contract, lane, job) = (terms.contract.clone(), terms.lane_id, terms.job);
        tokio::task::spawn_blocking(move || p.start_job(&contract, lane, job))
            .await
            .map_err(|e| PaymentsError::Store(format!("job task failed: {e}")))?
    }

    /// Records what a job produced when it ended, finished or cancelled
    /// (committed). A job that produced no token costs nothing, prompt
    /// included: gateways pay nothing for it ([`Delivery`]).
    pub async fn end_job(
        &self,
        terms: &PaymentTerms,
        prompt_tokens: u32,
        cached_tokens: u32,
        completion_tokens: u32,
    ) {
        let p = self.payments.clone();
        let (contract, job) = (terms.contract.clone(), terms.job);
        let r = tokio::task::spawn_blocking(move || {
            p.end_job(
                &contract,
                job,
                u64::from(prompt_tokens),
                u64::from(cached_tokens),
                u64::from(completion_tokens),
                now_ms(),
            )
        })
        .await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!(job = terms.job, result = ?r, "could not record the end of a job");
        }
    }

    /// Checks and stores a cheque, settling its job in the same
    /// transaction; the ack is sent only after this returns `Ok`, so an
    /// acknowledged cheque is on disk.
    pub async fn on_cheque(&self, d: ChequeDelivery) -> Result<ChequeAck, PaymentsError> {
        let contract = d.cheque.cheque.contract.clone();
        // Only lanes this worker checked on chain before serving them are
        // booked: a cheque for any other lane (self-signed for a made-up
        // contract, say) would otherwise add rows to the store at will.
        if self
            .payments
            .worker_book()
            .lane(&contract, d.cheque.cheque.lane_id)?
            .is_none()
        {
            return Err(PaymentsError::BadCheque(format!(
                "no job of this worker ran on lane {} of {contract}",
                d.cheque.cheque.lane_id
            )));
        }
        let p = self.payments.clone();
        let a = tokio::task::spawn_blocking(move || {
            p.on_job_cheque(&contract, &d.public_key, &d.cheque, d.job)
        })
        .await
        .map_err(|e| PaymentsError::Store(format!("cheque task failed: {e}")))??;
        Ok(ChequeAck {
            cumulative_nano: a.cumulative.nano(),
            outstanding_nano: a.outstanding.nano(),
        })
    }

    /// Books every job whose cheque is overdue as unpaid.
    pub fn book_overdue(&self) {
        let before = now_ms().saturating_sub(CHEQUE_WAIT.as_millis() as u64);
        match self.payments.book_overdue(before) {
            Ok(booked) => {
                for (job, cost) in booked {
                    tracing::warn!(contract = %job.contract, lane = job.lane_id, job = job.job, cost = cost.nano(), "no cheque for a finished job; booked as unpaid");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not book unpaid work"),
        }
    }

    /// The worker's background duty: books overdue jobs and redeems lanes
    /// past the threshold every `redeem_every_s`, until `cancel` fires.
    #[tracing::instrument(skip_all)]
    pub async fn run_worker_duties(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let every = Duration::from_secs(self.payments.config().redeem_every_s.max(1));
        let mut tick = tokio::time::interval(every.min(CHEQUE_WAIT));
        let mut last_redeem = std::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = std::sync::Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || me.book_overdue()).await {
                tracing::error!(error = %e, "booking overdue jobs failed");
            }
            if last_redeem.elapsed() >= every {
                last_redeem = std::time::Instant::now();
                match self.payments.redeem_due().await {
                    Ok(done) if !done.is_empty() => {
                        tracing::info!(lanes = done.len(), "redeemed cheques")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "redemption failed; will retry"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, text: &str) -> TokenChunk {
        TokenChunk {
            ids: vec![7; n],
            text: text.into(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        }
    }

    #[test]
    fn a_gateway_pays_only_for_tokens_that_came_with_text_up_to_max_tokens() {
        // Tokens without text are not paid for (audit F8: one chunk of
        // `max_tokens` ids and no text billed them all).
        let mut d = Delivery::new(64);
        assert_eq!(d.accept(&chunk(50, "")), Ok(false));
        assert_eq!(d.paid_tokens(), 0);
        // Text pays for at most one token a byte; held-back text that comes
        // later pays for the tokens before it.
        assert_eq!(d.accept(&chunk(1, "ab")), Ok(true));
        assert_eq!(d.paid_tokens(), 2);
        assert_eq!(d.accept(&chunk(1, &"x".repeat(100))), Ok(true));
        assert_eq!((d.paid_tokens(), d.tokens()), (52, 52));

        // Past max_tokens the chunk is refused and changes nothing.
        let mut d = Delivery::new(3);
        assert_eq!(d.accept(&chunk(2, "hi")), Ok(true));
        assert!(d.accept(&chunk(2, "yo")).is_err());
        assert_eq!((d.paid_tokens(), d.tokens()), (2, 2));
        assert_eq!(d.accept(&chunk(1, "!")), Ok(true));
        assert!(d.accept(&chunk(1, "!")).is_err());
        assert_eq!(d.paid_tokens(), 3);

        // Text is bounded by max_tokens, so a gateway never buffers more
        // than MAX_TOKEN_BYTES a token.
        let mut d = Delivery::new(2);
        let huge = "x".repeat((2 * MAX_TOKEN_BYTES + 1) as usize);
        assert!(d.accept(&chunk(1, &huge)).is_err());
        assert_eq!(d.paid_tokens(), 0);
        // Empty chunks are no progress.
        assert_eq!(d.accept(&chunk(0, "")), Ok(false));
    }

    #[test]
    fn log_probabilities_from_a_worker_are_only_what_the_job_asked_for() {
        use silk_inference::{TokenLogprob, TopLogprob};
        let lp = |logprob: f32, alternatives: usize| TokenLogprob {
            bytes: b"hi".to_vec(),
            logprob,
            top: (0..alternatives)
                .map(|i| TopLogprob {
                    id: i as u32,
                    bytes: vec![b'x'],
                    logprob: -1.0,
                })
                .collect(),
        };
        let with = |n: usize, lps: Vec<TokenLogprob>| TokenChunk {
            logprobs: lps,
            ..chunk(n, "hi")
        };
        // Not asked: none may come.
        let mut d = Delivery::new(8);
        assert!(d.accept(&with(1, vec![lp(-0.5, 0)])).is_err());
        assert_eq!(d.tokens(), 0);
        let mut d = Delivery::new(8).with_logprobs(Some(2));
        assert_eq!(d.accept(&with(1, vec![lp(-0.5, 2)])), Ok(true));
        // More entries than tokens, more alternatives than asked, a
        // probability above 1 or NaN: refused, and nothing changes.
        for bad in [
            with(1, vec![lp(-0.5, 0), lp(-0.5, 0)]),
            with(1, vec![lp(-0.5, 3)]),
            with(1, vec![lp(0.5, 0)]),
            with(1, vec![lp(f32::NAN, 0)]),
        ] {
            assert!(d.accept(&bad).is_err());
        }
        assert_eq!(d.tokens(), 1);
        // -inf (a token the model ruled out) is a probability of 0.
        assert_eq!(d.accept(&with(1, vec![lp(f32::NEG_INFINITY, 0)])), Ok(true));
    }

    /// A job that scores its prompt (`echo` with `max_tokens: 0`) is paid
    /// for its prompt once the scores came, and only scores it asked for,
    /// once, before the answer, no more than the prompt has tokens.
    #[test]
    fn prompt_scores_are_taken_once_before_the_answer_and_pay_for_the_prompt() {
        use silk_inference::TokenLogprob;
        let lp = |logprob: f32| TokenLogprob {
            bytes: b"x".to_vec(),
            logprob,
            top: Vec::new(),
        };
        let scores = |n: usize| TokenChunk {
            prompt_logprobs: vec![lp(-1.0); n],
            ..TokenChunk::default()
        };
        // Not asked for.
        let mut d = Delivery::new(4);
        assert!(d.accept(&scores(3)).is_err());
        assert!(!d.prompt_served());
        // Asked: scores of a 10-token prompt at most; nothing generated is
        // still a prompt served.
        let mut d = Delivery::new(0).with_prompt_logprobs(Some(0), 10);
        assert!(d.accept(&scores(11)).is_err());
        assert!(d
            .accept(&TokenChunk {
                prompt_logprobs: vec![lp(0.5)],
                ..TokenChunk::default()
            })
            .is_err());
        assert!(!d.prompt_served());
        assert_eq!(d.accept(&scores(9)), Ok(true));
        assert!(d.prompt_served());
        assert_eq!(d.paid_tokens(), 0);
        // A second set, or scores riding with tokens, are refused.
        assert!(d.accept(&scores(9)).is_err());
        let mut d = Delivery::new(4).with_prompt_logprobs(Some(0), 10);
        assert_eq!(d.accept(&chunk(1, "a")), Ok(true));
        assert!(d.accept(&scores(3)).is_err());
        let mixed = TokenChunk {
            prompt_logprobs: vec![lp(-1.0)],
            ..chunk(1, "a")
        };
        let mut d = Delivery::new(4).with_prompt_logprobs(Some(0), 10);
        assert!(d.accept(&mixed).is_err());
        assert!(!d.prompt_served());
    }
}
