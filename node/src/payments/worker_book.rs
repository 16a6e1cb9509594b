//! The worker's side: the best cheque per client lane, what the worker
//! itself counted, and what was redeemed.
//!
//! [`WorkerBook::accept`] commits before it returns, so an acknowledged
//! cheque survives a crash and is redeemed after a restart.

use silk_chain::{Address, Coins, SignedCheque};

use super::error::{store_err, PaymentsError, Result};
use super::store::{encode, get_in, Store, WORKER_LANES};

/// One client lane as the worker books it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerLane {
    /// The client's settlement contract.
    pub contract: Address,
    /// The client's cheque key.
    pub public_key: [u8; 32],
    /// The lane.
    pub lane_id: u32,
    /// What the worker's own count says the client owes in total.
    pub computed: Coins,
    /// The highest valid cheque received.
    pub best: Option<SignedCheque>,
    /// What the contract has paid out on this lane.
    pub redeemed: Coins,
    /// What the lane held on chain when the worker last checked it.
    #[serde(default)]
    pub deposited: Coins,
}

impl WorkerLane {
    /// The best cheque's cumulative amount.
    pub fn cheque_total(&self) -> Coins {
        self.best
            .as_ref()
            .map(|c| c.cheque.cumulative)
            .unwrap_or(Coins::ZERO)
    }

    /// Covered by a cheque but not redeemed yet.
    pub fn unredeemed(&self) -> Coins {
        self.cheque_total().saturating_sub(self.redeemed)
    }

    /// Work the client's cheques do not cover yet.
    pub fn outstanding(&self) -> Coins {
        self.computed.saturating_sub(self.cheque_total())
    }
}

/// What [`WorkerBook::accept`] recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acceptance {
    /// The lane's cheque total now.
    pub cumulative: Coins,
    /// Work the cheques do not cover (0 when the client is square).
    pub outstanding: Coins,
}

fn key(contract: &Address, lane_id: u32) -> String {
    format!("{}/{lane_id}", contract.to_raw())
}

/// The worker's lanes in redb; see the module docs.
#[derive(Clone, Debug)]
pub struct WorkerBook {
    store: Store,
    me: Address,
}

impl WorkerBook {
    /// The book of the worker whose wallet is `me`.
    pub fn new(store: Store, me: Address) -> Self {
        WorkerBook { store, me }
    }

    /// The worker's wallet.
    pub fn address(&self) -> &Address {
        &self.me
    }

    /// Every lane.
    pub fn lanes(&self) -> Result<Vec<WorkerLane>> {
        self.store.all(WORKER_LANES)
    }

    /// The lane `lane_id` of the client behind `contract`, if booked.
    pub fn lane(&self, contract: &Address, lane_id: u32) -> Result<Option<WorkerLane>> {
        self.store.get(WORKER_LANES, &key(contract, lane_id))
    }

