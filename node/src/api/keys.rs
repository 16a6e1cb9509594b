//! API keys: who may call this node's HTTP API, how often, and how much of
//! the operator's TON their requests may spend in a day.
//!
//! A key reads `sk-silk-<id>.<secret>`: `id` (12 hex digits) names it in
//! listings and logs, `secret` (64 hex digits, 256 random bits) proves it.
//! Only the SHA-256 of the whole key is stored, in `api.redb` in the data
//! directory; a presented key is hashed and compared in constant time. The
//! key itself is shown once, when it is created.
//!
//! # Limits
//!
//! - *Rate*: at most `rate_per_min` requests a minute (GCRA, with a burst of
//!   the same size), kept in memory.
//! - *Spend*: at most `spend_cap_nano_per_day` nanoTON of jobs a UTC day. A
//!   request first [holds](ApiKeys::hold) its worst case (its prompt bound
//!   and `max_tokens` at the highest coefficient it accepts) against the
//!   cap, before any lane is opened or reserved; it is refused if what the
//!   key spent today plus what its running requests hold plus this worst
//!   case would pass the cap. When the job ends, [`SpendHold::settle`]
//!   commits what it cost to redb (the worst case when the gateway could
//!   not settle it) and lets the hold go; a job counts on the UTC day it
//!   ends. A hold dropped unsettled (no worker took the job) costs nothing.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand_core::{OsRng, RngCore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use silk_chain::Coins;
use subtle::ConstantTimeEq;

/// File name of the API key database inside the data directory.
pub const KEYS_FILE: &str = "api.redb";
/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-silk-";
/// Longest key name.
pub const MAX_NAME_LEN: usize = 64;

/// Keys by id.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
/// What each key spent on its last day of use, by id.
const SPEND: TableDefinition<&str, &[u8]> = TableDefinition::new("api_key_spend");

const SECONDS_PER_DAY: u64 = 86_400;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key database could not be read or written.
    #[error("API key store: {0}")]
    Store(String),
    /// Another process (a running `silk run`) holds the database.
    #[error(
        "the API key store {0} is held by a running node: stop `silk run` on this data directory, \
         change the keys, and start it again"
    )]
    InUse(String),
    /// The presented string is not shaped like a silk key.
    #[error("the API key is malformed: silk keys look like `sk-silk-<id>.<secret>`")]
    Malformed,
    /// No key with that id, or a wrong secret.
    #[error("the API key is not valid on this node")]
    Unknown,
    /// The key was revoked.
    #[error("the API key `{0}` was revoked")]
    Revoked(String),
    /// `revoke` named no key.
    #[error("no API key has the id or name `{0}` (see `silk api-key list`)")]
    NotFound(String),
    /// A key with this name exists and is not revoked.
    #[error("an API key named `{0}` exists already: pick another name or revoke it first")]
    DuplicateName(String),
    /// The name is empty, too long, or has characters other than letters,
    /// digits, `-`, `_` and `.`.
    #[error("key names are 1 to {MAX_NAME_LEN} letters, digits, `-`, `_` or `.`, got {0:?}")]
    BadName(String),
    /// A limit of zero.
    #[error("{0} must be above zero")]
    ZeroLimit(&'static str),
    /// This request could pass the key's daily spend cap.
    #[error(
        "API key `{name}` has spent {spent} TON of its {cap} TON daily cap and its running \
         requests hold {held} TON; this request could cost up to {needed} TON (the cap resets at \
         00:00 UTC; lower max_tokens or max_coefficient, or ask the operator for a higher cap)"
    )]
    SpendCapReached {
        /// The key's name.
        name: String,
        /// The cap.
        cap: Coins,
        /// Spent today.
        spent: Coins,
        /// Held by running requests.
        held: Coins,
        /// This request's worst case.
        needed: Coins,
    },
}

fn store_err(e: impl std::fmt::Display) -> KeyError {
    KeyError::Store(e.to_string())
}

/// A key's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Most nanoTON its requests may cost in a UTC day; `None`: no cap.
    pub spend_cap_per_day: Option<Coins>,
    /// Most requests a minute; `None`: no limit.
    pub rate_per_min: Option<u32>,
}

