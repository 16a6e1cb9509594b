//! The worker's side: the best cheque per client lane, what the worker
//! itself counted, and what was redeemed.
//!
//! [`WorkerBook::accept`] commits before it returns, so an acknowledged
//! cheque survives a crash and is redeemed after a restart.
//!
//! Each paid job is a row from admission to its cheque (audit F3, F17):
//! [`WorkerBook::start_job`] refuses a job id the client already has open,
//! [`WorkerBook::end_job`] records the tokens produced (a cancelled stream
//! included), [`WorkerBook::accept_for_job`] takes the row away with the
//! cheque in one transaction, and [`WorkerBook::book_overdue`] moves rows
//! whose cheque never came onto the lane as unpaid work, also in one
//! transaction. A restart forgets none of them.

use silk_chain::{Address, Coins, SignedCheque};

use redb::ReadableTable;

use super::error::{store_err, PaymentsError, Result};
use super::store::{encode, get_in, Store, WORKER_JOBS, WORKER_LANES};

/// Jobs one client may have open (running or waiting for a cheque) on a worker.
pub const MAX_OPEN_JOBS_PER_CLIENT: usize = 256;

/// A paid job from admission until its cheque arrives or it is booked as unpaid.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerJob {
    /// The client's settlement contract.
    pub contract: Address,
    /// The lane it is paid on.
    pub lane_id: u32,
    /// The client's job id.
    pub job: u64,
    /// Prompt tokens (known once the job finished; 0 when it was cancelled).
    pub prompt_tokens: u64,
    /// Of those, how many the worker read from a cache instead of
    /// computing (priced apart). Rows written before this field read 0.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Tokens produced.
    pub completion_tokens: u64,
    /// When it ended (Unix ms); `None` while it runs.
    pub ended_ms: Option<u64>,
    /// A cheque naming this job came while it still ran.
    pub cheque_seen: bool,
}

fn job_key(contract: &Address, job: u64) -> String {
    format!("{}/{job:020}", contract.to_raw())
}

/// The tokens a job read and produced, as the worker counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobTokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Of those, read from a cache instead of computed.
    pub cached: u64,
    /// Tokens produced.
    pub completion: u64,
}

