//! The peer budget: every node holds between `min_peers` and `max_peers`
//! connections, announcements still reach every node, and a gateway opens
//! a job to a worker it is not connected to.

use std::collections::HashSet;
use std::time::Duration;

use silk_overlay::{
    testing::{
        local_config, seeded_keypair, spawn_local, wait_until_converged, worker_announcement,
    },
    PeerId,
};

use crate::jobs::{expected_frames, run_job, serve_one};
use crate::{eventually_within, init_tracing, WAIT};

const NODES: usize = 16;
const MIN_PEERS: usize = 3;
const MAX_PEERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_keeps_its_peer_budget_and_still_reaches_every_worker() {
    init_tracing();
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES as u64 {
        let mut config = local_config(seeded_keypair(7_000 + i));
        config.min_peers = MIN_PEERS as u32;
        config.max_peers = MAX_PEERS as u32;
        if let Some(first) = nodes.first() {
            let first: &silk_overlay::testing::LocalNode = first;
            config.bootstrap = vec![first.addr.clone()];
        }
        nodes.push(spawn_local(config).await.expect("spawn"));
    }
    let handles: Vec<_> = nodes.iter().map(|n| n.handle.clone()).collect();

    // Every node bootstraps from the first, which is then connected to all
    // fifteen others: over its budget until the surplus is closed (after
    // the connections' 10 s of grace, at a check every 5 s). Before the
    // budget it stayed connected to every node it ever met.
    let counts = eventually_within(
        Duration::from_secs(90),
        "every node within its peer budget at once",
        || async {
            let mut counts = Vec::with_capacity(handles.len());
            for h in &handles {
                counts.push(h.peers().await.ok()?.len());
            }
            counts
                .iter()
                .all(|c| (MIN_PEERS..=MAX_PEERS).contains(c))
                .then_some(counts)
        },
    )
    .await;
    tracing::info!(?counts, "peers per node");

    // Gossip still reaches every node: each announces itself as a worker.
    let expected: HashSet<PeerId> = nodes.iter().map(|n| n.peer_id).collect();
    for (i, handle) in handles.iter().enumerate() {
        let model = format!("model-{i}");
        let a = worker_announcement(handle.local_peer_id(), 1, &[model.as_str()]);
        handle.announce(a).await.expect("announce");
    }
    wait_until_converged(&handles, &expected, WAIT)
        .await
        .expect("every node holds every announcement");

    // A gateway not connected to the worker still runs a job on it: the
    // overlay finds the worker's address in the DHT.
    let worker = nodes.pop().expect("a worker");
    let mut gateway = None;
    for h in &handles[..handles.len() - 1] {
        let peers = h.peers().await.expect("peers");
        if peers.iter().all(|p| p.peer_id != worker.peer_id) {
            gateway = Some(h.clone());
            break;
        }
    }
    let gateway = gateway.expect("with 6 peers of 15, some node is not connected to the worker");
    let served = tokio::spawn(serve_one(worker.events, gateway.local_peer_id()));
    assert_eq!(run_job(&gateway, worker.peer_id).await, expected_frames());
    served.await.expect("the worker served the job");
}
