//! Property and crash tests of the gateway and worker books (no chain):
//! funds are conserved, cheques only grow, a reopened store never signs a
//! lower cumulative amount nor settles a reservation twice, and every
//! cheque a worker acknowledged is still there after a restart.

use proptest::prelude::*;
use silk_chain::{Address, Coins, Keys, Price};
use silk_node::payments::{
    ClientBook, JobTokens, PaymentsError, Reservation, Store, WorkerBook, WorkerJob,
};

/// A job's tokens with nothing read from a cache.
fn tokens(prompt: u64, completion: u64) -> JobTokens {
    JobTokens {
        prompt,
        cached: 0,
        completion,
    }
}

const PRICE: Price = Price {
    base_nano_per_token: 1_000,
    prompt_mult_milli: 1_000,
    completion_mult_milli: 3_000,
    cached_mult_milli: 100,
};

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        worker: usize,
        prompt: u64,
        max: u64,
    },
    Settle {
        pick: usize,
        used_permille: u64,
    },
    Release {
        pick: usize,
    },
    Replay {
        pick: usize,
    },
    TopUp {
        worker: usize,
        amount: u32,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, 0u64..400, 0u64..400).prop_map(|(worker, prompt, max)| Op::Reserve { worker, prompt, max }),
        4 => (any::<usize>(), 0u64..=1000).prop_map(|(pick, used_permille)| Op::Settle { pick, used_permille }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
        1 => (0usize..3, 0u32..2_000_000).prop_map(|(worker, amount)| Op::TopUp { worker, amount }),
        1 => Just(Op::Restart),
    ]
}

