//! The gateway's side: what each lane holds, what was signed, what is reserved.
//!
//! Invariant per lane: `signed + reserved <= deposited`. `signed` only grows,
//! and every change is committed to redb before the caller sees the result,
//! so a restarted gateway never signs a lower cumulative amount and never
//! settles a reservation twice.
//!
//! A signed cheque the worker did not acknowledge is held (also in redb)
//! until it is delivered: the gateway re-sends it, so a worker that was
//! down when its job ended is still paid when it comes back, without
//! waiting for another job to reach it.

use silk_chain::{Address, Cheque, Coins, Keys, SignedCheque};

use super::error::{store_err, PaymentsError, Result};
use super::store::{encode, get_in, next_counter, Store, CLIENT_LANES, RESERVATIONS, UNDELIVERED};

/// One lane as the gateway books it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientLane {
    /// The worker's wallet.
    pub worker: Address,
    /// Lane id in the settlement contract.
    pub lane_id: u32,
    /// Everything allocated to the lane on chain.
    pub deposited: Coins,
    /// The highest cumulative cheque signed on the lane.
    pub signed: Coins,
    /// Worst cases reserved for jobs in flight.
    pub reserved: Coins,
}

impl ClientLane {
    /// What new jobs may still reserve.
    pub fn available(&self) -> Coins {
        self.deposited
            .saturating_sub(self.signed)
            .saturating_sub(self.reserved)
    }
}

/// A worst case held against a lane for one job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// Unique within this store.
    pub id: u64,
    /// The worker's wallet.
    pub worker: Address,
    /// The lane.
    pub lane_id: u32,
    /// The worst case reserved.
    pub amount: Coins,
}

/// A signed cheque its worker has not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UndeliveredCheque {
    /// The worker's peer id (the overlay address the cheque goes to).
    pub peer: String,
    /// The job whose settlement signed it.
    pub job: u64,
    /// The lane's cumulative cheque.
    pub cheque: SignedCheque,
}

/// The gateway's lanes in redb; see the module docs.
#[derive(Clone, Debug)]
pub struct ClientBook {
    store: Store,
    contract: Address,
}

impl ClientBook {
    /// The book of the client whose settlement contract is `contract`.
    pub fn new(store: Store, contract: Address) -> Self {
        ClientBook { store, contract }
    }

    /// The settlement contract the cheques are drawn on.
    pub fn contract(&self) -> &Address {
        &self.contract
    }

    /// Every lane.
    pub fn lanes(&self) -> Result<Vec<ClientLane>> {
        self.store.all(CLIENT_LANES)
    }

    /// The lane to `worker`, if any.
    pub fn lane(&self, worker: &Address) -> Result<Option<ClientLane>> {
        self.store.get(CLIENT_LANES, &worker.to_raw())
    }

    /// Reservations not yet settled or released (jobs in flight, or jobs a
    /// crash interrupted).
    pub fn open_reservations(&self) -> Result<Vec<Reservation>> {
        let tx = redb::ReadableDatabase::begin_read(&*self.store.db).map_err(store_err)?;
        let t = tx.open_table(RESERVATIONS).map_err(store_err)?;
        let mut out = Vec::new();
        for row in redb::ReadableTable::iter(&t).map_err(store_err)? {
            let (_, v) = row.map_err(store_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(store_err)?);
        }
        Ok(out)
    }

