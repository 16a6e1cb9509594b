//! Job streams: `/silk/job/1.0.0`.
//!
//! A job is one libp2p stream. Both directions carry frames: a big-endian
//! `u32` length, then that many bytes of a postcard-encoded wire frame. The
//! gateway's first frame is the request and carries [`JOB_WIRE_VERSION`]; the
//! worker answers with any number of data frames and then exactly one end or
//! error frame. Frames over `max_frame_size` are never read into memory, and a
//! stream that stays silent for `job_idle_timeout` is closed.
//!
//! The overlay does not look inside the bytes: requests, token frames and the
//! usage record are defined by the node.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::peers::{InUse, StreamUse};
use crate::{network::Reports, Misbehaviour, OverlayError, OverlayEvent};

/// Protocol name of job streams.
pub const JOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/silk/job/1.0.0");

/// Version carried in the request frame; a worker refuses any other.
pub const JOB_WIRE_VERSION: u16 = 2;

/// Inbound streams that are being refused (busy) at once; beyond this they are reset.
const MAX_REFUSALS: usize = 32;

/// Why a job failed, as sent in an error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobErrorCode {
    /// The request carried a wire version this worker does not speak.
    ProtocolVersion,
    /// A frame was over the size limit.
    FrameTooLarge,
    /// A frame did not decode or came out of order.
    Malformed,
    /// The stream was idle for too long.
    Timeout,
    /// The worker has no free slot.
    Busy,
    /// The worker refused the request (policy, price, model).
    Rejected,
    /// The worker failed while serving the job.
    Internal,
    /// A node-defined code.
    Application(u32),
}

/// A frame a worker sends back on a job stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobFrame {
    /// Node-defined payload, e.g. a batch of tokens.
    Data(Vec<u8>),
    /// The last frame of a successful job: the node's usage record.
    End(Vec<u8>),
    /// The last frame of a failed job.
    Error {
        /// What kind of failure.
        code: JobErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// What travels on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireFrame {
    Request { version: u16, request: Vec<u8> },
    Data(Vec<u8>),
    End(Vec<u8>),
    Error { code: JobErrorCode, message: String },
}

impl WireFrame {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        let (frame, rest) = postcard::take_from_bytes(bytes)?;
        if rest.is_empty() {
            Ok(frame)
        } else {
            Err(postcard::Error::DeserializeBadEncoding)
        }
    }
}

/// Limits shared by both ends of a job stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct JobLimits {
    pub(crate) max_frame_size: usize,
    pub(crate) idle_timeout: Duration,
    /// Time an inbound stream has to send its request frame.
    pub(crate) first_frame_timeout: Duration,
}

#[derive(Debug)]
pub(crate) enum FrameError {
    TooLarge(usize),
    Closed,
    Io(std::io::Error),
}

/// Reads one length-prefixed frame, refusing lengths over `max`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(FrameError::Io)?;
    Ok(buf)
}

/// Decodes what a peer wrote on a job stream with the stream tasks' own
/// code: length-prefixed frames of at most `max_frame_size` bytes, each a
/// postcard wire frame with nothing after it, until `bytes` ends at a frame
/// boundary (`Ok` with the number of frames) or a frame is refused. For the
/// fuzz targets (`fuzz/`); nodes use [`JobStream`] and [`JobResponder`].
#[doc(hidden)]
pub fn decode_stream(bytes: &[u8], max_frame_size: usize) -> Result<usize, OverlayError> {
    let mut cursor = futures::io::Cursor::new(bytes);
    let mut frames = 0;
    loop {
        match futures::executor::block_on(read_frame(&mut cursor, max_frame_size)) {
            Ok(frame) => {
                WireFrame::decode(&frame)
                    .map_err(|e| OverlayError::MalformedFrame(e.to_string()))?;
                frames += 1;
            }
            Err(FrameError::Closed) => return Ok(frames),
            Err(FrameError::Io(e)) => return Err(OverlayError::Io(e)),
            Err(FrameError::TooLarge(size)) => {
                return Err(OverlayError::TooLarge {
                    what: "job frame",
                    size,
                    max: max_frame_size,
                })
            }
        }
    }
}

/// Writes one length-prefixed frame.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await?;
    w.flush().await
}

async fn send(
    stream: &mut Stream,
    frame: &WireFrame,
    limits: JobLimits,
) -> Result<(), OverlayError> {
    let bytes = postcard::to_stdvec(frame)?;
    if bytes.len() > limits.max_frame_size {
        return Err(OverlayError::TooLarge {
            what: "job frame",
            size: bytes.len(),
            max: limits.max_frame_size,
        });
    }
    tokio::time::timeout(limits.idle_timeout, write_frame(stream, &bytes))
        .await
        .map_err(|_| OverlayError::JobTimeout {
            after: limits.idle_timeout,
        })??;
    Ok(())
}

