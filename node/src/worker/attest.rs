//! This node's own attestation document: made at start, renewed every
//! [`attest::QUOTE_REFRESH_INTERVAL`] (a new quote on TDX, a new claims
//! timestamp everywhere), and sent to whoever asks on
//! `/silk/attest/1.0.0`. Every node has one, worker or not; a worker's
//! announcements carry its digest.

use std::sync::Mutex;

use silk_overlay::AttestationMode;
use tokio_util::sync::CancellationToken;

use crate::attest::{self, AttestationDocument, Claims, Hex, TsmReport};

/// The current document (encoded) and its digest.
#[derive(Debug)]
pub struct OwnAttestation {
    public_key: [u8; 32],
    models: Vec<String>,
    mode: AttestationMode,
    current: Mutex<(Vec<u8>, [u8; 32])>,
}

impl OwnAttestation {
    /// Produces the first document for this node's key and the models it
    /// serves.
    pub async fn produce(public_key: [u8; 32], models: Vec<String>) -> Result<Self, String> {
        let doc = produce_document(public_key, models.clone()).await?;
        let mode = match doc.mode {
            attest::AttestationMode::Tdx => AttestationMode::Tdx,
            attest::AttestationMode::Insecure => AttestationMode::Insecure,
        };
        let encoded = doc.encode().map_err(|e| e.to_string())?;
        Ok(Self {
            public_key,
            models,
            mode,
            current: Mutex::new((encoded, doc.digest().0)),
        })
    }

    /// Whether the document holds a TDX quote.
    pub fn mode(&self) -> AttestationMode {
        self.mode
    }

    /// The current document's digest (what announcements carry).
    pub fn digest(&self) -> [u8; 32] {
        self.current.lock().map(|a| a.1).unwrap_or([0; 32])
    }

    /// The current document, encoded, as sent to a peer that asks.
    pub fn encoded(&self) -> Vec<u8> {
        self.current.lock().map(|a| a.0.clone()).unwrap_or_default()
    }

    /// Renews the document every [`attest::QUOTE_REFRESH_INTERVAL`] until
    /// `cancel` fires; the next announcement carries the new digest.
    #[tracing::instrument(name = "attestation refresh", skip_all)]
    pub async fn refresh(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(attest::QUOTE_REFRESH_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let fresh = match produce_document(self.public_key, self.models.clone()).await {
                Ok(doc) => doc.encode().map(|bytes| (bytes, doc.digest().0)),
                Err(reason) => {
                    tracing::warn!(%reason, "could not refresh the attestation document");
                    continue;
                }
            };
            match (fresh, self.current.lock()) {
                (Ok(fresh), Ok(mut current)) => *current = fresh,
                (Err(e), _) => {
                    tracing::warn!(error = %e, "could not encode the attestation document")
                }
                (_, Err(_)) => return,
            }
        }
    }
}

/// Claims for this node now, bound into a quote where configfs-tsm exists.
async fn produce_document(
    public_key: [u8; 32],
    models: Vec<String>,
) -> Result<AttestationDocument, String> {
    let claims = Claims::new(
        Hex(public_key),
        models,
        attest::NODE_VERSION,
        attest::now_unix(),
    )
    .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || AttestationDocument::produce(claims, &TsmReport::default()))
        .await
        .map_err(|e| format!("attestation task failed: {e}"))?
        .map_err(|e| e.to_string())
}
