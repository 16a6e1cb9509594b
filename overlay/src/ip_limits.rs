//! A cap on inbound connections per remote IP address (audit F13).
//!
//! `connection_limits` caps connections in total, inbound and per peer id,
//! but peer ids are free: one machine with fresh keys could take every
//! inbound slot. This behaviour counts inbound connections (pending and
//! established) by the IP they come from and refuses those past the cap.
//! Relayed connections carry the relay's address and count against it.

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

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {limit} inbound connections to this node")]
pub(crate) struct TooManyFromIp {
    /// The remote address.
    pub(crate) ip: IpAddr,
    /// The cap.
    pub(crate) limit: u32,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Behaviour {
    limit: u32,
    per_ip: HashMap<IpAddr, u32>,
    by_connection: HashMap<ConnectionId, IpAddr>,
}

impl Behaviour {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            per_ip: HashMap::new(),
            by_connection: HashMap::new(),
        }
    }

    fn release(&mut self, connection: ConnectionId) {
        if let Some(ip) = self.by_connection.remove(&connection) {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// The IP address a multiaddr starts with, if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let n = self.per_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.limit {
            return Err(ConnectionDenied::new(TooManyFromIp {
                ip,
                limit: self.limit,
            }));
        }
        self.per_ip.insert(ip, n + 1);
        self.by_connection.insert(connection_id, ip);
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
        assert!(b.per_ip.is_empty() && b.by_connection.is_empty());
    }
}