/// Sends an error frame and closes; failures are only logged (the peer may be gone).
async fn fail(stream: &mut Stream, code: JobErrorCode, message: String, limits: JobLimits) {
    let frame = WireFrame::Error { code, message };
    if let Err(e) = send(stream, &frame, limits).await {
        tracing::debug!(error = %e, "could not send the job error frame");
    }
    let _ = tokio::time::timeout(limits.idle_timeout, stream.close()).await;
}

fn report(reports: &Reports, peer: PeerId, offence: Misbehaviour) {
    if reports.try_send((peer, offence)).is_err() {
        tracing::warn!(%peer, "overlay command queue full: a misbehaviour report was dropped");
    }
}

/// The gateway's end of a job: yields the worker's frames in order.
///
/// Ends after a [`JobFrame::End`] or [`JobFrame::Error`], or with an
/// [`OverlayError`] when the stream breaks, times out or carries garbage.
/// Dropping it resets the stream, which tells the worker to stop.
#[derive(Debug)]
pub struct JobStream {
    peer: PeerId,
    frames: mpsc::Receiver<Result<JobFrame, OverlayError>>,
    reader: tokio::task::AbortHandle,
    /// Keeps the connection to the worker out of the peer budget's cuts.
    _use: InUse,
}

impl JobStream {
    /// The worker.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The next frame, or `None` after the last one.
    pub async fn next_frame(&mut self) -> Option<Result<JobFrame, OverlayError>> {
        self.frames.recv().await
    }
}

impl futures::Stream for JobStream {
    type Item = Result<JobFrame, OverlayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.poll_recv(cx)
    }
}

impl Drop for JobStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Sends the request frame on a new job stream. libp2p-stream opens a
/// stream on any of the peer's connections, and one may be on its way out
/// (a duplicate being closed, a connection the peer dropped): a write that
/// fails there never reached the worker, so it is a failed open, which
/// [`crate::OverlayHandle::open_job`] tries again, not a failed job.
async fn send_request(
    stream: &mut Stream,
    peer: PeerId,
    request: Vec<u8>,
    limits: JobLimits,
) -> Result<(), OverlayError> {
    let frame = WireFrame::Request {
        version: JOB_WIRE_VERSION,
        request,
    };
    send(stream, &frame, limits).await.map_err(|e| match e {
        OverlayError::Io(e) => OverlayError::OpenStream {
            peer,
            reason: format!("the connection closed before the request was sent: {e}"),
        },
        other => other,
    })
}

/// Opens a job stream to `peer` and sends the request frame.
pub(crate) async fn open(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    request: Vec<u8>,
    limits: JobLimits,
    reports: Reports,
    use_: InUse,
) -> Result<JobStream, OverlayError> {
    let opened = tokio::time::timeout(limits.idle_timeout, control.open_stream(peer, JOB_PROTOCOL))
        .await
        .map_err(|_| OverlayError::JobTimeout {
            after: limits.idle_timeout,
        })?;
    let mut stream = match opened {
        Ok(s) => s,
        Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
            return Err(OverlayError::JobProtocolUnsupported { peer })
        }
        Err(e) => {
            return Err(OverlayError::OpenStream {
                peer,
                reason: e.to_string(),
            })
        }
    };
    send_request(&mut stream, peer, request, limits).await?;
    let (tx, frames) = mpsc::channel(32);
    let reader = tokio::spawn(read_replies(peer, stream, tx, limits, reports)).abort_handle();
    Ok(JobStream {
        peer,
        frames,
        reader,
        _use: use_,
    })
}