/// One API key as stored (without its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id, the part of the key before the `.`.
    pub id: String,
    /// The operator's name for it.
    pub name: String,
    /// When it was created (Unix seconds).
    pub created_unix: u64,
    /// Daily spend cap in nanoTON.
    pub spend_cap_nano_per_day: Option<u64>,
    /// Requests a minute.
    pub rate_per_min: Option<u32>,
    /// Whether it was revoked.
    pub revoked: bool,
    /// SHA-256 of the whole key, hex.
    sha256: String,
}

/// What a key spent on one day.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Spend {
    day: u64,
    nano: u64,
}

/// A key with what it spent today, for listings.
#[derive(Clone, Debug)]
pub struct KeyUsage {
    /// The key.
    pub key: ApiKey,
    /// What its jobs cost today (UTC).
    pub spent_today: Coins,
}

type Now = dyn Fn() -> u64 + Send + Sync;

struct Inner {
    db: Database,
    /// Unix seconds (injected in tests).
    now: Box<Now>,
    /// Worst cases held by running requests, nanoTON by key id. Also the
    /// lock that makes check-and-hold atomic.
    held: Mutex<HashMap<String, u128>>,
    limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

/// The API key database; cheap to clone.
#[derive(Clone)]
pub struct ApiKeys {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKeys")
    }
}

