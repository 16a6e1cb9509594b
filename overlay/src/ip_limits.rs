//! A cap on inbound connections per remote IP address, and per relay
//! (audit F13).
//!
//! `connection_limits` caps connections in total, inbound and per peer id,
//! but peer ids are free: one machine with fresh keys could take every
//! inbound slot. This behaviour counts inbound connections (pending and
//! established) by where they come from and refuses those past the cap.
//! A relayed connection arrives with no remote IP at all (libp2p-relay
//! gives it `/p2p/<source>` as its address), so it is counted against the
//! relay it came through, named by the listener's own address
//! (`<relay>/p2p-circuit`): fresh peer ids behind one relay take no more
//! slots than fresh peer ids from one address.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    task::{Context, Poll},
};

use libp2p::{
    core::{multiaddr::Protocol, transport::PortUse, ConnectedPoint, Endpoint},
    swarm::{
        behaviour::{ConnectionEstablished, ListenFailure},
        dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour,
        THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// Where an inbound connection comes from, as the cap counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// A direct connection from this address.
    Ip(IpAddr),
    /// A connection relayed by this peer.
    Relay(PeerId),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Ip(ip) => write!(f, "{ip}"),
            Source::Relay(relay) => write!(f, "relay {relay}"),
        }
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{from} already has {limit} inbound connections to this node")]
pub(crate) struct TooManyFrom {
    /// Where it came from.
    pub(crate) from: Source,
    /// The cap.
    pub(crate) limit: u32,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Behaviour {
    limit: u32,
    per_source: HashMap<Source, u32>,
    by_connection: HashMap<ConnectionId, Source>,
}

impl Behaviour {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            per_source: HashMap::new(),
            by_connection: HashMap::new(),
        }
    }

    fn release(&mut self, connection: ConnectionId) {
        if let Some(source) = self.by_connection.remove(&connection) {
            if let Some(n) = self.per_source.get_mut(&source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&source);
                }
            }
        }
    }
}

/// Where an inbound connection with these addresses comes from. When
/// `local` is a relayed listener's address (`<relay>/p2p-circuit`), the
/// relay: its peer id (the last `/p2p` before the circuit), or its IP
/// address where the relay's address names no peer (a relay that dialled
/// us). Otherwise the IP address `remote` starts with, if any.
fn source_of(local: &Multiaddr, remote: &Multiaddr) -> Option<Source> {
    let mut relay = None;
    for p in local.iter() {
        match p {
            Protocol::P2p(peer) => relay = Some(peer),
            Protocol::P2pCircuit => {
                return relay.map(Source::Relay).or_else(|| ip_of(local));
            }
            _ => {}
        }
    }
    ip_of(remote)
}

/// The IP address a multiaddr starts with, if any.
fn ip_of(addr: &Multiaddr) -> Option<Source> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(Source::Ip(IpAddr::V4(ip))),
        Protocol::Ip6(ip) => Some(Source::Ip(IpAddr::V6(ip))),
        _ => None,
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(source) = source_of(local, remote) else {
            return Ok(());
        };
        let n = self.per_source.get(&source).copied().unwrap_or(0);
        if n >= self.limit {
            return Err(ConnectionDenied::new(TooManyFrom {
                from: source,
                limit: self.limit,
            }));
        }
        self.per_source.insert(source, n + 1);
        self.by_connection.insert(connection_id, source);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // A pending inbound connection that failed, or that another
            // behaviour refused, never becomes established.
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. })
            | FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.release(connection_id)
            }
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                connection_id,
                endpoint: ConnectedPoint::Dialer { .. },
                ..
            }) => debug_assert!(!self.by_connection.contains_key(&connection_id)),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_pending_and_established_and_frees_on_close() {
        let mut b = Behaviour::new(2);
        let local: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("addr");
        let a: Multiaddr = "/ip4/203.0.113.7/tcp/5000".parse().expect("addr");
        let other: Multiaddr = "/ip6/2001:db8::1/tcp/5000".parse().expect("addr");
        let (c1, c2, c3, c4) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
            ConnectionId::new_unchecked(4),
        );
        assert!(b.handle_pending_inbound_connection(c1, &local, &a).is_ok());
        assert!(b.handle_pending_inbound_connection(c2, &local, &a).is_ok());
        assert!(b.handle_pending_inbound_connection(c3, &local, &a).is_err());
        assert!(b
            .handle_pending_inbound_connection(c4, &local, &other)
            .is_ok());
        b.release(c1);
        assert!(b.handle_pending_inbound_connection(c3, &local, &a).is_ok());
        for c in [c2, c3, c4] {
            b.release(c);
        }
        assert!(b.per_source.is_empty() && b.by_connection.is_empty());
    }

    /// A relayed connection has no remote IP (libp2p-relay names it
    /// `/p2p/<source>`): it counts against the relay it came through, each
    /// relay on its own, apart from direct connections. Before, such
    /// connections were not counted at all.
    #[test]
    fn relayed_connections_count_against_their_relay() {
        use libp2p::identity;
        let mut b = Behaviour::new(2);
        let relay = |seed: u8| {
            identity::Keypair::ed25519_from_bytes([seed; 32])
                .expect("key")
                .public()
                .to_peer_id()
        };
        let (r1, r2) = (relay(1), relay(2));
        let via = |r: PeerId| -> Multiaddr {
            format!("/ip4/10.0.0.9/tcp/4001/p2p/{r}/p2p-circuit")
                .parse()
                .expect("addr")
        };
        let from = |seed: u8| -> Multiaddr { Protocol::P2p(relay(100 + seed)).into() };
        let direct: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("addr");
        let relay_ip: Multiaddr = "/ip4/10.0.0.9/tcp/5000".parse().expect("addr");
        let c = ConnectionId::new_unchecked;
        assert!(b
            .handle_pending_inbound_connection(c(1), &via(r1), &from(1))
            .is_ok());
        assert!(b
            .handle_pending_inbound_connection(c(2), &via(r1), &from(2))
            .is_ok());
        let refused = b
            .handle_pending_inbound_connection(c(3), &via(r1), &from(3))
            .expect_err("a third through r1")
            .downcast::<TooManyFrom>()
            .expect("refused by the cap");
        assert_eq!(refused.from, Source::Relay(r1));
        assert!(b
            .handle_pending_inbound_connection(c(4), &via(r2), &from(4))
            .is_ok());
        // The relay's own direct connections have their own count.
        assert!(b
            .handle_pending_inbound_connection(c(5), &direct, &relay_ip)
            .is_ok());
        // A relay that dialled us is known by its address alone.
        let anonymous: Multiaddr = "/ip4/10.0.0.7/tcp/4001/p2p-circuit".parse().expect("addr");
        assert!(b
            .handle_pending_inbound_connection(c(6), &anonymous, &from(6))
            .is_ok());
        assert!(b
            .handle_pending_inbound_connection(c(7), &anonymous, &from(7))
            .is_ok());
        assert!(b
            .handle_pending_inbound_connection(c(8), &anonymous, &from(8))
            .is_err());
        b.release(c(1));
        assert!(b
            .handle_pending_inbound_connection(c(3), &via(r1), &from(3))
            .is_ok());
        for id in [2, 3, 4, 5, 6, 7] {
            b.release(c(id));
        }
        assert!(b.per_source.is_empty() && b.by_connection.is_empty());
    }
}