async fn read_replies(
    peer: PeerId,
    mut stream: Stream,
    tx: mpsc::Sender<Result<JobFrame, OverlayError>>,
    limits: JobLimits,
    reports: Reports,
) {
    loop {
        let read = tokio::time::timeout(
            limits.idle_timeout,
            read_frame(&mut stream, limits.max_frame_size),
        )
        .await;
        let item = match read {
            Err(_) => Err(OverlayError::JobTimeout {
                after: limits.idle_timeout,
            }),
            Ok(Err(FrameError::Closed)) => Err(OverlayError::JobStreamClosed),
            Ok(Err(FrameError::Io(e))) => Err(OverlayError::Io(e)),
            Ok(Err(FrameError::TooLarge(size))) => {
                report(&reports, peer, Misbehaviour::OversizedFrame);
                Err(OverlayError::TooLarge {
                    what: "job frame",
                    size,
                    max: limits.max_frame_size,
                })
            }
            Ok(Ok(bytes)) => match WireFrame::decode(&bytes) {
                Ok(WireFrame::Data(d)) => Ok(JobFrame::Data(d)),
                Ok(WireFrame::End(u)) => Ok(JobFrame::End(u)),
                Ok(WireFrame::Error { code, message }) => Ok(JobFrame::Error { code, message }),
                Ok(WireFrame::Request { .. }) => {
                    report(&reports, peer, Misbehaviour::MalformedFrame);
                    Err(OverlayError::MalformedFrame(
                        "a worker sent a request frame".into(),
                    ))
                }
                Err(e) => {
                    report(&reports, peer, Misbehaviour::MalformedFrame);
                    Err(OverlayError::MalformedFrame(e.to_string()))
                }
            },
        };
        let last = !matches!(item, Ok(JobFrame::Data(_)));
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The worker's end of a job: send data frames, then [`end`](Self::end) or
/// [`error`](Self::error). Each write waits for the stream's flow control and
/// fails after the idle timeout. Holding it occupies one inbound job slot;
/// dropping it without a last frame resets the stream.
#[derive(Debug)]
pub struct JobResponder {
    peer: PeerId,
    stream: Stream,
    limits: JobLimits,
    /// Boxed: it carries the peer id, and every `OverlayEvent` is as
    /// large as its largest variant.
    _slot: Box<JobSlot>,
}

/// An inbound job's place: one of the node's `max_inbound_jobs` and one of
/// its peer's `max_inbound_jobs_per_peer`, both given back on drop.
#[derive(Debug)]
struct JobSlot {
    _global: OwnedSemaphorePermit,
    peer: PeerId,
    per_peer: PerPeer,
    /// Keeps the connection to the gateway out of the peer budget's cuts.
    _use: InUse,
}

/// Inbound job streams open per peer.
type PerPeer = Arc<std::sync::Mutex<HashMap<PeerId, usize>>>;

impl JobSlot {
    /// A slot for `peer`, or `None` when it already has `max` streams.
    fn take(
        global: OwnedSemaphorePermit,
        peer: PeerId,
        per_peer: &PerPeer,
        max: usize,
        uses: &StreamUse,
    ) -> Option<Self> {
        let mut open = per_peer.lock().ok()?;
        let n = open.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            _global: global,
            peer,
            per_peer: Arc::clone(per_peer),
            _use: uses.open(peer),
        })
    }
}

impl Drop for JobSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.per_peer.lock() {
            if let Some(n) = open.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

impl JobResponder {
    /// The gateway that sent the job.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one data frame (e.g. a batch of tokens).
    pub async fn send_data(&mut self, data: Vec<u8>) -> Result<(), OverlayError> {
        send(&mut self.stream, &WireFrame::Data(data), self.limits).await
    }

    /// Sends the final frame with the usage record and closes the stream.
    pub async fn end(mut self, usage: Vec<u8>) -> Result<(), OverlayError> {
        send(&mut self.stream, &WireFrame::End(usage), self.limits).await?;
        self.close().await
    }

    /// Sends an error frame and closes the stream.
    pub async fn error(
        mut self,
        code: JobErrorCode,
        message: impl Into<String>,
    ) -> Result<(), OverlayError> {
        let frame = WireFrame::Error {
            code,
            message: message.into(),
        };
        send(&mut self.stream, &frame, self.limits).await?;
        self.close().await
    }

    async fn close(&mut self) -> Result<(), OverlayError> {
        tokio::time::timeout(self.limits.idle_timeout, self.stream.close())
            .await
            .map_err(|_| OverlayError::JobTimeout {
                after: self.limits.idle_timeout,
            })??;
        Ok(())
    }
}

/// Accepts inbound job streams until cancelled: admits at most
/// `max_inbound` at once, checks the first frame, and hands valid requests to
/// the node as [`OverlayEvent::InboundJob`].
pub(crate) async fn accept_jobs(
    mut incoming: libp2p_stream::IncomingStreams,
    limits: JobLimits,
    (max_inbound, max_per_peer): (usize, usize),
    events: mpsc::Sender<OverlayEvent>,
    reports: Reports,
    uses: StreamUse,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_inbound));
    let per_peer = PerPeer::default();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a job handshake task panicked");
                    }
                }
            }
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let slot = slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "no free job slot")
                    .and_then(|global| {
                        JobSlot::take(global, peer, &per_peer, max_per_peer, &uses)
                            .ok_or("too many jobs from this peer at once")
                    });
                match slot {
                    Ok(slot) => {
                        tasks.spawn(handshake(peer, stream, slot, limits, events.clone(), reports.clone()));
                    }
                    Err(why) => match refusals.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tracing::debug!(%peer, why, "refusing a job");
                            let mut stream = stream;
                            tasks.spawn(async move {
                                fail(&mut stream, JobErrorCode::Busy, why.into(), limits).await;
                                drop(permit);
                            });
                        }
                        Err(_) => drop(stream),
                    },
                }
            }
        }
    }
    tasks.shutdown().await;
}