fn system_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ApiKeys {
    /// Opens (or creates) the key database at `path`.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        Self::open_with_clock(path, Box::new(system_now))
    }

    /// Like [`ApiKeys::open`], with `now` giving Unix seconds (tests move days).
    pub fn open_with_clock(path: &Path, now: Box<Now>) -> Result<Self, KeyError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_err)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => KeyError::InUse(path.display().to_string()),
            e => store_err(e),
        })?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(KEYS).map_err(store_err)?;
        tx.open_table(SPEND).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                now,
                held: Mutex::default(),
                limiters: Mutex::default(),
            }),
        })
    }

    fn today(&self) -> u64 {
        (self.inner.now)() / SECONDS_PER_DAY
    }

    /// Creates a key named `name`; returns it and the key string, which is
    /// shown this once and never stored.
    pub fn create(&self, name: &str, limits: KeyLimits) -> Result<(ApiKey, String), KeyError> {
        if !valid_name(name) {
            return Err(KeyError::BadName(name.to_string()));
        }
        if limits.rate_per_min == Some(0) {
            return Err(KeyError::ZeroLimit("the rate"));
        }
        let cap = match limits.spend_cap_per_day {
            Some(c) if c == Coins::ZERO => return Err(KeyError::ZeroLimit("the spend cap")),
            Some(c) => Some(
                u64::try_from(c.nano())
                    .map_err(|_| KeyError::Store(format!("a spend cap of {c} TON is too large")))?,
            ),
            None => None,
        };
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut id);
        OsRng.fill_bytes(&mut secret);
        let id = hex::encode(id);
        let secret = format!("{KEY_PREFIX}{id}.{}", hex::encode(secret));
        let key = ApiKey {
            id: id.clone(),
            name: name.to_string(),
            created_unix: (self.inner.now)(),
            spend_cap_nano_per_day: cap,
            rate_per_min: limits.rate_per_min,
            revoked: false,
            sha256: sha256_hex(&secret),
        };
        let tx = self.inner.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(KEYS).map_err(store_err)?;
            for row in t.iter().map_err(store_err)? {
                let (_, v) = row.map_err(store_err)?;
                let other: ApiKey = serde_json::from_slice(v.value()).map_err(store_err)?;
                if other.name == key.name && !other.revoked {
                    return Err(KeyError::DuplicateName(key.name));
                }
            }
            let bytes = serde_json::to_vec(&key).map_err(store_err)?;
            t.insert(id.as_str(), bytes.as_slice()).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok((key, secret))
    }

    /// Every key with what it spent today.
    pub fn list(&self) -> Result<Vec<KeyUsage>, KeyError> {
        let today = self.today();
        let tx = self.inner.db.begin_read().map_err(store_err)?;
        let keys = tx.open_table(KEYS).map_err(store_err)?;
        let spend = tx.open_table(SPEND).map_err(store_err)?;
        let mut out = Vec::new();
        for row in keys.iter().map_err(store_err)? {
            let (_, v) = row.map_err(store_err)?;
            let key: ApiKey = serde_json::from_slice(v.value()).map_err(store_err)?;
            let spent = spent_on(&spend, &key.id, today)?;
            out.push(KeyUsage {
                key,
                spent_today: Coins(u128::from(spent)),
            });
        }
        out.sort_by_key(|u| u.key.created_unix);
        Ok(out)
    }

    /// Revokes the key with this id or name (its requests are refused from
    /// now on); returns it.
    pub fn revoke(&self, id_or_name: &str) -> Result<ApiKey, KeyError> {
        let tx = self.inner.db.begin_write().map_err(store_err)?;
        let key = {
            let mut t = tx.open_table(KEYS).map_err(store_err)?;
            let mut found = None;
            for row in t.iter().map_err(store_err)? {
                let (_, v) = row.map_err(store_err)?;
                let k: ApiKey = serde_json::from_slice(v.value()).map_err(store_err)?;
                if !k.revoked && (k.id == id_or_name || k.name == id_or_name) {
                    found = Some(k);
                    break;
                }
            }
            let mut key = found.ok_or_else(|| KeyError::NotFound(id_or_name.to_string()))?;
            key.revoked = true;
            let bytes = serde_json::to_vec(&key).map_err(store_err)?;
            t.insert(key.id.as_str(), bytes.as_slice())
                .map_err(store_err)?;
            key
        };
        tx.commit().map_err(store_err)?;
        if let Ok(mut l) = self.inner.limiters.lock() {
            l.remove(&key.id);
        }
        Ok(key)
    }

    /// The key `presented` (the bearer token), if it is one of ours and
    /// not revoked.
    pub fn authenticate(&self, presented: &str) -> Result<ApiKey, KeyError> {
        let rest = presented
            .strip_prefix(KEY_PREFIX)
            .ok_or(KeyError::Malformed)?;
        let (id, secret) = rest.split_once('.').ok_or(KeyError::Malformed)?;
        if id.len() != 12 || secret.len() != 64 {
            return Err(KeyError::Malformed);
        }
        let tx = self.inner.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(KEYS).map_err(store_err)?;
        let key: ApiKey = match t.get(id).map_err(store_err)? {
            Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
            None => return Err(KeyError::Unknown),
        };
        let presented_hash = sha256_hex(presented);
        if !bool::from(presented_hash.as_bytes().ct_eq(key.sha256.as_bytes())) {
            return Err(KeyError::Unknown);
        }
        if key.revoked {
            return Err(KeyError::Revoked(key.name));
        }
        Ok(key)
    }

    /// Counts one request of `key` against its rate; `Err` carries how
    /// long until the next one is allowed.
    pub fn check_rate(&self, key: &ApiKey) -> Result<(), Duration> {
        let Some(rate) = key.rate_per_min.and_then(NonZeroU32::new) else {
            return Ok(());
        };
        let limiter = {
            let Ok(mut map) = self.inner.limiters.lock() else {
                return Ok(());
            };
            Arc::clone(
                map.entry(key.id.clone())
                    .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_minute(rate)))),
            )
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Holds `worst` against `key`'s daily spend cap for one request.
    pub fn hold(&self, key: &ApiKey, worst: Coins) -> Result<SpendHold, KeyError> {
        let mut held = self
            .inner
            .held
            .lock()
            .map_err(|_| store_err("spend lock poisoned"))?;
        let holding = held.get(&key.id).copied().unwrap_or(0);
        if let Some(cap) = key.spend_cap_nano_per_day {
            let spent = {
                let tx = self.inner.db.begin_read().map_err(store_err)?;
                let t = tx.open_table(SPEND).map_err(store_err)?;
                spent_on(&t, &key.id, self.today())?
            };
            let total = u128::from(spent)
                .saturating_add(holding)
                .saturating_add(worst.nano());
            if total > u128::from(cap) {
                return Err(KeyError::SpendCapReached {
                    name: key.name.clone(),
                    cap: Coins(u128::from(cap)),
                    spent: Coins(u128::from(spent)),
                    held: Coins(holding),
                    needed: worst,
                });
            }
        }
        held.insert(key.id.clone(), holding.saturating_add(worst.nano()));
        Ok(SpendHold {
            keys: self.clone(),
            id: key.id.clone(),
            amount: worst.nano(),
            live: true,
        })
    }

    /// What `key` spent today (UTC), committed jobs only.
    pub fn spent_today(&self, id: &str) -> Result<Coins, KeyError> {
        let tx = self.inner.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(SPEND).map_err(store_err)?;
        Ok(Coins(u128::from(spent_on(&t, id, self.today())?)))
    }

    /// Adds `charge` to what `id` spent today, durably.
    fn charge(&self, id: &str, charge: u128) -> Result<(), KeyError> {
        let today = self.today();
        let tx = self.inner.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(SPEND).map_err(store_err)?;
            let before = spent_on(&t, id, today)?;
            let after = Spend {
                day: today,
                nano: before.saturating_add(u64::try_from(charge).unwrap_or(u64::MAX)),
            };
            let bytes = serde_json::to_vec(&after).map_err(store_err)?;
            t.insert(id, bytes.as_slice()).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    fn release(&self, id: &str, amount: u128) {
        if let Ok(mut held) = self.inner.held.lock() {
            if let Some(h) = held.get_mut(id) {
                *h = h.saturating_sub(amount);
                if *h == 0 {
                    held.remove(id);
                }
            }
        }
    }
}

