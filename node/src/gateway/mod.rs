//! The gateway's side of the mesh: what it knows of workers.
//!
//! [`WorkerTable`] holds every worker's latest announcement and this
//! node's measured RTT to it. The node's event loop offers each
//! announcement the overlay accepts, the announcer offers this node's own,
//! and a keeper task re-reads the overlay's book and ping RTTs every
//! [`TABLE_SYNC`] (overlay events are dropped when their channel is full, so
//! the table never trusts them alone). A request reads the table in memory:
//! no round trip to the overlay task, no copy of the whole book per request.

mod table;

pub use table::{WorkerTable, TABLE_SYNC};