struct World {
    dir: tempfile::TempDir,
    client_keys: Keys,
    contract: Address,
    workers: Vec<Address>,
    client: ClientBook,
    books: Vec<WorkerBook>,
    open: Vec<(Reservation, u64, u64)>,
    spent: Vec<Reservation>,
    /// Per worker: deposited total, highest cumulative seen, sum of costs.
    deposited: Vec<Coins>,
    last_cumulative: Vec<Coins>,
    charged: Vec<Coins>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let client_keys = Keys::from_seed([1; 32]);
        let contract = Address::new(0, [9; 32]);
        let workers: Vec<Address> = (0..3)
            .map(|i| Address::new(0, [20 + i as u8; 32]))
            .collect();
        let (client, books) = Self::books(&dir, &contract, &workers);
        let deposited = vec![Coins(1_000_000); 3];
        for (i, w) in workers.iter().enumerate() {
            client
                .record_lane(w, i as u32 + 1, deposited[i], Coins::ZERO)
                .expect("lane");
        }
        World {
            dir,
            client_keys,
            contract,
            workers,
            client,
            books,
            open: Vec::new(),
            spent: Vec::new(),
            deposited,
            last_cumulative: vec![Coins::ZERO; 3],
            charged: vec![Coins::ZERO; 3],
        }
    }

    fn books(
        dir: &tempfile::TempDir,
        contract: &Address,
        workers: &[Address],
    ) -> (ClientBook, Vec<WorkerBook>) {
        let client = ClientBook::new(
            Store::open(&dir.path().join("client.redb")).expect("store"),
            contract.clone(),
        );
        let books = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                WorkerBook::new(
                    Store::open(&dir.path().join(format!("worker{i}.redb"))).expect("store"),
                    w.clone(),
                )
            })
            .collect();
        (client, books)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Reserve {
                worker,
                prompt,
                max,
            } => {
                let worst = PRICE.worst_case(1_000, *prompt, *max).expect("price");
                let lane = self
                    .client
                    .lane(&self.workers[*worker])
                    .expect("lane")
                    .expect("exists");
                match self.client.reserve(&self.workers[*worker], worst) {
                    Ok(r) => {
                        assert!(worst <= lane.available());
                        self.open.push((r, *prompt, *max));
                    }
                    Err(PaymentsError::InsufficientLane { available, .. }) => {
                        assert!(worst > available);
                        assert_eq!(available, lane.available());
                    }
                    Err(e) => panic!("reserve: {e}"),
                }
            }
            Op::Settle {
                pick,
                used_permille,
            } => {
                if self.open.is_empty() {
                    return;
                }
                let (r, prompt, max) = self.open.remove(pick % self.open.len());
                let completion = max * used_permille / 1000;
                let cost = PRICE.cost(1_000, prompt, completion).expect("cost");
                let cheque = self
                    .client
                    .settle(&self.client_keys, &r, cost)
                    .expect("settle");
                let w = self
                    .workers
                    .iter()
                    .position(|a| *a == r.worker)
                    .expect("worker");
                assert!(
                    cheque.cheque.cumulative >= self.last_cumulative[w],
                    "cheques only grow"
                );
                self.last_cumulative[w] = cheque.cheque.cumulative;
                self.charged[w] = self.charged[w].checked_add(cost).expect("sum");
                let ack = self.books[w]
                    .accept(
                        &self.contract,
                        &self.client_keys.public_key(),
                        &cheque,
                        cost,
                    )
                    .expect("worker accepts an honest cheque");
                assert_eq!(ack.outstanding, Coins::ZERO);
                self.spent.push(r);
            }
            Op::Release { pick } => {
                if self.open.is_empty() {
                    return;
                }
                let (r, _, _) = self.open.remove(pick % self.open.len());
                self.client.release(&r).expect("release");
                self.spent.push(r);
            }
            Op::Replay { pick } => {
                if self.spent.is_empty() {
                    return;
                }
                let r = self.spent[pick % self.spent.len()].clone();
                assert!(matches!(
                    self.client.settle(&self.client_keys, &r, Coins::ZERO),
                    Err(PaymentsError::UnknownReservation(_))
                ));
                assert!(self.client.release(&r).is_err());
            }
            Op::TopUp { worker, amount } => {
                let lane = self
                    .client
                    .lane(&self.workers[*worker])
                    .expect("lane")
                    .expect("exists");
                self.deposited[*worker] = lane
                    .deposited
                    .checked_add(Coins(u128::from(*amount)))
                    .expect("sum");
                self.client
                    .record_lane(
                        &self.workers[*worker],
                        lane.lane_id,
                        self.deposited[*worker],
                        Coins::ZERO,
                    )
                    .expect("top up");
            }
            Op::Restart => {
                // Drop every handle and reopen from disk, as after a crash
                // (redb allows one handle per file, so the old ones must go).
                self.books.clear();
                let scratch = ClientBook::new(
                    Store::open(&self.dir.path().join("scratch.redb")).expect("store"),
                    self.contract.clone(),
                );
                drop(std::mem::replace(&mut self.client, scratch));
                let (client, books) = Self::books(&self.dir, &self.contract, &self.workers);
                self.client = client;
                self.books = books;
            }
        }
    }

    fn check(&self) {
        let open = self.client.open_reservations().expect("open");
        assert_eq!(open.len(), self.open.len());
        for (i, w) in self.workers.iter().enumerate() {
            let lane = self.client.lane(w).expect("lane").expect("exists");
            // Conservation: what was deposited is signed, reserved or available.
            assert_eq!(
                lane.signed.nano() + lane.reserved.nano() + lane.available().nano(),
                lane.deposited.nano()
            );
            assert_eq!(lane.deposited, self.deposited[i]);
            assert_eq!(lane.signed, self.charged[i], "signed = sum of job costs");
            let reserved: u128 = open
                .iter()
                .filter(|r| &r.worker == w)
                .map(|r| r.amount.nano())
                .sum();
            assert_eq!(lane.reserved.nano(), reserved);
            // The worker holds exactly what was signed and nothing is uncovered.
            let held: u128 = self.books[i]
                .lanes()
                .expect("lanes")
                .iter()
                .map(|l| l.cheque_total().nano())
                .sum();
            assert_eq!(held, lane.signed.nano());
            assert!(self.books[i]
                .should_serve(&self.contract, Coins::ZERO)
                .expect("serve"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn funds_are_conserved_and_cheques_only_grow(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        for op in &ops {
            w.apply(op);
            w.check();
        }
    }
}

#[test]
fn a_restarted_gateway_never_signs_lower_or_settles_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::from_seed([3; 32]);
    let contract = Address::new(0, [4; 32]);
    let worker = Address::new(0, [5; 32]);
    let path = dir.path().join("gw.redb");
    let (r_in_flight, last) = {
        let book = ClientBook::new(Store::open(&path).expect("store"), contract.clone());
        book.record_lane(&worker, 1, Coins(1_000_000), Coins::ZERO)
            .expect("lane");
        let r1 = book.reserve(&worker, Coins(10_000)).expect("reserve");
        let c1 = book.settle(&keys, &r1, Coins(7_000)).expect("settle");
        let r2 = book.reserve(&worker, Coins(20_000)).expect("reserve");
        (r2, c1.cheque.cumulative)
        // The book is dropped here with r2 in flight, as if the gateway died.
    };
    let book = ClientBook::new(Store::open(&path).expect("reopen"), contract.clone());
    let lane = book.lane(&worker).expect("lane").expect("exists");
    assert_eq!(lane.signed, last);
    assert_eq!(
        lane.reserved,
        Coins(20_000),
        "the in-flight reservation survives"
    );
    let c2 = book
        .settle(&keys, &r_in_flight, Coins(5_000))
        .expect("settle after restart");
    assert_eq!(c2.cheque.cumulative, Coins(12_000));
    assert!(matches!(
        book.settle(&keys, &r_in_flight, Coins(5_000)),
        Err(PaymentsError::UnknownReservation(_))
    ));
    drop(book);
    let book = ClientBook::new(Store::open(&path).expect("reopen"), contract);
    assert_eq!(
        book.lane(&worker).expect("lane").expect("exists").signed,
        Coins(12_000)
    );
    assert!(book.settle(&keys, &r_in_flight, Coins(1)).is_err());
    // A lane record from the chain never lowers what was signed.
    book.record_lane(&worker, 1, Coins(1_000_000), Coins(3_000))
        .expect("lane");
    assert_eq!(
        book.lane(&worker).expect("lane").expect("exists").signed,
        Coins(12_000)
    );
}

#[test]
fn a_worker_refuses_bad_cheques_and_stops_serving_a_client_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Keys::from_seed([6; 32]);
    let other = Keys::from_seed([7; 32]);
    let contract = Address::new(0, [8; 32]);
    let me = Address::new(0, [9; 32]);
    let book = WorkerBook::new(
        Store::open(&dir.path().join("w.redb")).expect("store"),
        me.clone(),
    );
    let cheque = |amount: u128, keys: &Keys, worker: &Address, c: &Address| {
        silk_chain::Cheque {
            contract: c.clone(),
            worker: worker.clone(),
            lane_id: 1,
            cumulative: Coins(amount),
        }
        .sign(keys)
        .expect("sign")
    };
    let pk = client.public_key();
    book.accept(
        &contract,
        &pk,
        &cheque(100, &client, &me, &contract),
        Coins(100),
    )
    .expect("ok");
    // Forged, wrong worker, wrong contract, lower, short of the worker's count.
    assert!(book
        .accept(
            &contract,
            &pk,
            &cheque(200, &other, &me, &contract),
            Coins(0)
        )
        .is_err());
    assert!(book
        .accept(
            &contract,
            &pk,
            &cheque(200, &client, &contract, &contract),
            Coins(0)
        )
        .is_err());
    assert!(book
        .accept(&contract, &pk, &cheque(200, &client, &me, &me), Coins(0))
        .is_err());
    assert!(book
        .accept(
            &contract,
            &pk,
            &cheque(50, &client, &me, &contract),
            Coins(0)
        )
        .is_err());
    assert!(book.should_serve(&contract, Coins(0)).expect("serve"));
    let short = book.accept(
        &contract,
        &pk,
        &cheque(150, &client, &me, &contract),
        Coins(60),
    );
    assert!(
        matches!(short, Err(PaymentsError::BadCheque(_))),
        "{short:?}"
    );
    // The short cheque is still kept: only the 10 it lacks is outstanding.
    assert_eq!(book.outstanding(&contract).expect("outstanding"), Coins(10));
    assert_eq!(book.owed().expect("owed"), Coins(150));
    assert!(book.should_serve(&contract, Coins(10)).expect("serve"));
    assert!(!book.should_serve(&contract, Coins(9)).expect("serve"));
    // Catching up restores service.
    book.accept(
        &contract,
        &pk,
        &cheque(160, &client, &me, &contract),
        Coins(0),
    )
    .expect("ok");
    assert!(book.should_serve(&contract, Coins(0)).expect("serve"));
    assert_eq!(book.owed().expect("owed"), Coins(160));
    assert_eq!(book.due_for_redemption(Coins(161)).expect("due").len(), 0);
    assert_eq!(book.due_for_redemption(Coins(160)).expect("due").len(), 1);
}

/// Audit F7: after one shortfall (a price-list skew here: the worker counts
/// 110 per job, the gateway pays 100) every later cheque is validly signed
/// and higher, and must be kept. Before the fix each was refused and thrown
/// away: the worker held no cheque at all (it failed at job 1 with
/// `owed` 0 instead of 100) and outstanding grew by 110 per job.
#[test]
fn a_worker_keeps_every_higher_valid_cheque_after_a_shortfall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Keys::from_seed([6; 32]);
    let contract = Address::new(0, [8; 32]);
    let me = Address::new(0, [9; 32]);
    let book = WorkerBook::new(
        Store::open(&dir.path().join("w.redb")).expect("store"),
        me.clone(),
    );
    let pk = client.public_key();
    for job in 1..=5u128 {
        let cheque = silk_chain::Cheque {
            contract: contract.clone(),
            worker: me.clone(),
            lane_id: 1,
            cumulative: Coins(100 * job),
        }
        .sign(&client)
        .expect("sign");
        let short = book.accept(&contract, &pk, &cheque, Coins(110));
        assert!(
            matches!(short, Err(PaymentsError::BadCheque(_))),
            "{short:?}"
        );
        assert_eq!(book.owed().expect("owed"), Coins(100 * job), "job {job}");
        assert_eq!(
            book.outstanding(&contract).expect("outstanding"),
            Coins(10 * job),
            "job {job}"
        );
    }
}