/// What a job's tokens cost at the worker's own price.
pub type CostOf<'a> = &'a dyn Fn(&WorkerJob) -> Result<Coins>;

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

    /// Opens a row for job `job` of `contract` on `lane_id` before it runs.
    /// Refused while the client has a job with that id open, or
    /// [`MAX_OPEN_JOBS_PER_CLIENT`] jobs open.
    pub fn start_job(&self, contract: &Address, lane_id: u32, job: u64) -> Result<()> {
        let k = job_key(contract, job);
        let prefix = format!("{}/", contract.to_raw());
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(WORKER_JOBS).map_err(store_err)?;
            if t.get(k.as_str()).map_err(store_err)?.is_some() {
                return Err(PaymentsError::JobOpen {
                    contract: contract.clone(),
                    job,
                });
            }
            let open = t
                .range(prefix.as_str()..)
                .map_err(store_err)?
                .take(MAX_OPEN_JOBS_PER_CLIENT)
                .filter_map(std::result::Result::ok)
                .take_while(|(key, _)| key.value().starts_with(&prefix))
                .count();
            if open >= MAX_OPEN_JOBS_PER_CLIENT {
                return Err(PaymentsError::TooManyOpenJobs {
                    contract: contract.clone(),
                    open,
                });
            }
            let row = WorkerJob {
                contract: contract.clone(),
                lane_id,
                job,
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                ended_ms: None,
                cheque_seen: false,
            };
            t.insert(k.as_str(), encode(&row)?.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Records that job `job` of `contract` ended at `now_ms` having read
    /// and produced `tokens`. A job that
    /// produced nothing is owed nothing and its row goes; one whose cheque
    /// already came is booked at once; any other waits for its cheque.
    pub fn end_job(
        &self,
        contract: &Address,
        job: u64,
        tokens: JobTokens,
        now_ms: u64,
        cost_of: CostOf<'_>,
    ) -> Result<()> {
        let k = job_key(contract, job);
        let tx = self.store.write()?;
        {
            let mut jobs = tx.open_table(WORKER_JOBS).map_err(store_err)?;
            let Some(mut row) = get_in::<WorkerJob>(&jobs, &k)? else {
                return Ok(());
            };
            row.prompt_tokens = tokens.prompt;
            row.cached_tokens = tokens.cached.min(tokens.prompt);
            row.completion_tokens = tokens.completion;
            row.ended_ms = Some(now_ms);
            if tokens.completion == 0 {
                jobs.remove(k.as_str()).map_err(store_err)?;
            } else if row.cheque_seen {
                jobs.remove(k.as_str()).map_err(store_err)?;
                let mut lanes = tx.open_table(WORKER_LANES).map_err(store_err)?;
                add_work(&mut lanes, &row, cost_of)?;
            } else {
                jobs.insert(k.as_str(), encode(&row)?.as_slice())
                    .map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)
    }

    /// Every open job.
    pub fn jobs(&self) -> Result<Vec<WorkerJob>> {
        self.store.all(WORKER_JOBS)
    }

    /// Books every job that ended at or before `ended_before_ms` and got no
    /// cheque as unpaid work on its lane, in one transaction; returns them
    /// with their cost.
    pub fn book_overdue(
        &self,
        ended_before_ms: u64,
        cost_of: CostOf<'_>,
    ) -> Result<Vec<(WorkerJob, Coins)>> {
        let tx = self.store.write()?;
        let mut booked = Vec::new();
        {
            let mut jobs = tx.open_table(WORKER_JOBS).map_err(store_err)?;
            let mut lanes = tx.open_table(WORKER_LANES).map_err(store_err)?;
            let mut due = Vec::new();
            for row in jobs.iter().map_err(store_err)? {
                let (k, v) = row.map_err(store_err)?;
                let job: WorkerJob = serde_json::from_slice(v.value()).map_err(store_err)?;
                if job.ended_ms.is_some_and(|t| t <= ended_before_ms) {
                    due.push((k.value().to_string(), job));
                }
            }
            for (k, job) in due {
                jobs.remove(k.as_str()).map_err(store_err)?;
                let cost = add_work(&mut lanes, &job, cost_of)?;
                booked.push((job, cost));
            }
        }
        tx.commit().map_err(store_err)?;
        Ok(booked)
    }

    /// After a restart: jobs that were running when the process died
    /// produced an unknown number of tokens; their rows go (a cheque that
    /// still comes for one is taken as a top-up).
    pub fn drop_interrupted_jobs(&self) -> Result<usize> {
        let tx = self.store.write()?;
        let n = {
            let mut jobs = tx.open_table(WORKER_JOBS).map_err(store_err)?;
            let mut running = Vec::new();
            for row in jobs.iter().map_err(store_err)? {
                let (k, v) = row.map_err(store_err)?;
                let job: WorkerJob = serde_json::from_slice(v.value()).map_err(store_err)?;
                if job.ended_ms.is_none() {
                    running.push(k.value().to_string());
                }
            }
            for k in &running {
                jobs.remove(k.as_str()).map_err(store_err)?;
            }
            running.len()
        };
        tx.commit().map_err(store_err)?;
        Ok(n)
    }

    /// Like [`WorkerBook::accept`] for the cheque of job `job`: the job's
    /// row is taken away in the same transaction, and its cost (at the
    /// worker's price, `cost_of`) is what the cheque must add. A cheque for
    /// a job still running marks it, so the job is booked when it ends; one
    /// for a job the worker has no row of (run before a crash, booked as
    /// unpaid already, or never run) is a plain top-up.
    pub fn accept_for_job(
        &self,
        contract: &Address,
        public_key: &[u8; 32],
        cheque: &SignedCheque,
        job: u64,
        cost_of: CostOf<'_>,
    ) -> Result<Acceptance> {
        let k = job_key(contract, job);
        // A cheque the worker already holds, for no open job, changes
        // nothing: answered without a disk write, so resending a public
        // cheque is no way to make the worker write (audit F23).
        if self.store.get::<WorkerJob>(WORKER_JOBS, &k)?.is_none() {
            if let Some(lane) = self.lane(contract, cheque.cheque.lane_id)? {
                if lane.best.as_ref() == Some(cheque) {
                    return covers(&lane, cheque).map(|()| Acceptance {
                        cumulative: lane.cheque_total(),
                        outstanding: lane.outstanding(),
                    });
                }
            }
        }
        let tx = self.store.write()?;
        let outcome = {
            let mut jobs = tx.open_table(WORKER_JOBS).map_err(store_err)?;
            let expected = match get_in::<WorkerJob>(&jobs, &k)? {
                // Another lane's job: the cheque does not settle it.
                Some(row) if row.lane_id != cheque.cheque.lane_id => Coins::ZERO,
                Some(row) if row.ended_ms.is_some() => {
                    jobs.remove(k.as_str()).map_err(store_err)?;
                    cost_of(&row)?
                }
                Some(mut row) => {
                    row.cheque_seen = true;
                    jobs.insert(k.as_str(), encode(&row)?.as_slice())
                        .map_err(store_err)?;
                    Coins::ZERO
                }
                None => Coins::ZERO,
            };
            let mut lanes = tx.open_table(WORKER_LANES).map_err(store_err)?;
            self.accept_in(&mut lanes, contract, public_key, cheque, expected)
        };
        // A refused cheque still commits: the work stays recorded.
        tx.commit().map_err(store_err)?;
        outcome
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
        let tx = self.store.write()?;
        let outcome = {
            let mut t = tx.open_table(WORKER_LANES).map_err(store_err)?;
            self.accept_in(&mut t, contract, public_key, cheque, expected_cost)
        };
        tx.commit().map_err(store_err)?;
        outcome
    }

    /// [`WorkerBook::accept`] inside a write transaction.
    fn accept_in(
        &self,
        t: &mut redb::Table<'_, &'static str, &'static [u8]>,
        contract: &Address,
        public_key: &[u8; 32],
        cheque: &SignedCheque,
        expected_cost: Coins,
    ) -> Result<Acceptance> {
        let c = &cheque.cheque;
        let k = key(contract, c.lane_id);
        {
            let mut lane: WorkerLane = get_in(&*t, &k)?.unwrap_or_else(|| WorkerLane {
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
        }
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

/// Adds `job`'s cost to its lane's computed work inside a transaction.
fn add_work(
    lanes: &mut redb::Table<'_, &'static str, &'static [u8]>,
    job: &WorkerJob,
    cost_of: CostOf<'_>,
) -> Result<Coins> {
    let cost = cost_of(job)?;
    let k = key(&job.contract, job.lane_id);
    let Some(mut lane) = get_in::<WorkerLane>(&*lanes, &k)? else {
        // Admission books the lane before any job starts.
        return Err(PaymentsError::BadCheque(format!(
            "no lane {} of {} in this worker's book",
            job.lane_id, job.contract
        )));
    };
    lane.computed = lane.computed.checked_add(cost)?;
    lanes
        .insert(k.as_str(), encode(&lane)?.as_slice())
        .map_err(store_err)?;
    Ok(cost)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A job row written before cached tokens were counted reads 0 of
    /// them, so its cost is what it was booked at: the whole prompt.
    #[test]
    fn rows_written_before_cached_tokens_read_none() {
        let row = WorkerJob {
            contract: Address::new(0, [3; 32]),
            lane_id: 1,
            job: 9,
            prompt_tokens: 40,
            cached_tokens: 40,
            completion_tokens: 5,
            ended_ms: Some(1),
            cheque_seen: false,
        };
        let mut old = serde_json::to_value(&row).expect("encode");
        old.as_object_mut()
            .expect("an object")
            .remove("cached_tokens");
        let read: WorkerJob = serde_json::from_value(old).expect("an old row still reads");
        assert_eq!(read.cached_tokens, 0);
        assert_eq!(
            WorkerJob {
                cached_tokens: 0,
                ..row
            },
            read
        );
    }
}