    /// Records what the chain says a lane holds: creates it, or raises its
    /// deposit and its signed floor (never lowers either). `signed_floor` is
    /// the lane's redeemed amount on chain, below which no cheque is useful.
    pub fn record_lane(
        &self,
        worker: &Address,
        lane_id: u32,
        deposited: Coins,
        signed_floor: Coins,
    ) -> Result<ClientLane> {
        let key = worker.to_raw();
        let tx = self.store.write()?;
        let lane = {
            let mut t = tx.open_table(CLIENT_LANES).map_err(store_err)?;
            let lane = match get_in::<ClientLane>(&t, &key)? {
                Some(mut l) if l.lane_id == lane_id => {
                    l.deposited = l.deposited.max(deposited);
                    l.signed = l.signed.max(signed_floor);
                    l
                }
                // A new lane id replaces a finished lane: nothing carries over.
                _ => ClientLane {
                    worker: worker.clone(),
                    lane_id,
                    deposited,
                    signed: signed_floor,
                    reserved: Coins::ZERO,
                },
            };
            t.insert(key.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
            lane
        };
        tx.commit().map_err(store_err)?;
        Ok(lane)
    }

    /// Holds `worst_case` on the lane to `worker`; committed before it returns.
    pub fn reserve(&self, worker: &Address, worst_case: Coins) -> Result<Reservation> {
        let key = worker.to_raw();
        let tx = self.store.write()?;
        let reservation = {
            let mut lanes = tx.open_table(CLIENT_LANES).map_err(store_err)?;
            let mut lane: ClientLane =
                get_in(&lanes, &key)?.ok_or_else(|| PaymentsError::NoLane {
                    worker: worker.clone(),
                })?;
            let available = lane.available();
            if worst_case > available {
                return Err(PaymentsError::InsufficientLane {
                    worker: worker.clone(),
                    lane_id: lane.lane_id,
                    available,
                    needed: worst_case,
                });
            }
            lane.reserved = lane.reserved.checked_add(worst_case)?;
            lanes
                .insert(key.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
            let id = next_counter(&tx, "next_reservation", 1)?;
            let r = Reservation {
                id,
                worker: worker.clone(),
                lane_id: lane.lane_id,
                amount: worst_case,
            };
            let mut res = tx.open_table(RESERVATIONS).map_err(store_err)?;
            res.insert(id, encode(&r)?.as_slice()).map_err(store_err)?;
            r
        };
        tx.commit().map_err(store_err)?;
        Ok(reservation)
    }

    /// Spends `reservation` on a job that cost `actual` and signs the lane's
    /// new cumulative cheque. The reservation is gone and the new cumulative
    /// is committed before the cheque is returned.
    pub fn settle(
        &self,
        keys: &Keys,
        reservation: &Reservation,
        actual: Coins,
    ) -> Result<SignedCheque> {
        let tx = self.store.write()?;
        let cheque = {
            let mut res = tx.open_table(RESERVATIONS).map_err(store_err)?;
            let stored: Reservation = match res.remove(reservation.id).map_err(store_err)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
                None => return Err(PaymentsError::UnknownReservation(reservation.id)),
            };
            if actual > stored.amount {
                return Err(PaymentsError::CostAboveReservation {
                    actual,
                    reserved: stored.amount,
                });
            }
            let key = stored.worker.to_raw();
            let mut lanes = tx.open_table(CLIENT_LANES).map_err(store_err)?;
            let mut lane: ClientLane =
                get_in(&lanes, &key)?.ok_or_else(|| PaymentsError::NoLane {
                    worker: stored.worker.clone(),
                })?;
            if lane.lane_id != stored.lane_id {
                return Err(PaymentsError::UnknownReservation(reservation.id));
            }
            lane.reserved = lane.reserved.saturating_sub(stored.amount);
            lane.signed = lane.signed.checked_add(actual)?;
            lanes
                .insert(key.as_str(), encode(&lane)?.as_slice())
                .map_err(store_err)?;
            Cheque {
                contract: self.contract.clone(),
                worker: stored.worker.clone(),
                lane_id: lane.lane_id,
                cumulative: lane.signed,
            }
            .sign(keys)?
        };
        tx.commit().map_err(store_err)?;
        Ok(cheque)
    }

    /// Gives `reservation` back to its lane (the job failed).
    pub fn release(&self, reservation: &Reservation) -> Result<()> {
        let tx = self.store.write()?;
        {
            let mut res = tx.open_table(RESERVATIONS).map_err(store_err)?;
            let stored: Reservation = match res.remove(reservation.id).map_err(store_err)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
                None => return Err(PaymentsError::UnknownReservation(reservation.id)),
            };
            let key = stored.worker.to_raw();
            let mut lanes = tx.open_table(CLIENT_LANES).map_err(store_err)?;
            if let Some(mut lane) = get_in::<ClientLane>(&lanes, &key)? {
                if lane.lane_id == stored.lane_id {
                    lane.reserved = lane.reserved.saturating_sub(stored.amount);
                    lanes
                        .insert(key.as_str(), encode(&lane)?.as_slice())
                        .map_err(store_err)?;
                }
            }
        }
        tx.commit().map_err(store_err)
    }

    /// The highest cheque on the lane to `worker`, re-signed (for a worker
    /// that lost the last one). `None` without a lane.
    pub fn latest_cheque(&self, keys: &Keys, worker: &Address) -> Result<Option<SignedCheque>> {
        let Some(lane) = self.lane(worker)? else {
            return Ok(None);
        };
        Ok(Some(
            Cheque {
                contract: self.contract.clone(),
                worker: worker.clone(),
                lane_id: lane.lane_id,
                cumulative: lane.signed,
            }
            .sign(keys)?,
        ))
    }

