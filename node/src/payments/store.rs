//! The payments redb file: JSON records in a few tables, each change in one
//! write transaction that is committed (durable) before the caller sees it.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{store_err, Result};

/// Gateway lanes, keyed by the worker's raw address.
pub(crate) const CLIENT_LANES: TableDefinition<&str, &[u8]> = TableDefinition::new("client_lanes");
/// Open reservations, keyed by id.
pub(crate) const RESERVATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("reservations");
/// Worker-side lanes, keyed by `contract/lane_id`.
pub(crate) const WORKER_LANES: TableDefinition<&str, &[u8]> = TableDefinition::new("worker_lanes");
/// Jobs a worker ran for a paying client, until their cheque arrives or
/// they are booked as unpaid; keyed by `contract/job`.
pub(crate) const WORKER_JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("worker_jobs");
/// Cheques the gateway signed and could not deliver yet, keyed by the
/// worker's raw address (the latest per lane: cheques are cumulative).
pub(crate) const UNDELIVERED: TableDefinition<&str, &[u8]> = TableDefinition::new("undelivered");
/// Counters.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A handle to the payments database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_err)?;
        }
        let db = Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(CLIENT_LANES).map_err(store_err)?;
        tx.open_table(RESERVATIONS).map_err(store_err)?;
        tx.open_table(WORKER_LANES).map_err(store_err)?;
        tx.open_table(WORKER_JOBS).map_err(store_err)?;
        tx.open_table(UNDELIVERED).map_err(store_err)?;
        tx.open_table(META).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(Store { db: Arc::new(db) })
    }

    /// The global id of the network this store settles on: `ledger`'s,
    /// remembered at first use. Refused when the ledger's differs from the
    /// one remembered; the remembered one when the ledger cannot be reached.
    pub async fn network(&self, ledger: &dyn silk_chain::Ledger) -> Result<i32> {
        const KEY: &str = "network_global_id";
        let remembered = {
            let tx = self.db.begin_read().map_err(store_err)?;
            let t = tx.open_table(META).map_err(store_err)?;
            t.get(KEY)
                .map_err(store_err)?
                .map(|v| v.value() as u32 as i32)
        };
        match (ledger.global_id().await, remembered) {
            (Ok(id), Some(r)) if id != r => Err(super::PaymentsError::Config(format!(
                "this data directory's payments were made on network {r}, but the ledger is network {id}; its lanes and cheques belong to network {r}: use another data directory for network {id}"
            ))),
            (Ok(id), Some(_)) => Ok(id),
            (Ok(id), None) => {
                let tx = self.write()?;
                tx.open_table(META)
                    .map_err(store_err)?
                    .insert(KEY, u64::from(id as u32))
                    .map_err(store_err)?;
                tx.commit().map_err(store_err)?;
                Ok(id)
            }
            (Err(e), Some(r)) => {
                tracing::warn!(error = %e, network = r, "cannot ask the ledger for its network; using the one this data directory remembers");
                Ok(r)
            }
            (Err(e), None) => Err(e.into()),
        }
    }

    pub(crate) fn write(&self) -> Result<WriteTransaction> {
        self.db.begin_write().map_err(store_err)
    }

    /// Every record of a string-keyed table.
    pub(crate) fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(table).map_err(store_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(store_err)? {
            let (_, v) = row.map_err(store_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(store_err)?);
        }
        Ok(out)
    }

    /// One record of a string-keyed table.
    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(table).map_err(store_err)?;
        get_in(&t, key)
    }
}

pub(crate) fn get_in<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    match t.get(key).map_err(store_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(store_err)?)),
        None => Ok(None),
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(store_err)
}

/// Reads and increments counter `name` inside `tx`.
pub(crate) fn next_counter(tx: &WriteTransaction, name: &str, first: u64) -> Result<u64> {
    let mut meta = tx.open_table(META).map_err(store_err)?;
    let v = meta
        .get(name)
        .map_err(store_err)?
        .map(|g| g.value())
        .unwrap_or(first);
    meta.insert(name, v.saturating_add(1)).map_err(store_err)?;
    Ok(v)
}