/// Audit F3 and F17, on the worker's book: a job is a row in redb from
/// admission to its cheque. A reused job id is refused while its job is
/// open (before, a second job with the same id overwrote the first, in
/// memory, and reset its 30 s wait, so a gateway reusing one id was never
/// booked); a job cancelled after producing tokens is owed for them (before,
/// a reset stream was never booked); rows survive a restart (before, the
/// pending map lived in memory); and the cheque settles its own job only,
/// on its own lane (audit F23).
#[test]
fn worker_jobs_are_booked_in_redb_from_admission_to_cheque() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.redb");
    let client = Keys::from_seed([6; 32]);
    let pk = client.public_key();
    let contract = Address::new(0, [8; 32]);
    let me = Address::new(0, [9; 32]);
    let cost_of = |j: &WorkerJob| {
        Ok(PRICE.cost_cached(1_000, j.prompt_tokens, j.cached_tokens, j.completion_tokens)?)
    };
    let cheque = |amount: u128, lane_id: u32| {
        silk_chain::Cheque {
            contract: contract.clone(),
            worker: me.clone(),
            lane_id,
            cumulative: Coins(amount),
        }
        .sign(&client)
        .expect("sign")
    };
    let book = WorkerBook::new(Store::open(&path).expect("store"), me.clone());
    for lane in [1, 2] {
        book.register(&contract, &pk, lane, Coins(1_000_000_000))
            .expect("lane");
    }

    // Job 7 runs; the same id is refused while it runs and while it waits
    // for its cheque.
    book.start_job(&contract, 1, 7).expect("start");
    assert!(matches!(
        book.start_job(&contract, 1, 7),
        Err(PaymentsError::JobOpen { job: 7, .. })
    ));
    // Cancelled after 5 tokens (no prompt count: it never finished).
    book.end_job(&contract, 7, tokens(0, 5), 1_000, &cost_of)
        .expect("end");
    assert!(matches!(
        book.start_job(&contract, 1, 7),
        Err(PaymentsError::JobOpen { .. })
    ));
    // A job that produced nothing is owed nothing and closes at once.
    book.start_job(&contract, 1, 8).expect("start");
    book.end_job(&contract, 8, tokens(40, 0), 1_000, &cost_of)
        .expect("end");
    book.start_job(&contract, 2, 9).expect("start");
    book.end_job(&contract, 9, tokens(10, 2), 1_000, &cost_of)
        .expect("end");

    // A crash: the open rows are all still there.
    drop(book);
    let book = WorkerBook::new(Store::open(&path).expect("reopen"), me.clone());
    let mut open: Vec<(u64, u64, u64)> = book
        .jobs()
        .expect("jobs")
        .iter()
        .map(|j| (j.job, j.prompt_tokens, j.completion_tokens))
        .collect();
    open.sort();
    assert_eq!(open, vec![(7, 0, 5), (9, 10, 2)]);

    // Job 9's cheque on lane 1 does not settle job 9 (it ran on lane 2).
    let lane1 = book
        .accept_for_job(&contract, &pk, &cheque(15_000, 1), 9, &cost_of)
        .expect("a top-up of lane 1");
    assert_eq!(lane1.outstanding, Coins(0));
    assert_eq!(book.jobs().expect("jobs").len(), 2);
    // Job 7's cheque settles it (5 tokens × 3000) and frees its id.
    let a = book
        .accept_for_job(&contract, &pk, &cheque(15_000, 1), 7, &cost_of)
        .expect("cheque");
    assert_eq!((a.cumulative, a.outstanding), (Coins(15_000), Coins(0)));
    book.start_job(&contract, 1, 7)
        .expect("the id is free again");
    book.end_job(&contract, 7, tokens(0, 0), 2_000, &cost_of)
        .expect("end");

    // Job 9's cheque never comes: once overdue it is booked as unpaid, in
    // the same transaction that drops its row.
    assert!(book
        .book_overdue(999, &cost_of)
        .expect("none yet")
        .is_empty());
    let booked = book.book_overdue(1_000, &cost_of).expect("booked");
    assert_eq!(booked.len(), 1);
    assert_eq!(booked[0].1, Coins(16_000));
    assert_eq!(
        book.outstanding(&contract).expect("outstanding"),
        Coins(16_000)
    );
    assert!(book.jobs().expect("jobs").is_empty());

    // A cheque that comes while its job still runs marks it; the job is
    // booked when it ends, and the cheque covers it.
    book.start_job(&contract, 1, 11).expect("start");
    book.accept_for_job(&contract, &pk, &cheque(21_000, 1), 11, &cost_of)
        .expect("early cheque");
    book.end_job(&contract, 11, tokens(0, 2), 3_000, &cost_of)
        .expect("end");
    assert!(book.jobs().expect("jobs").is_empty());
    let lane1 = book.lane(&contract, 1).expect("lane").expect("lane 1");
    assert_eq!(
        (lane1.computed, lane1.cheque_total()),
        (Coins(21_000), Coins(21_000))
    );

    // Anyone can resend a cheque the worker already holds (cheques are
    // public once redeemed): that writes nothing (audit F23; before, each
    // resend was a durable redb write).
    let modified = || {
        std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let before = modified();
    std::thread::sleep(std::time::Duration::from_millis(20));
    for job in 100..110 {
        book.accept_for_job(&contract, &pk, &cheque(21_000, 1), job, &cost_of)
            .expect("the held cheque");
    }
    assert_eq!(modified(), before, "a resent cheque was written");

    // A crash mid-job: the interrupted row goes at the next start.
    book.start_job(&contract, 1, 12).expect("start");
    drop(book);
    let book = WorkerBook::new(Store::open(&path).expect("reopen"), me);
    assert_eq!(book.drop_interrupted_jobs().expect("drop"), 1);
    book.start_job(&contract, 1, 12)
        .expect("free after the restart");
}