    /// Holds a cheque its worker did not acknowledge, to be re-sent. Only
    /// the highest cheque per lane is held (it covers every lower one); a
    /// lower one than that held changes nothing. Committed before it returns.
    pub fn hold_undelivered(&self, held: &UndeliveredCheque) -> Result<()> {
        let key = held.cheque.cheque.worker.to_raw();
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(UNDELIVERED).map_err(store_err)?;
            let covered = get_in::<UndeliveredCheque>(&t, &key)?.is_some_and(|h| {
                h.cheque.cheque.lane_id == held.cheque.cheque.lane_id
                    && h.cheque.cheque.cumulative >= held.cheque.cheque.cumulative
            });
            if covered {
                return Ok(());
            }
            t.insert(key.as_str(), encode(held)?.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Every cheque held for delivery.
    pub fn undelivered(&self) -> Result<Vec<UndeliveredCheque>> {
        self.store.all(UNDELIVERED)
    }

    /// Records that the worker of `cheque` answered it (took it, or refused
    /// it for good): a held cheque on that lane no higher than it is no
    /// longer owed a delivery. Writes only when there is one.
    pub fn delivered(&self, cheque: &SignedCheque) -> Result<()> {
        let key = cheque.cheque.worker.to_raw();
        let answered = |h: &UndeliveredCheque| {
            h.cheque.cheque.lane_id == cheque.cheque.lane_id
                && h.cheque.cheque.cumulative <= cheque.cheque.cumulative
        };
        match self.store.get::<UndeliveredCheque>(UNDELIVERED, &key)? {
            Some(h) if answered(&h) => {}
            _ => return Ok(()),
        }
        let tx = self.store.write()?;
        {
            let mut t = tx.open_table(UNDELIVERED).map_err(store_err)?;
            if get_in::<UndeliveredCheque>(&t, &key)?.is_some_and(|h| answered(&h)) {
                t.remove(key.as_str()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheque(keys: &Keys, worker: &Address, lane_id: u32, nano: u128) -> UndeliveredCheque {
        UndeliveredCheque {
            peer: "12D3KooWworker".into(),
            job: nano as u64,
            cheque: Cheque {
                contract: Address::new(0, [1; 32]),
                worker: worker.clone(),
                lane_id,
                cumulative: Coins(nano),
            }
            .sign(keys)
            .expect("sign"),
        }
    }

    #[test]
    fn the_highest_undelivered_cheque_per_lane_is_held_until_an_answer_covers_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("payments.redb")).expect("store");
        let book = ClientBook::new(store.clone(), Address::new(0, [1; 32]));
        let keys = Keys::from_seed([9; 32]);
        let (a, b) = (Address::new(0, [2; 32]), Address::new(0, [3; 32]));
        let held = |book: &ClientBook| {
            let mut v: Vec<(u32, u128)> = book
                .undelivered()
                .expect("read")
                .iter()
                .map(|h| (h.cheque.cheque.lane_id, h.cheque.cheque.cumulative.0))
                .collect();
            v.sort();
            v
        };

        book.hold_undelivered(&cheque(&keys, &a, 1, 100))
            .expect("hold");
        book.hold_undelivered(&cheque(&keys, &b, 4, 7))
            .expect("hold");
        // A lower cheque on the same lane is covered by the one held.
        book.hold_undelivered(&cheque(&keys, &a, 1, 90))
            .expect("hold");
        assert_eq!(held(&book), vec![(1, 100), (4, 7)]);
        // A higher one replaces it.
        book.hold_undelivered(&cheque(&keys, &a, 1, 150))
            .expect("hold");
        assert_eq!(held(&book), vec![(1, 150), (4, 7)]);

        // An answer to a lower cheque leaves the higher one owed; an answer
        // to it, or to a higher one (a later job's), clears it.
        book.delivered(&cheque(&keys, &a, 1, 120).cheque)
            .expect("answer");
        assert_eq!(held(&book), vec![(1, 150), (4, 7)]);
        // Another lane of the same worker (a new lane replaced the old one)
        // answers nothing about this one.
        book.delivered(&cheque(&keys, &a, 2, 500).cheque)
            .expect("answer");
        assert_eq!(held(&book), vec![(1, 150), (4, 7)]);
        book.delivered(&cheque(&keys, &a, 1, 200).cheque)
            .expect("answer");
        assert_eq!(held(&book), vec![(4, 7)]);

        // Held cheques survive a restart.
        drop(book);
        drop(store);
        let store = Store::open(&dir.path().join("payments.redb")).expect("reopen");
        let book = ClientBook::new(store, Address::new(0, [1; 32]));
        assert_eq!(held(&book), vec![(4, 7)]);
        book.delivered(&cheque(&keys, &b, 4, 7).cheque)
            .expect("answer");
        assert!(held(&book).is_empty());
    }
}