    /// Books a client lane the worker checked on chain: its cheque key and
    /// what it holds. Creates the lane, or raises its deposit (a top-up);
    /// refuses a key other than the one already booked. Committed before it
    /// returns.
    pub fn register(
        &self,
        contract: &Address,
        public_key: &[u8; 32],
        lane_id: u32,
        deposited: Coins,
    ) -> Result<WorkerLane> {
        let k = key(contract, lane_id);
        let tx = self.store.write()?;
        let lane = {
            let mut t = tx.open_table(WORKER_LANES).map_err(store_err)?;
            let mut lane: WorkerLane = get_in(&t, &k)?.unwrap_or_else(|| WorkerLane {
                contract: contract.clone(),
                public_key: *public_key,
                lane_id,
                computed: Coins::ZERO,
                best: None,
                redeemed: Coins::ZERO,
                deposited,
            });
            if &lane.public_key != public_key {
                return Err(PaymentsError::BadCheque(
                    "the client's key changed on an existing lane".into(),
                ));
            }
            lane.deposited = lane.deposited.max(deposited);
            t.insert(k.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
            lane
        };
        tx.commit().map_err(store_err)?;
        Ok(lane)
    }

    /// Records work worth `cost` on a booked lane for which no cheque came
    /// (the client never paid for that job): the client falls behind by it.
    pub fn record_work(&self, contract: &Address, lane_id: u32, cost: Coins) -> Result<()> {
        self.update_lane(contract, lane_id, |lane| {
            lane.computed = lane.computed.checked_add(cost)?;
            Ok(())
        })
    }

    /// Applies `change` to a booked lane and commits it.
    fn update_lane(
        &self,
        contract: &Address,
        lane_id: u32,
        change: impl FnOnce(&mut WorkerLane) -> Result<()>,
    ) -> Result<()> {
        let k = key(contract, lane_id);
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(WORKER_LANES).map_err(store_err)?;
            let Some(mut lane) = get_in::<WorkerLane>(&t, &k)? else {
                return Err(PaymentsError::BadCheque(format!(
                    "no lane {lane_id} of {contract} in this worker's book"
                )));
            };
            change(&mut lane)?;
            t.insert(k.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Records a job worth `expected_cost` (the worker's own count) and the
    /// cheque the client sent for it. The work is recorded even when the
    /// cheque is refused, so a client that does not pay falls behind. A
    /// cheque is refused unless it is signed by `public_key`, drawn on
    /// `contract` to this worker, on the lane the client used before, and
    /// at least the cheque already held. A valid cheque is kept as the
    /// lane's best even when it does not cover everything the worker counted
    /// so far; that shortfall is still an error (no tolerance: prices are
    /// integers) and stays outstanding. Committed before it returns.
    pub fn accept(
        &self,
        contract: &Address,
        public_key: &[u8; 32],
        cheque: &SignedCheque,
        expected_cost: Coins,
    ) -> Result<Acceptance> {
        let c = &cheque.cheque;
        let k = key(contract, c.lane_id);
        let tx = self.store.write()?;
        let outcome = {
            let mut t = tx.open_table(WORKER_LANES).map_err(store_err)?;
            let mut lane: WorkerLane = get_in(&t, &k)?.unwrap_or_else(|| WorkerLane {
                contract: contract.clone(),
                public_key: *public_key,
                lane_id: c.lane_id,
                computed: Coins::ZERO,
                best: None,
                redeemed: Coins::ZERO,
                deposited: Coins::ZERO,
            });
            lane.computed = lane.computed.checked_add(expected_cost)?;
            // A validly signed cheque above the one held is kept even when it
            // falls short of the worker's count: refusing it would throw away
            // money the client signed for, and one shortfall would make every
            // later, higher cheque worthless too (audit F7). The shortfall is
            // still reported, and counts as outstanding work.
            let verdict = self.check(&lane, contract, public_key, cheque);
            if verdict.is_ok() {
                lane.best = Some(cheque.clone());
            }
            let verdict = verdict.and_then(|()| covers(&lane, cheque));
            t.insert(k.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
            verdict.map(|()| Acceptance {
                cumulative: lane.cheque_total(),
                outstanding: lane.outstanding(),
            })
        };
        tx.commit().map_err(store_err)?;
        outcome
    }

    /// Whether a cheque that passed [`WorkerBook::check`] is valid and at
    /// least the one held (and so kept), but not whether it covers the
    /// work: [`covers`] judges that.
    fn check(
        &self,
        lane: &WorkerLane,
        contract: &Address,
        public_key: &[u8; 32],
        cheque: &SignedCheque,
    ) -> Result<()> {
        let c = &cheque.cheque;
        let bad = |m: String| Err(PaymentsError::BadCheque(m));
        if &c.contract != contract {
            return bad(format!("drawn on {} instead of {contract}", c.contract));
        }
        if c.worker != self.me {
            return bad(format!(
                "pays {} instead of this worker {}",
                c.worker, self.me
            ));
        }
        if &lane.public_key != public_key {
            return bad("the client's key changed on an existing lane".into());
        }
        cheque
            .verify(public_key)
            .map_err(|e| PaymentsError::BadCheque(e.to_string()))?;
        if c.cumulative < lane.cheque_total() {
            return bad(format!(
                "cumulative {} is below the {} already held",
                c.cumulative.nano(),
                lane.cheque_total().nano()
            ));
        }
        Ok(())
    }

    /// Work by the client behind `contract` that its cheques do not cover.
    pub fn outstanding(&self, contract: &Address) -> Result<Coins> {
        let mut sum = Coins::ZERO;
        for l in self.lanes()? {
            if &l.contract == contract {
                sum = sum.checked_add(l.outstanding())?;
            }
        }
        Ok(sum)
    }

    /// Whether to keep serving the client behind `contract`: its uncovered
    /// work is within `credit`.
    pub fn should_serve(&self, contract: &Address, credit: Coins) -> Result<bool> {
        Ok(self.outstanding(contract)? <= credit)
    }

    /// Everything held in cheques and not redeemed yet.
    pub fn owed(&self) -> Result<Coins> {
        let mut sum = Coins::ZERO;
        for l in self.lanes()? {
            sum = sum.checked_add(l.unredeemed())?;
        }
        Ok(sum)
    }

    /// Lanes whose unredeemed cheque amount is at least `threshold`.
    pub fn due_for_redemption(&self, threshold: Coins) -> Result<Vec<WorkerLane>> {
        Ok(self
            .lanes()?
            .into_iter()
            .filter(|l| l.best.is_some() && l.unredeemed() > Coins::ZERO)
            .filter(|l| l.unredeemed() >= threshold)
            .collect())
    }

    /// Records that the contract has paid out `redeemed` on a lane (never lowers it).
    pub fn mark_redeemed(&self, contract: &Address, lane_id: u32, redeemed: Coins) -> Result<()> {
        self.update_lane(contract, lane_id, |lane| {
            lane.redeemed = lane.redeemed.max(redeemed);
            Ok(())
        })
    }
}

/// Whether `cheque` (already kept as the lane's best) covers everything the
/// worker counted on `lane` (no tolerance: prices are integers).
fn covers(lane: &WorkerLane, cheque: &SignedCheque) -> Result<()> {
    let c = &cheque.cheque;
    if c.cumulative < lane.computed {
        return Err(PaymentsError::BadCheque(format!(
            "cumulative {} nanoTON does not cover the {} nanoTON this worker counted (kept; {} nanoTON outstanding)",
            c.cumulative.nano(),
            lane.computed.nano(),
            lane.outstanding().nano()
        )));
    }
    Ok(())
}
