//! Mesh formation, announcement convergence, Kademlia provider records, attestation bytes.

use std::collections::HashSet;

use silk_overlay::{
    testing::{spawn_mesh, wait_until_connected, wait_until_converged, worker_announcement},
    OverlayEvent, PeerId,
};

use crate::{eventually, init_tracing, next_event, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge_on_every_announcement() {
    init_tracing();
    let nodes = spawn_mesh(5, 1_000).await.expect("spawn mesh");
    let handles: Vec<_> = nodes.iter().map(|n| n.handle.clone()).collect();
    let expected: HashSet<PeerId> = nodes.iter().map(|n| n.peer_id).collect();
    for (i, handle) in handles.iter().enumerate() {
        let model = format!("model-{i}");
        let announcement = worker_announcement(handle.local_peer_id(), 1, &[model.as_str()]);
        handle.announce(announcement).await.expect("announce");
    }
    wait_until_converged(&handles, &expected, WAIT)
        .await
        .expect("mesh converges");

    // Every node holds exactly what each peer announced.
    for handle in &handles {
        let known = handle.announcements().await.expect("announcements");
        assert_eq!(known.len(), 5);
        for (i, node) in nodes.iter().enumerate() {
            let a = known
                .iter()
                .find(|a| a.peer_id == node.peer_id)
                .expect("present");
            assert_eq!(a.models, vec![format!("model-{i}")]);
            assert_eq!(a.seq, 1);
        }
    }

    // A newer announcement replaces the old one everywhere.
    let mut update = worker_announcement(handles[3].local_peer_id(), 2, &["model-3"]);
    update.free_slots = 0;
    update.queue_depth = 7;
    handles[3].announce(update).await.expect("announce update");
    for handle in &handles {
        eventually("the update to reach every node", || async {
            let known = handle.announcements().await.ok()?;
            known
                .iter()
                .any(|a| a.peer_id == nodes[3].peer_id && a.seq == 2 && a.queue_depth == 7)
                .then_some(())
        })
        .await;
    }

    // Peers report RTT estimates once pings have run.
    let rtt_known = eventually("a ping RTT", || async {
        let peers = handles[0].peers().await.ok()?;
        peers.iter().any(|p| p.rtt.is_some()).then_some(peers.len())
    })
    .await;
    assert!(rtt_known >= 1);

    // Going back in sequence is refused locally.
    let stale = worker_announcement(handles[3].local_peer_id(), 1, &["model-3"]);
    assert!(handles[3].announce(stale).await.is_err());
    // So is announcing on behalf of someone else.
    let foreign = worker_announcement(nodes[0].peer_id, 9, &["model-x"]);
    assert!(handles[3].announce(foreign).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_records_are_found_through_kademlia() {
    init_tracing();
    let nodes = spawn_mesh(4, 2_000).await.expect("spawn mesh");
    let provider = &nodes[2];
    let seeker = &nodes[3];
    // The record is stored locally at once; the put reaches whoever is known.
    let _ = provider.handle.start_providing("qwen3-0.6b").await;
    let found = eventually("the provider record to be found", || async {
        let found = seeker.handle.get_providers("qwen3-0.6b").await.ok()?;
        found.contains(&provider.peer_id).then_some(found)
    })
    .await;
    assert!(!found.contains(&seeker.peer_id));
    let nobody = seeker.handle.get_providers("no-such-model").await;
    assert!(nobody.map(|f| f.is_empty()).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_bytes_travel_both_ways() {
    init_tracing();
    let mut nodes = spawn_mesh(2, 3_000).await.expect("spawn mesh");
    let asker = nodes[0].handle.clone();
    let target = nodes[1].peer_id;
    wait_until_connected(&asker, target, WAIT)
        .await
        .expect("connected");
    let mut events = std::mem::replace(&mut nodes[1].events, tokio::sync::mpsc::channel(1).1);
    let server = tokio::spawn(async move {
        let (peer, challenge, responder) =
            next_event(&mut events, "an attestation request", |e| match e {
                OverlayEvent::AttestationRequest {
                    peer,
                    challenge,
                    responder,
                } => Some((peer, challenge, responder)),
                _ => None,
            })
            .await;
        let mut evidence = b"quote-for:".to_vec();
        evidence.extend_from_slice(&challenge);
        responder.respond(evidence).await.expect("respond");
        peer
    });
    let evidence = asker
        .fetch_attestation(target, b"nonce-42".to_vec())
        .await
        .expect("fetch attestation");
    assert_eq!(evidence, b"quote-for:nonce-42".to_vec());
    assert_eq!(server.await.expect("server task"), nodes[0].peer_id);
}

// Known issue (see the overlay report): in about one run in four no gossip
// data message leaves the reporter for 30 s although publishing succeeds;
// run with `--ignored` while investigating.
#[ignore = "flaky: gossip data from the reporter is sometimes never delivered"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reputation_reports_arrive_signed_by_their_author() {
    init_tracing();
    let mut nodes = spawn_mesh(3, 11_000).await.expect("spawn mesh");
    let reporter = nodes[1].handle.clone();
    let reporter_id = nodes[1].peer_id;
    let listener_id = nodes[2].peer_id;
    let mut events = std::mem::replace(&mut nodes[2].events, tokio::sync::mpsc::channel(1).1);
    wait_until_connected(&reporter, listener_id, WAIT)
        .await
        .expect("connected");
    // Gossip is best effort while meshes form: publish until one copy lands.
    let report = b"worker X: 10 jobs, 0 failures".to_vec();
    let received = async {
        loop {
            let _ = reporter.publish_reputation(report.clone()).await;
            let wait = tokio::time::timeout(std::time::Duration::from_millis(500), async {
                while let Some(event) = events.recv().await {
                    if let OverlayEvent::Reputation { reporter, payload } = event {
                        return Some((reporter, payload));
                    }
                }
                None
            });
            if let Ok(Some(found)) = wait.await {
                return found;
            }
        }
    };
    let (from, payload) = tokio::time::timeout(WAIT, received)
        .await
        .expect("a reputation report arrives");
    assert_eq!(from, reporter_id);
    assert_eq!(payload, report);
}
