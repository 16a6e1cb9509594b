//! Job streams between two nodes, over TCP and over QUIC.

use libp2p::multiaddr::Protocol;
use silk_overlay::{
    testing::{
        local_config, seeded_keypair, spawn_local, spawn_mesh, wait_until_connected, LocalNode,
    },
    JobErrorCode, JobFrame, OverlayEvent, OverlayHandle,
};
use tokio::sync::mpsc;

use crate::{init_tracing, next_event, WAIT};

/// Serves one job on `events`: checks the request, streams two data frames and an end frame.
pub(crate) async fn serve_one(
    mut events: mpsc::Receiver<OverlayEvent>,
    expect_from: libp2p::PeerId,
) {
    let (peer, request, mut responder) = next_event(&mut events, "an inbound job", |e| match e {
        OverlayEvent::InboundJob {
            peer,
            request,
            responder,
        } => Some((peer, request, responder)),
        _ => None,
    })
    .await;
    assert_eq!(peer, expect_from);
    assert_eq!(request, b"prompt: hello".to_vec());
    responder
        .send_data(b"tok-1".to_vec())
        .await
        .expect("data 1");
    responder
        .send_data(b"tok-2".to_vec())
        .await
        .expect("data 2");
    responder
        .end(b"usage: 2 tokens".to_vec())
        .await
        .expect("end");
}

pub(crate) async fn run_job(gateway: &OverlayHandle, worker: libp2p::PeerId) -> Vec<JobFrame> {
    let mut job = gateway
        .open_job(worker, b"prompt: hello".to_vec())
        .await
        .expect("open job");
    assert_eq!(job.peer(), worker);
    let mut frames = Vec::new();
    let collect = async {
        while let Some(frame) = job.next_frame().await {
            frames.push(frame.expect("frame"));
        }
    };
    tokio::time::timeout(WAIT, collect)
        .await
        .expect("job finishes");
    frames
}

pub(crate) fn expected_frames() -> Vec<JobFrame> {
    vec![
        JobFrame::Data(b"tok-1".to_vec()),
        JobFrame::Data(b"tok-2".to_vec()),
        JobFrame::End(b"usage: 2 tokens".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_data_then_end_over_tcp() {
    init_tracing();
    let mut nodes = spawn_mesh(2, 4_000).await.expect("spawn mesh");
    let worker = nodes.pop().expect("worker");
    let gateway = nodes.pop().expect("gateway");
    // The gateway is the bootstrap node: it learns the worker's address when the worker dials in.
    wait_until_connected(&gateway.handle, worker.peer_id, WAIT)
        .await
        .expect("connected");
    let server = tokio::spawn(serve_one(worker.events, gateway.peer_id));
    assert_eq!(
        run_job(&gateway.handle, worker.peer_id).await,
        expected_frames()
    );
    server.await.expect("worker task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_data_then_end_over_quic() {
    init_tracing();
    let quic = |seed| {
        let mut config = local_config(seeded_keypair(seed));
        config.listen_addrs = vec![libp2p::Multiaddr::from(std::net::Ipv4Addr::LOCALHOST)
            .with(Protocol::Udp(0))
            .with(Protocol::QuicV1)];
        config
    };
    let worker: LocalNode = spawn_local(quic(5_000)).await.expect("worker");
    assert!(worker.addr.iter().any(|p| p == Protocol::QuicV1));
    let mut config = quic(5_001);
    config.bootstrap = vec![worker.addr.clone()];
    let gateway = spawn_local(config).await.expect("gateway");
    let server = tokio::spawn(serve_one(worker.events, gateway.peer_id));
    assert_eq!(
        run_job(&gateway.handle, worker.peer_id).await,
        expected_frames()
    );
    server.await.expect("worker task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_refuses_jobs_past_its_cap() {
    init_tracing();
    let mut config = local_config(seeded_keypair(6_000));
    config.max_inbound_jobs = 1;
    let mut worker = spawn_local(config).await.expect("worker");
    let mut config = local_config(seeded_keypair(6_001));
    config.bootstrap = vec![worker.addr.clone()];
    let gateway = spawn_local(config).await.expect("gateway");

    // The first job takes the only slot and is held open.
    let _first = gateway
        .handle
        .open_job(worker.peer_id, b"first".to_vec())
        .await
        .expect("open first");
    let held = next_event(&mut worker.events, "the first job", |e| match e {
        OverlayEvent::InboundJob { responder, .. } => Some(responder),
        _ => None,
    })
    .await;

    let mut second = gateway
        .handle
        .open_job(worker.peer_id, b"second".to_vec())
        .await
        .expect("open second");
    let frame = tokio::time::timeout(WAIT, second.next_frame())
        .await
        .expect("an answer")
        .expect("a frame")
        .expect("a valid frame");
    assert!(
        matches!(
            frame,
            JobFrame::Error {
                code: JobErrorCode::Busy,
                ..
            }
        ),
        "{frame:?}"
    );
    drop(held);
}

/// A job opened while the connection to the worker is still being set up
/// must wait for it, not hang: libp2p-stream alone parks a stream request
/// made in the middle of connection establishment forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_opened_while_the_connection_is_set_up_is_answered() {
    init_tracing();
    for round in 0..40u64 {
        let worker = spawn_local(local_config(seeded_keypair(7_000 + 2 * round)))
            .await
            .expect("worker");
        let mut config = local_config(seeded_keypair(7_001 + 2 * round));
        config.bootstrap = vec![worker.addr.clone()];
        let gateway = spawn_local(config).await.expect("gateway");
        let server = tokio::spawn(serve_one(worker.events, gateway.peer_id));
        // Sweep the moment of the request across the connection handshake.
        let until = std::time::Instant::now() + std::time::Duration::from_micros(100 * round);
        while std::time::Instant::now() < until {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            run_job(&gateway.handle, worker.peer_id).await,
            expected_frames(),
            "round {round}"
        );
        server.await.expect("worker task");
        gateway.handle.shutdown();
        worker.handle.shutdown();
    }
}