async fn handshake(
    peer: PeerId,
    mut stream: Stream,
    slot: JobSlot,
    limits: JobLimits,
    events: mpsc::Sender<OverlayEvent>,
    reports: Reports,
) {
    let first = tokio::time::timeout(
        limits.first_frame_timeout,
        read_frame(&mut stream, limits.max_frame_size),
    )
    .await;
    let (offence, code, message) = match first {
        // A silent stream holds one of the node's job slots: misbehaviour.
        Err(_) => (
            Misbehaviour::SilentJobStream,
            JobErrorCode::Timeout,
            format!(
                "no request frame within {} s",
                limits.first_frame_timeout.as_secs_f64()
            ),
        ),
        Ok(Err(FrameError::Closed)) | Ok(Err(FrameError::Io(_))) => return,
        Ok(Err(FrameError::TooLarge(size))) => (
            Misbehaviour::OversizedFrame,
            JobErrorCode::FrameTooLarge,
            format!(
                "frame of {size} bytes is over the {}-byte limit",
                limits.max_frame_size
            ),
        ),
        Ok(Ok(bytes)) => match WireFrame::decode(&bytes) {
            Ok(WireFrame::Request { version, request }) if version == JOB_WIRE_VERSION => {
                let responder = JobResponder {
                    peer,
                    stream,
                    limits,
                    _slot: Box::new(slot),
                };
                if events
                    .send(OverlayEvent::InboundJob {
                        peer,
                        request,
                        responder,
                    })
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "inbound job dropped: the node stopped listening");
                }
                return;
            }
            Ok(WireFrame::Request { version, .. }) => (
                Misbehaviour::WrongProtocolVersion,
                JobErrorCode::ProtocolVersion,
                format!("this worker speaks job wire version {JOB_WIRE_VERSION}, not {version}"),
            ),
            Ok(_) => (
                Misbehaviour::MalformedFrame,
                JobErrorCode::Malformed,
                "the first frame must be a request".to_owned(),
            ),
            Err(e) => (
                Misbehaviour::MalformedFrame,
                JobErrorCode::Malformed,
                format!("undecodable frame: {e}"),
            ),
        },
    };
    tracing::debug!(%peer, %offence, "rejecting an inbound job stream");
    report(&reports, peer, offence);
    fail(&mut stream, code, message, limits).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        let bytes = postcard::to_stdvec(&WireFrame::Data(vec![7; 10])).expect("encode");
        write_frame(&mut buf, &bytes).await.expect("write");
        let mut cursor = futures::io::Cursor::new(buf.clone());
        let back = read_frame(&mut cursor, 64).await.expect("read");
        assert!(matches!(WireFrame::decode(&back), Ok(WireFrame::Data(d)) if d == vec![7; 10]));
        let mut cursor = futures::io::Cursor::new(buf);
        assert!(matches!(
            read_frame(&mut cursor, 4).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    /// A stream whose connection is gone fails its request as a failed
    /// open (which `open_job` retries), not as an I/O error of the job: a
    /// CI run lost an honest job to "connection is closed" on a stream
    /// opened as a duplicate connection closed.
    #[tokio::test]
    async fn a_request_on_a_closed_connection_is_a_failed_open() {
        use crate::testing::{local_config, seeded_keypair, spawn_local, wait_until_connected};
        let worker = spawn_local(local_config(seeded_keypair(9_001)))
            .await
            .expect("worker");
        let gateway = spawn_local(
            local_config(seeded_keypair(9_002)).with_bootstrap(vec![worker.addr.clone()]),
        )
        .await
        .expect("gateway");
        wait_until_connected(&gateway.handle, worker.peer_id, Duration::from_secs(20))
            .await
            .expect("connected");
        let mut stream = gateway
            .handle
            .open_raw_job_stream(worker.peer_id)
            .await
            .expect("stream");
        worker.handle.shutdown();
        let limits = JobLimits {
            max_frame_size: 1 << 20,
            idle_timeout: Duration::from_secs(5),
            first_frame_timeout: Duration::from_secs(5),
        };
        let started = std::time::Instant::now();
        // Writes may land in buffers until the close is seen.
        let err = loop {
            match send_request(&mut stream, worker.peer_id, b"job".to_vec(), limits).await {
                Err(e) => break e,
                Ok(()) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "writes to a stopped peer kept succeeding"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert!(
            matches!(err, OverlayError::OpenStream { peer, .. } if peer == worker.peer_id),
            "{err:?}"
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut bytes = postcard::to_stdvec(&WireFrame::End(vec![1])).expect("encode");
        bytes.push(0);
        assert!(WireFrame::decode(&bytes).is_err());
    }
}
