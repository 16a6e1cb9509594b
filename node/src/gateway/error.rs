//! Why a request or one attempt of it failed: typed, so the API answers by
//! cause (400, 402, 403, 429, 503, 504) and only a worker's own fault
//! counts against its reputation.

use silk_overlay::{JobErrorCode, PeerId};

use crate::protocol;

/// Whose fault a failed attempt on one worker was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The worker's: it counts against its reputation.
    Worker,
    /// The caller's: the request is invalid on any worker.
    Caller,
    /// Nobody's, but the worker has no room now: route elsewhere for a while.
    Busy,
    /// Nobody's (this gateway's own frame, a payment this gateway could not
    /// make, a wire version apart).
    Nobody,
}

/// Why one attempt on one worker ended before its first token. The cause
/// decides who is blamed and, when every attempt failed, the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The worker has no room now.
    #[error("busy: {0}")]
    Busy(String),
    /// The worker judged the request itself invalid (a prompt longer than
    /// its context window, `max_tokens` past it).
    #[error("refused the request: {0}")]
    Rejected(String),
    /// This gateway could not pay the worker (no lane, no funds, terms the
    /// worker refused, a worker that charges while this node has no
    /// payments).
    #[error("payment: {0}")]
    Payment(String),
    /// The worker did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The worker failed: a stream error, an undecodable frame, an
    /// internal error, a model it announced and does not serve.
    #[error("failed: {0}")]
    Failed(String),
    /// Not the worker's doing: this gateway's own frame was too large or
    /// malformed, or the two run wire versions apart.
    #[error("{0}")]
    Local(String),
}

impl AttemptError {
    /// The error for a worker's refusal with `code` before the first token.
    pub(crate) fn of_refusal(code: JobErrorCode, message: String) -> Self {
        let message = format!("worker refused ({code:?}): {message}");
        match code {
            // The engine's validation: prompt over the context window,
            // max_tokens past it, a KV budget the request can never fit.
            JobErrorCode::Rejected => Self::Rejected(message),
            JobErrorCode::Busy => Self::Busy(message),
            // Our frame was too large or malformed, or a wire version apart.
            JobErrorCode::FrameTooLarge
            | JobErrorCode::Malformed
            | JobErrorCode::ProtocolVersion => Self::Local(message),
            // Payment terms this gateway offered, or a cheque it sent.
            JobErrorCode::Application(
                protocol::ERR_PAYMENT_REQUIRED
                | protocol::ERR_PAYMENT_REFUSED
                | protocol::ERR_BAD_CHEQUE
                | protocol::ERR_NOT_CHARGING,
            ) => Self::Payment(message),
            JobErrorCode::Timeout => Self::Timeout(message),
            // It announced a model it does not serve, or failed.
            JobErrorCode::Application(_) | JobErrorCode::Internal => Self::Failed(message),
        }
    }

    /// The reason alone, without the cause's prefix.
    pub(crate) fn reason(&self) -> &str {
        match self {
            Self::Busy(m)
            | Self::Rejected(m)
            | Self::Payment(m)
            | Self::Timeout(m)
            | Self::Failed(m)
            | Self::Local(m) => m,
        }
    }

    /// Whom the failure counts against.
    pub(crate) fn blame(&self) -> Blame {
        match self {
            Self::Busy(_) => Blame::Busy,
            Self::Rejected(_) => Blame::Caller,
            Self::Payment(_) | Self::Local(_) => Blame::Nobody,
            Self::Timeout(_) | Self::Failed(_) => Blame::Worker,
        }
    }
}

/// Every attempt of one request, in the order they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempts(pub Vec<(PeerId, AttemptError)>);

impl std::fmt::Display for Attempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no candidate");
        }
        for (i, (peer, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{peer}: {e}")?;
        }
        Ok(())
    }
}

/// What the attempts of a request that no worker took say, as one cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// Every worker tried was busy: retry shortly.
    Busy,
    /// This node could not pay any worker it tried.
    Payment,
    /// No worker answered in time (some may have been busy or unpayable).
    Timeout,
    /// A worker failed, or nothing was tried.
    Unavailable,
}

impl Attempts {
    /// The cause the caller is told: a failure of a worker or of this node
    /// outweighs a timeout, which outweighs payment, which outweighs busy.
    pub fn cause(&self) -> FailureCause {
        let has = |f: fn(&AttemptError) -> bool| self.0.iter().any(|(_, e)| f(e));
        if self.0.is_empty()
            || has(|e| matches!(e, AttemptError::Failed(_) | AttemptError::Local(_)))
        {
            FailureCause::Unavailable
        } else if has(|e| matches!(e, AttemptError::Timeout(_))) {
            FailureCause::Timeout
        } else if has(|e| matches!(e, AttemptError::Payment(_))) {
            FailureCause::Payment
        } else {
            FailureCause::Busy
        }
    }
}

