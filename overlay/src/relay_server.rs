//! libp2p's circuit-relay server, kept away from relayed connections and
//! relayed addresses.
//!
//! `libp2p-relay` 0.22 gives every relayed connection a dummy handler (no
//! circuit can run over a circuit) but still records the connection, and
//! when its status changes (it starts or stops offering the hop protocol
//! because a confirmed external address came or went) it sends the new
//! status to every recorded connection: a relayed one's dummy handler gets
//! an event it cannot take, and libp2p-swarm's `Either` handler panics
//! (`handler/either.rs`: "entered unreachable code"), tearing down that
//! connection with whatever job ran over it. A node behind NAT triggers it
//! reliably: its relay client confirms the node's relayed listen address
//! as external, which turns the server on while the node holds relayed
//! connections. Seen in the NAT test as a gateway's job stream closed
//! after 11 tokens, with that panic in the gateway's log.
//!
//! [`RelayServer`] passes everything through except the events of relayed
//! connections (they never carry reservations) and relayed external
//! addresses (a node reachable only through a relay must not offer
//! relaying: it has no address to offer).

use std::task::{Context, Poll};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    multiaddr::Protocol,
    relay,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// The relay server, see the module docs.
pub(crate) struct RelayServer(relay::Behaviour);

impl RelayServer {
    pub(crate) fn new(local: PeerId, config: relay::Config) -> Self {
        Self(relay::Behaviour::new(local, config))
    }
}

fn relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl NetworkBehaviour for RelayServer {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let skip = match &event {
            FromSwarm::ConnectionEstablished(e) => e.endpoint.is_relayed(),
            FromSwarm::ConnectionClosed(e) => e.endpoint.is_relayed(),
            FromSwarm::ExternalAddrConfirmed(e) => relayed(e.addr),
            FromSwarm::ExternalAddrExpired(e) => relayed(e.addr),
            _ => false,
        };
        if !skip {
            self.0.on_swarm_event(event);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}