fn spent_on(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    day: u64,
) -> Result<u64, KeyError> {
    match t.get(id).map_err(store_err)? {
        Some(v) => {
            let s: Spend = serde_json::from_slice(v.value()).map_err(store_err)?;
            Ok(if s.day == day { s.nano } else { 0 })
        }
        None => Ok(0),
    }
}

/// One request's worst case, held against its key's daily cap until the
/// job ends.
#[must_use = "a hold is settled with what the job cost, or dropped if no job ran"]
pub struct SpendHold {
    keys: ApiKeys,
    id: String,
    amount: u128,
    live: bool,
}

impl std::fmt::Debug for SpendHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpendHold")
            .field("key", &self.id)
            .field("nano", &self.amount)
            .finish()
    }
}

impl SpendHold {
    /// The job ended: commits what it cost (`None`: the gateway could not
    /// settle it, so the whole worst case counts) and lets the hold go.
    pub async fn settle(mut self, cost: Option<Coins>) {
        self.live = false;
        let charge = cost.map_or(self.amount, Coins::nano);
        let keys = self.keys.clone();
        let id = self.id.clone();
        let amount = self.amount;
        let r = tokio::task::spawn_blocking(move || {
            let r = if charge > 0 {
                keys.charge(&id, charge)
            } else {
                Ok(())
            };
            keys.release(&id, amount);
            r
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(key = %self.id, error = %e, "could not record an API key's spending")
            }
            Err(e) => tracing::error!(key = %self.id, error = %e, "API key spending task failed"),
        }
    }
}