/// Why a job could not be placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The request named no model and the mesh serves several (or none).
    #[error("no model given and the mesh serves {0}: name one of them in `model`")]
    ModelRequired(String),
    /// No worker announces the model.
    #[error("no worker on the mesh serves model `{0}` (see GET /v1/models)")]
    UnknownModel(String),
    /// Every worker for the model runs without TDX, and this gateway does
    /// not route to insecure workers.
    #[error("{0}")]
    InsecureRefused(String),
    /// Every worker for the model failed the attestation policy (some with
    /// TDX evidence the policy does not accept, or none in time).
    #[error("{0}")]
    AttestationRefused(String),
    /// Every worker is at this gateway's per-worker cap.
    #[error("every worker for `{0}` is at its concurrency cap; retry shortly")]
    Saturated(String),
    /// Every worker asks more than the caller's `max_coefficient`.
    #[error("every worker for `{model}` asks more than max_coefficient {max}: the cheapest asks {cheapest}", max = *max_milli as f64 / 1000.0, cheapest = *cheapest_milli as f64 / 1000.0)]
    TooExpensive {
        /// The model.
        model: String,
        /// The cheapest worker's coefficient, × 1000.
        cheapest_milli: u64,
        /// The caller's maximum, × 1000.
        max_milli: u32,
    },
    /// A worker judged the request itself invalid (a prompt longer than the
    /// context window, `max_tokens` past it): the caller's fault, so no
    /// other worker is tried and no worker is blamed.
    #[error("the worker refused the request: {0}")]
    InvalidRequest(String),
    /// The request fits the context window of no worker serving the model:
    /// judged by this gateway before any worker was asked.
    #[error("{}", context_message(model, *window, *prompt_tokens, *max_tokens))]
    ContextLengthExceeded {
        /// The model id.
        model: String,
        /// The largest context window a worker announces for it, in tokens.
        window: u32,
        /// The prompt's tokens, when this gateway could count them.
        prompt_tokens: Option<u64>,
        /// The request's `max_tokens`.
        max_tokens: u32,
    },
    /// Every attempt failed before the first token.
    #[error("no worker could take the job: {0}")]
    AllFailed(Attempts),
    /// Every worker was at capacity and the gateway's queue was full.
    #[error("every worker for `{model}` is busy and {limit} requests are already waiting; retry shortly")]
    QueueFull {
        /// The model.
        model: String,
        /// The queue's limit.
        limit: usize,
    },
    /// Every worker stayed at capacity for as long as a request may wait.
    #[error("every worker for `{model}` stayed busy while the request waited {:.1} s; retry shortly", waited.as_secs_f64())]
    QueueTimeout {
        /// The model.
        model: String,
        /// How long the request waited.
        waited: std::time::Duration,
    },
}

impl DispatchError {
    /// The error's code, as the API answers it and `/metrics` counts it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ModelRequired(_) => "model_required",
            Self::UnknownModel(_) => "model_not_found",
            Self::InsecureRefused(_) => "insecure_workers_refused",
            Self::AttestationRefused(_) => "attestation_refused",
            Self::Saturated(_) | Self::QueueTimeout { .. } => "workers_saturated",
            Self::QueueFull { .. } => "queue_full",
            Self::TooExpensive { .. } => "price_above_max_coefficient",
            Self::InvalidRequest(_) => "invalid_request",
            Self::ContextLengthExceeded { .. } => "context_length_exceeded",
            Self::AllFailed(attempts) => match attempts.cause() {
                FailureCause::Busy => "workers_busy",
                FailureCause::Payment => "payment_failed",
                FailureCause::Timeout => "worker_timeout",
                FailureCause::Unavailable => "no_worker_available",
            },
        }
    }

    /// Whether the request found every worker at capacity (this gateway's
    /// cap, or every attempt answered busy): it may wait in the queue.
    pub fn is_saturation(&self) -> bool {
        match self {
            Self::Saturated(_) => true,
            Self::AllFailed(a) => a.cause() == FailureCause::Busy,
            _ => false,
        }
    }
}

fn context_message(
    model: &str,
    window: u32,
    prompt_tokens: Option<u64>,
    max_tokens: u32,
) -> String {
    match prompt_tokens {
        Some(p) if p >= u64::from(window) => format!(
            "the prompt has {p} tokens, but the context window of `{model}` is {window} tokens: shorten the messages"
        ),
        _ => format!(
            "max_tokens is {max_tokens}, more than the context window of `{model}`, {window} tokens"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::test_peer as peer;

    #[test]
    fn the_cause_of_a_failed_request_weighs_the_attempts() {
        let at = |e: AttemptError| (peer(1), e);
        let busy = || AttemptError::Busy("b".into());
        let pay = || AttemptError::Payment("p".into());
        let slow = || AttemptError::Timeout("t".into());
        let failed = || AttemptError::Failed("f".into());
        let cause = |v: Vec<(PeerId, AttemptError)>| Attempts(v).cause();
        assert_eq!(cause(vec![]), FailureCause::Unavailable);
        assert_eq!(cause(vec![at(busy()), at(busy())]), FailureCause::Busy);
        assert_eq!(cause(vec![at(busy()), at(pay())]), FailureCause::Payment);
        assert_eq!(cause(vec![at(pay()), at(slow())]), FailureCause::Timeout);
        assert_eq!(
            cause(vec![at(slow()), at(failed()), at(busy())]),
            FailureCause::Unavailable
        );
        assert_eq!(
            cause(vec![at(AttemptError::Local("l".into()))]),
            FailureCause::Unavailable
        );
        // Who is blamed follows the cause: only a worker's failure or its
        // silence counts against it.
        assert_eq!(busy().blame(), Blame::Busy);
        assert_eq!(pay().blame(), Blame::Nobody);
        assert_eq!(slow().blame(), Blame::Worker);
        assert_eq!(failed().blame(), Blame::Worker);
        assert_eq!(AttemptError::Rejected("r".into()).blame(), Blame::Caller);
        assert_eq!(
            AttemptError::of_refusal(
                JobErrorCode::Application(protocol::ERR_BAD_CHEQUE),
                "x".into()
            )
            .blame(),
            Blame::Nobody
        );
    }
}