impl Drop for SpendHold {
    fn drop(&mut self) {
        if self.live {
            self.keys.release(&self.id, self.amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn keys_at(dir: &Path, clock: Arc<AtomicU64>) -> ApiKeys {
        ApiKeys::open_with_clock(
            &dir.join(KEYS_FILE),
            Box::new(move || clock.load(Ordering::SeqCst)),
        )
        .expect("open")
    }

    #[test]
    fn keys_authenticate_only_with_their_secret_and_until_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = ApiKeys::open(&dir.path().join(KEYS_FILE)).expect("open");
        let (key, secret) = keys.create("app", KeyLimits::default()).expect("create");
        assert!(secret.starts_with(KEY_PREFIX));
        assert_eq!(keys.authenticate(&secret).expect("valid"), key);
        // The secret is not stored: nothing in the file reads like it.
        drop(keys);
        let raw = std::fs::read(dir.path().join(KEYS_FILE)).expect("read");
        let tail = secret.split_once('.').expect("dot").1;
        assert!(!raw.windows(tail.len()).any(|w| w == tail.as_bytes()));
        let keys = ApiKeys::open(&dir.path().join(KEYS_FILE)).expect("reopen");

        let mut wrong = secret.clone();
        let last = wrong.pop().expect("char");
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(keys.authenticate(&wrong), Err(KeyError::Unknown)));
        assert!(matches!(
            keys.authenticate("sk-other"),
            Err(KeyError::Malformed)
        ));
        assert!(matches!(
            keys.create("app", KeyLimits::default()),
            Err(KeyError::DuplicateName(_))
        ));
        assert!(matches!(
            keys.create("no spaces", KeyLimits::default()),
            Err(KeyError::BadName(_))
        ));
        keys.revoke("app").expect("revoke");
        assert!(matches!(
            keys.authenticate(&secret),
            Err(KeyError::Revoked(_))
        ));
        assert!(matches!(keys.revoke("app"), Err(KeyError::NotFound(_))));
        // The name is free again.
        keys.create("app", KeyLimits::default()).expect("new key");
    }

    #[test]
    fn the_rate_limit_refuses_past_n_a_minute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = ApiKeys::open(&dir.path().join(KEYS_FILE)).expect("open");
        let limits = KeyLimits {
            rate_per_min: Some(3),
            ..KeyLimits::default()
        };
        let (key, _) = keys.create("limited", limits).expect("create");
        let (free, _) = keys.create("free", KeyLimits::default()).expect("create");
        for _ in 0..3 {
            keys.check_rate(&key).expect("within the rate");
        }
        let wait = keys.check_rate(&key).expect_err("the fourth is refused");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20));
        for _ in 0..100 {
            keys.check_rate(&free).expect("no limit");
        }
    }

    #[test]
    fn spend_caps_count_holds_and_settled_costs_per_utc_day_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(AtomicU64::new(10 * SECONDS_PER_DAY + 5));
        let keys = keys_at(dir.path(), Arc::clone(&clock));
        let limits = KeyLimits {
            spend_cap_per_day: Some(Coins(1_000)),
            ..KeyLimits::default()
        };
        let (key, _) = keys.create("capped", limits).expect("create");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");

        // Two holds of 400 fit; a third does not while they run.
        let a = keys.hold(&key, Coins(400)).expect("first");
        let b = keys.hold(&key, Coins(400)).expect("second");
        match keys.hold(&key, Coins(400)) {
            Err(KeyError::SpendCapReached {
                spent, held, cap, ..
            }) => {
                assert_eq!((spent, held, cap), (Coins(0), Coins(800), Coins(1_000)));
            }
            other => panic!("expected the cap, got {other:?}"),
        }
        // One job cost 150 of its 400; the other never ran.
        rt.block_on(a.settle(Some(Coins(150))));
        drop(b);
        assert_eq!(keys.spent_today(&key.id).expect("spent"), Coins(150));
        let c = keys.hold(&key, Coins(850)).expect("850 + 150 fits");
        assert!(keys.hold(&key, Coins(1)).is_err(), "the cap is full");
        // Settling failed: the worst case counts.
        rt.block_on(c.settle(None));
        assert_eq!(keys.spent_today(&key.id).expect("spent"), Coins(1_000));

        // A restart forgets nothing.
        drop(keys);
        let keys = keys_at(dir.path(), Arc::clone(&clock));
        assert!(
            keys.hold(&key, Coins(1)).is_err(),
            "still capped after restart"
        );
        assert_eq!(keys.list().expect("list")[0].spent_today, Coins(1_000));

        // The next UTC day starts from zero.
        clock.store(11 * SECONDS_PER_DAY, Ordering::SeqCst);
        assert_eq!(keys.spent_today(&key.id).expect("spent"), Coins(0));
        let d = keys.hold(&key, Coins(1_000)).expect("a new day");
        rt.block_on(d.settle(Some(Coins(7))));
        assert_eq!(keys.spent_today(&key.id).expect("spent"), Coins(7));
    }

    #[test]
    fn a_second_process_is_told_the_store_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEYS_FILE);
        let _held = ApiKeys::open(&path).expect("open");
        match ApiKeys::open(&path) {
            Err(KeyError::InUse(p)) => assert!(p.ends_with(KEYS_FILE)),
            other => panic!("expected InUse, got {other:?}"),
        }
    }
}
