//! End to end on an in-process devnet running the real wallet and
//! settlement contract: two clients open lanes to four workers, a few
//! hundred jobs are paid with cheques, the workers crash and restart from
//! their stores, and redemptions pay every worker exactly what the cheques
//! say while each client's lanes drop by exactly what it was charged. Gas
//! fees are accounted separately and explicitly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use silk_chain::devnet::{Devnet, DevnetConfig};
use silk_chain::ledger::{self, Ledger};
use silk_chain::{Coins, Keys};
use silk_node::payments::{Payments, PaymentsConfig, PaymentsError};
use tokio_util::sync::CancellationToken;

fn config() -> PaymentsConfig {
    PaymentsConfig {
        redeem_threshold: Coins(20_000_000),
        timeout_s: 30,
        ..PaymentsConfig::default()
    }
}

async fn open(dir: &Path, seed: u8, ledger: &Arc<dyn Ledger>) -> Payments {
    Payments::open(dir, config(), ledger.clone(), Keys::from_seed([seed; 32]))
        .await
        .expect("payments")
}

/// xorshift64*: deterministic job sizes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_four_workers_hundreds_of_jobs_then_exact_redemptions() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().expect("tmp")).collect();

    let mut clients: Vec<Payments> = Vec::new();
    for (i, dir) in dirs.iter().take(2).enumerate() {
        clients.push(open(dir.path(), 1 + i as u8, &ledger).await);
    }
    let mut workers: Vec<Payments> = Vec::new();
    for i in 0..4 {
        workers.push(open(dirs[2 + i].path(), 10 + i as u8, &ledger).await);
    }
    for c in &clients {
        devnet
            .mint(&c.wallet_address(), Coins::from_ton(100).expect("ton"))
            .expect("mint");
    }
    for w in &workers {
        devnet
            .mint(&w.wallet_address(), Coins::from_ton(10).expect("ton"))
            .expect("mint");
    }

    // Each client opens a 1 TON lane to every worker; the first deploys its contract.
    let lane_amount = Coins::from_ton(1).expect("ton");
    for c in &clients {
        for w in &workers {
            let lane = c
                .open_lane(&w.wallet_address(), lane_amount)
                .await
                .expect("open lane");
            assert_eq!(lane.deposited, lane_amount);
        }
        let st = ledger::settlement_state(&*ledger, c.client_contract())
            .await
            .expect("state");
        assert_eq!(st.committed, Coins(4 * lane_amount.nano()));
    }
    // A lane never reserves more than it holds.
    let too_big = clients[0].before_dispatch(&workers[0].wallet_address(), 1_000, None, 1 << 40, 0);
    assert!(
        matches!(too_big, Err(PaymentsError::InsufficientLane { .. })),
        "{too_big:?}"
    );
    // A worker above the caller's max coefficient is refused.
    let pricey = clients[0].before_dispatch(&workers[0].wallet_address(), 3_000, Some(2_000), 1, 1);
    assert!(matches!(
        pricey,
        Err(PaymentsError::CoefficientTooHigh { .. })
    ));
    // Audit F4: a caller's max_coefficient only lowers the operator's cap
    // (2.0 here), never raises it. Before the fix `Some(900_000)` replaced
    // the cap and this reservation at 900x succeeded.
    let lifted =
        clients[0].before_dispatch(&workers[0].wallet_address(), 900_000, Some(900_000), 1, 1);
    assert!(
        matches!(
            lifted,
            Err(PaymentsError::CoefficientTooHigh {
                worker_milli: 900_000,
                max_milli: 2_000
            })
        ),
        "{lifted:?}"
    );

    let mut before = HashMap::new();
    for c in &clients {
        before.insert(
            c.client_contract().clone(),
            ledger
                .account(c.client_contract())
                .await
                .expect("acct")
                .balance,
        );
    }
    let mut worker_before = Vec::new();
    for w in &workers {
        worker_before.push(
            ledger
                .account(&w.wallet_address())
                .await
                .expect("acct")
                .balance,
        );
    }

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut charged = [[0u128; 4]; 2];
    let mut redemptions = [0usize; 4];
    let jobs = 300;
    for job in 0..jobs {
        let (ci, wi) = (rng.next(2) as usize, rng.next(4) as usize);
        let prompt = 1 + rng.next(600);
        let max_tokens = 1 + rng.next(400);
        let completion = rng.next(max_tokens + 1);
        let c = &clients[ci];
        let w = &workers[wi];
        assert!(w.should_serve(c.client_contract()).expect("serve"));
        let r = c
            .before_dispatch(
                &w.wallet_address(),
                w.config().coefficient_milli,
                None,
                prompt,
                max_tokens,
            )
            .expect("reserve");
        if rng.next(20) == 0 {
            c.release(&r).expect("release a failed job");
            continue;
        }
        let (cheque, cost) = c
            .after_job(&r, w.config().coefficient_milli, prompt, 0, completion)
            .expect("settle");
        assert_eq!(
            cost,
            c.config()
                .price
                .cost(1_000, prompt, completion)
                .expect("cost")
        );
        let ack = w
            .on_cheque(
                c.client_contract(),
                &c.public_key(),
                &cheque,
                prompt,
                completion,
            )
            .expect("worker accepts");
        assert_eq!(ack.outstanding, Coins::ZERO);
        charged[ci][wi] += cost.nano();
        if job % 50 == 49 {
            for (i, w) in workers.iter().enumerate() {
                redemptions[i] += w.redeem_due().await.expect("threshold redemption").len();
            }
        }
        if job == 200 {
            // Crash every worker right after it acknowledged cheques, and
            // restart it from its store.
            let addrs: Vec<_> = workers.iter().map(|w| w.wallet_address()).collect();
            workers.clear();
            for i in 0..4 {
                workers.push(open(dirs[2 + i].path(), 10 + i as u8, &ledger).await);
            }
            for (w, a) in workers.iter().zip(addrs) {
                assert_eq!(w.wallet_address(), a);
            }
        }
    }
    for (i, w) in workers.iter().enumerate() {
        redemptions[i] += w
            .redeem_with_threshold(Coins(1))
            .await
            .expect("final redemption")
            .len();
        assert!(w
            .worker_book()
            .due_for_redemption(Coins(1))
            .expect("due")
            .is_empty());
    }

    // Every lane paid exactly the cheques, which are exactly the charges.
    for (ci, c) in clients.iter().enumerate() {
        let mut total = 0u128;
        for (wi, w) in workers.iter().enumerate() {
            let lane = c
                .client_book()
                .lane(&w.wallet_address())
                .expect("lane")
                .expect("exists");
            assert_eq!(lane.signed.nano(), charged[ci][wi]);
            assert_eq!(lane.reserved, Coins::ZERO);
            let on_chain = ledger::settlement_lane(&*ledger, c.client_contract(), lane.lane_id)
                .await
                .expect("lane")
                .expect("exists");
            assert_eq!(
                on_chain.redeemed.nano(),
                charged[ci][wi],
                "worker {wi} paid exactly its cheques"
            );
            let held = w
                .worker_book()
                .lanes()
                .expect("lanes")
                .into_iter()
                .find(|l| &l.contract == c.client_contract())
                .map(|l| (l.cheque_total().nano(), l.redeemed.nano()))
                .unwrap_or((0, 0));
            assert_eq!(held, (charged[ci][wi], charged[ci][wi]));
            total += charged[ci][wi];
        }
        let st = ledger::settlement_state(&*ledger, c.client_contract())
            .await
            .expect("state");
        assert_eq!(
            st.committed.nano(),
            4 * lane_amount.nano() - total,
            "lanes dropped by exactly the charges"
        );
        let drop = before[c.client_contract()].nano() - st.balance.nano();
        // The contract's balance drops by the charges plus its storage fees
        // (gas of redemptions is paid by the workers' attached value).
        let storage_fees = drop
            .checked_sub(total)
            .expect("contract paid at least the charges");
        assert!(
            storage_fees < 1_000_000,
            "storage fees {storage_fees} nanoTON"
        );
        eprintln!(
            "client {ci}: charged {total} nanoTON, contract storage fees {storage_fees} nanoTON"
        );
    }
    for (wi, w) in workers.iter().enumerate() {
        let earned: u128 = (0..2).map(|ci| charged[ci][wi]).sum();
        let after = ledger
            .account(&w.wallet_address())
            .await
            .expect("acct")
            .balance
            .nano();
        let gas_fees = (worker_before[wi].nano() + earned)
            .checked_sub(after)
            .expect("fees are not negative");
        let n = redemptions[wi] as u128;
        assert!(n >= 1);
        assert!(
            gas_fees > 0 && gas_fees < n * config().gas.nano(),
            "worker {wi}: {gas_fees} nanoTON gas for {n} redemptions"
        );
        eprintln!(
            "worker {wi}: earned {earned} nanoTON in {n} redemptions, gas fees {gas_fees} nanoTON"
        );
    }
    let audit = devnet.audit().expect("audit");
    assert!(audit.balanced(), "{audit:?}");
    cancel.cancel();
    producer.await.expect("producer");
}

/// The worker's admission of a client (what `silk run` does before serving
/// a paid job): the lane is checked on chain once, a client past its credit
/// is refused until its cheques catch up, and a lane used up is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_admits_only_clients_with_a_real_lane_and_within_credit() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let client = open(dirs[0].path(), 31, &ledger).await;
    let worker = open(dirs[1].path(), 32, &ledger).await;
    let other = open(dirs[2].path(), 33, &ledger).await;
    for p in [&client, &worker] {
        devnet
            .mint(&p.wallet_address(), Coins::from_ton(10).expect("ton"))
            .expect("mint");
    }
    let contract = client.client_contract().clone();
    let key = client.public_key();

    // No contract on chain yet.
    let e = worker.admit_client(&contract, &key, 1).await;
    assert!(matches!(e, Err(PaymentsError::BadClient { .. })), "{e:?}");

    // 0.02 TON lane to the worker, and one to another worker.
    let small = Coins(20_000_000);
    let lane = client
        .open_lane(&worker.wallet_address(), small)
        .await
        .expect("lane");
    let other_lane = client
        .open_lane(&other.wallet_address(), small)
        .await
        .expect("other lane");
    // Wrong key, someone else's lane, a lane that does not exist: refused.
    for (k, id) in [
        ([7u8; 32], lane.lane_id),
        (key, other_lane.lane_id),
        (key, 99),
    ] {
        let e = worker.admit_client(&contract, &k, id).await;
        assert!(matches!(e, Err(PaymentsError::BadClient { .. })), "{e:?}");
    }
    worker
        .admit_client(&contract, &key, lane.lane_id)
        .await
        .expect("a real lane is admitted");
    let booked = worker
        .worker_book()
        .lane(&contract, lane.lane_id)
        .expect("book")
        .expect("booked");
    assert_eq!(booked.deposited, small);

    // A job whose cheque never came, worth more than the credit: refused.
    let credit = worker.config().credit;
    let unpaid = worker
        .record_unpaid(&contract, lane.lane_id, 0, 3_334)
        .expect("book unpaid");
    assert!(unpaid > credit, "{unpaid:?} vs credit {credit:?}");
    let e = worker.admit_client(&contract, &key, lane.lane_id).await;
    assert!(
        matches!(e, Err(PaymentsError::ClientBehind { .. })),
        "{e:?}"
    );
    // The client pays for it: served again.
    let r = client
        .before_dispatch(&worker.wallet_address(), 1_000, None, 0, 3_334)
        .expect("reserve");
    let (cheque, cost) = client.after_job(&r, 1_000, 0, 0, 3_334).expect("settle");
    assert_eq!(cost, unpaid);
    worker
        .on_cheque(&contract, &key, &cheque, 0, 0)
        .expect("cheque covers the unpaid job");
    worker
        .admit_client(&contract, &key, lane.lane_id)
        .await
        .expect("served again");

    // Work up to what the lane holds: the lane is used up.
    let rest = small.saturating_sub(cost);
    worker
        .worker_book()
        .record_work(&contract, lane.lane_id, rest)
        .expect("work");
    let e = worker.admit_client(&contract, &key, lane.lane_id).await;
    assert!(
        matches!(e, Err(PaymentsError::ClientBehind { .. })),
        "{e:?}"
    );

    // Over the job protocol, a cheque for a lane the worker never admitted
    // (here: the lane to the other worker, whose book is empty) is refused
    // and leaves the store as it was.
    let r = client
        .before_dispatch(&other.wallet_address(), 1_000, None, 0, 1)
        .expect("reserve");
    let (cheque, _) = client.after_job(&r, 1_000, 0, 0, 1).expect("settle");
    let billing = silk_node::billing::Billing::new(other.clone());
    let e = billing
        .on_cheque(silk_node::protocol::ChequeDelivery {
            job: r.id,
            public_key: key,
            cheque,
        })
        .await;
    assert!(matches!(e, Err(PaymentsError::BadCheque(_))), "{e:?}");
    assert!(other.worker_book().lanes().expect("lanes").is_empty());
    cancel.cancel();
    producer.await.expect("producer");
}

/// Audit F5: a lane whose redemption fails must not stop the others. The
/// worker holds a validly signed cheque on a contract that does not exist
/// on chain (its raw address sorts first) and a real one on a funded lane.
/// Before the fix `redeem_with_threshold` returned the first lane's error
/// and the real lane was never redeemed, on any later pass either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_lane_does_not_block_the_other_redemptions() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let client = open(dirs[0].path(), 1, &ledger).await;
    let worker = open(dirs[1].path(), 10, &ledger).await;
    devnet
        .mint(&client.wallet_address(), Coins::from_ton(10).expect("ton"))
        .expect("mint");
    devnet
        .mint(&worker.wallet_address(), Coins::from_ton(10).expect("ton"))
        .expect("mint");
    client
        .open_lane(&worker.wallet_address(), Coins::from_ton(1).expect("ton"))
        .await
        .expect("open lane");

    // A cheque on a contract nobody deployed, signed by its "client".
    let ghost_keys = Keys::from_seed([99; 32]);
    let ghost = silk_chain::Address::new(0, [0; 32]);
    let ghost_cheque = silk_chain::Cheque {
        contract: ghost.clone(),
        worker: worker.wallet_address(),
        lane_id: 1,
        cumulative: Coins(50_000_000),
    }
    .sign(&ghost_keys)
    .expect("sign");
    worker
        .on_cheque(&ghost, &ghost_keys.public_key(), &ghost_cheque, 0, 0)
        .expect("kept");

    // One real job, paid.
    let coefficient = worker.config().coefficient_milli;
    let r = client
        .before_dispatch(&worker.wallet_address(), coefficient, None, 100, 100)
        .expect("reserve");
    let (cheque, cost) = client
        .after_job(&r, coefficient, 100, 0, 100)
        .expect("settle");
    worker
        .on_cheque(
            client.client_contract(),
            &client.public_key(),
            &cheque,
            100,
            100,
        )
        .expect("accepted");

    for pass in 0..2 {
        let done = worker
            .redeem_with_threshold(Coins(1))
            .await
            .expect("a pass over the due lanes");
        let real: Vec<_> = done
            .iter()
            .filter(|d| &d.contract == client.client_contract())
            .collect();
        if pass == 0 {
            assert_eq!(real.len(), 1, "{done:?}");
            assert_eq!(real[0].after, cost);
        }
        assert!(done.iter().all(|d| d.contract != ghost), "{done:?}");
    }
    let lane = ledger::settlement_lane(&*ledger, client.client_contract(), 1)
        .await
        .expect("lane")
        .expect("exists");
    assert_eq!(lane.redeemed, cost);
    cancel.cancel();
    let _ = producer.await;
}

/// Sends `body` to `dest` from the v4r2 wallet of `keys` (attaching
/// `state_init` when given) and waits until `dest` has an active account.
async fn send_from(
    ledger: &Arc<dyn Ledger>,
    keys: &Keys,
    dest: &silk_chain::Address,
    body: tonlib_cell::ArcCell,
    state_init: Option<silk_chain::message::StateInit>,
) {
    let wallet = silk_chain::Wallet::new(silk_chain::WalletVersion::V4R2, keys).expect("wallet");
    let msg = silk_chain::message::OutMessage {
        dest: dest.clone(),
        value: Coins(100_000_000),
        bounce: state_init.is_none(),
        body: Some(body),
        state_init,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as u32;
    let tx = ledger::send_transfer(&**ledger, &wallet, &[msg], now, Duration::from_secs(30))
        .await
        .expect("transfer");
    // The destination processes the message in a later block.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let txs = ledger.transactions(dest, 8).await.unwrap_or_default();
        if txs.iter().any(|t| t.lt > tx.lt) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dest} never processed the message"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use silk_chain::tonlib_core::cell as tonlib_cell;

/// Audit F2: a client deploys the genuine settlement code with forged
/// initial storage (a 1,000 TON lane to the worker, nothing committed,
/// 0.1 TON of balance). Its get-methods report the forged lane. Before the
/// fix the worker admitted it (and would have served up to 1,000 TON on
/// cheques the contract can never pay); now the address check refuses it,
/// and a second try is refused from memory without reading the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_with_forged_storage_is_refused() {
    use silk_chain::settlement::{self, SettlementParams};
    use tonlib_cell::{CellBuilder, TonCellError};

    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let attacker = open(dirs[0].path(), 41, &ledger).await;
    let worker = open(dirs[1].path(), 42, &ledger).await;
    devnet
        .mint(
            &attacker.wallet_address(),
            Coins::from_ton(10).expect("ton"),
        )
        .expect("mint");
    let keys = Keys::from_seed([41; 32]);
    let params = SettlementParams {
        owner: attacker.wallet_address(),
        public_key: keys.public_key(),
        close_delay_s: 86_400,
        nonce: 1,
    };
    // The storage of the README's layout, with a lane nobody funded.
    let forged_lane = Coins::from_ton(1_000).expect("ton");
    let lane_writer =
        |b: &mut CellBuilder,
         (worker, amount): (silk_chain::tonlib_core::TonAddress, num_bigint::BigUint)|
         -> Result<(), TonCellError> {
            b.store_raw_address(&worker)?
                .store_coins(&amount)?
                .store_coins(&num_bigint::BigUint::ZERO)?
                .store_u32(32, 0)?
                .store_bit(false)?;
            Ok(())
        };
    let mut lanes = HashMap::new();
    lanes.insert(
        1u32,
        (
            worker.wallet_address().as_ton().clone(),
            num_bigint::BigUint::from(forged_lane.nano()),
        ),
    );
    let mut data = CellBuilder::new();
    data.store_raw_address(params.owner.as_ton())
        .and_then(|b| b.store_slice(&params.public_key))
        .and_then(|b| b.store_u32(32, params.close_delay_s))
        .and_then(|b| b.store_u64(64, params.nonce))
        .and_then(|b| b.store_coins(&num_bigint::BigUint::ZERO))
        .and_then(|b| b.store_dict(32, lane_writer, lanes))
        .expect("forged storage");
    let state_init = silk_chain::message::StateInit {
        code: settlement::settlement_code().expect("code"),
        data: data.build().expect("cell").to_arc(),
    };
    let forged = state_init.address(0).expect("address");
    assert_ne!(&forged, attacker.client_contract());
    send_from(
        &ledger,
        &keys,
        &forged,
        settlement::deposit_body(0).expect("body"),
        Some(state_init),
    )
    .await;
    // The forgery reads as a funded lane to this worker.
    let lane = ledger::settlement_lane(&*ledger, &forged, 1)
        .await
        .expect("get_lane")
        .expect("the forged lane");
    assert_eq!(lane.worker, worker.wallet_address());
    assert_eq!(lane.deposited, forged_lane);

    let e = worker.admit_client(&forged, &keys.public_key(), 1).await;
    match &e {
        Err(PaymentsError::BadClient { reason, .. }) => {
            assert!(
                reason.contains("not silk's settlement contract"),
                "{reason}"
            )
        }
        other => panic!("a forged contract was admitted: {other:?}"),
    }
    assert!(worker.worker_book().lanes().expect("lanes").is_empty());
    // Remembered: refused again with the chain gone.
    cancel.cancel();
    producer.await.expect("producer");
    let again = worker.admit_client(&forged, &keys.public_key(), 1).await;
    assert!(
        matches!(again, Err(PaymentsError::BadClient { .. })),
        "{again:?}"
    );
}

/// Audit F6, first half: a client whose contract lets it reclaim a lane at
/// once (close delay 0) could close and reclaim the funds behind cheques
/// the worker holds before it redeems them. Before the fix the worker never
/// read the delay and admitted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_contract_with_a_short_close_delay_is_refused() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let client = Payments::open(
        dirs[0].path(),
        PaymentsConfig {
            close_delay_s: 0,
            ..config()
        },
        ledger.clone(),
        Keys::from_seed([51; 32]),
    )
    .await
    .expect("client");
    let worker = open(dirs[1].path(), 52, &ledger).await;
    devnet
        .mint(&client.wallet_address(), Coins::from_ton(10).expect("ton"))
        .expect("mint");
    let lane = client
        .open_lane(&worker.wallet_address(), Coins(20_000_000))
        .await
        .expect("lane");
    let e = worker
        .admit_client(client.client_contract(), &client.public_key(), lane.lane_id)
        .await;
    match &e {
        Err(PaymentsError::BadClient { reason, .. }) => {
            assert!(reason.contains("close delay is 0 s"), "{reason}")
        }
        other => panic!("a zero close delay was admitted: {other:?}"),
    }
    cancel.cancel();
    producer.await.expect("producer");
}

/// Audit F6, second half: the client starts closing a lane while the worker
/// holds a paid cheque below its redemption threshold. Before the fix the
/// worker kept admitting the lane from its book and never redeemed it, so
/// the client could reclaim the money after the delay. Now one worker
/// finds the close by polling and redeems below the threshold; another
/// finds it at admission (its lane read is older than the TTL), refuses
/// the job and redeems on its next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_lane_is_refused_and_redeemed_below_the_threshold() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let client = open(dirs[0].path(), 61, &ledger).await;
    let worker_config = |min_close_delay_s| PaymentsConfig {
        redeem_threshold: Coins::from_ton(1).expect("ton"),
        lane_check_ttl_s: 0,
        min_close_delay_s,
        ..config()
    };
    // Polls every second (a quarter of 4 s) / every 15 minutes.
    let poller = Payments::open(
        dirs[1].path(),
        worker_config(4),
        ledger.clone(),
        Keys::from_seed([62; 32]),
    )
    .await
    .expect("worker");
    let admitter = Payments::open(
        dirs[2].path(),
        worker_config(3_600),
        ledger.clone(),
        Keys::from_seed([63; 32]),
    )
    .await
    .expect("worker");
    for p in [&client, &poller, &admitter] {
        devnet
            .mint(&p.wallet_address(), Coins::from_ton(10).expect("ton"))
            .expect("mint");
    }
    let (contract, key) = (client.client_contract().clone(), client.public_key());
    let mut costs = Vec::new();
    for w in [&poller, &admitter] {
        let lane = client
            .open_lane(&w.wallet_address(), Coins::from_ton(1).expect("ton"))
            .await
            .expect("lane");
        w.admit_client(&contract, &key, lane.lane_id)
            .await
            .expect("admitted while open");
        let r = client
            .before_dispatch(&w.wallet_address(), 1_000, None, 100, 100)
            .expect("reserve");
        let (cheque, cost) = client.after_job(&r, 1_000, 100, 0, 100).expect("settle");
        w.on_cheque(&contract, &key, &cheque, 100, 100)
            .expect("accepted");
        assert!(
            w.redeem_due().await.expect("pass").is_empty(),
            "below the threshold"
        );
        send_from(
            &ledger,
            &Keys::from_seed([61; 32]),
            &contract,
            silk_chain::settlement::close_lane_body(0, lane.lane_id).expect("body"),
            None,
        )
        .await;
        costs.push((lane.lane_id, cost));
    }

    // The poller: no admission needed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let done = poller.redeem_due().await.expect("pass");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].after, costs[0].1);

    // The admitter: refused at admission, redeemed on the next pass.
    let e = admitter.admit_client(&contract, &key, costs[1].0).await;
    match &e {
        Err(PaymentsError::BadClient { reason, .. }) => {
            assert!(reason.contains("closing"), "{reason}")
        }
        other => panic!("a closing lane was admitted: {other:?}"),
    }
    let done = admitter.redeem_due().await.expect("pass");
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].after, costs[1].1);
    for (lane_id, cost) in costs {
        let lane = ledger::settlement_lane(&*ledger, &contract, lane_id)
            .await
            .expect("lane")
            .expect("exists");
        assert_eq!(lane.redeemed, cost);
        assert_ne!(lane.closing_at, 0);
    }
    cancel.cancel();
    producer.await.expect("producer");
}

/// The devnet's chain seen as another network (the TON mainnet's global
/// id): what the same keys and config meet when moved to another network.
struct OtherNetwork(Devnet);

#[async_trait::async_trait]
impl Ledger for OtherNetwork {
    async fn send_message(&self, boc: &[u8]) -> silk_chain::Result<[u8; 32]> {
        self.0.send_message(boc).await
    }
    async fn run_get_method(
        &self,
        address: &silk_chain::Address,
        method: &str,
        stack: &[ledger::StackValue],
    ) -> silk_chain::Result<ledger::GetMethodOutput> {
        self.0.run_get_method(address, method, stack).await
    }
    async fn account(
        &self,
        address: &silk_chain::Address,
    ) -> silk_chain::Result<ledger::AccountInfo> {
        self.0.account(address).await
    }
    async fn transactions(
        &self,
        address: &silk_chain::Address,
        limit: usize,
    ) -> silk_chain::Result<Vec<ledger::TxInfo>> {
        self.0.transactions(address, limit).await
    }
    async fn global_id(&self) -> silk_chain::Result<i32> {
        Ok(-239)
    }
}

/// Audit F18: a contract's address depended only on its owner, key, delay
/// and nonce, so the same mnemonic and config made the same contract on a
/// devnet, the testnet and the mainnet, and a cheque signed on one was
/// valid on the others. Now the network's global id is in the nonce: the
/// contracts differ, a cheque for one does not verify for the other, a
/// data directory refuses a ledger of another network, and a worker
/// refuses a contract made for another network. Before the fix the two
/// contracts were the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheques_cannot_be_replayed_across_networks() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let here: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let there: Arc<dyn Ledger> = Arc::new(OtherNetwork(devnet.clone()));
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let keys = Keys::from_seed([71; 32]);
    let on_devnet = open(dirs[0].path(), 71, &here).await;
    let on_mainnet = Payments::open(dirs[1].path(), config(), there.clone(), keys.clone())
        .await
        .expect("payments");
    assert_eq!(on_devnet.wallet_address(), on_mainnet.wallet_address());
    assert_eq!(on_devnet.network(), silk_chain::devnet::DEVNET_GLOBAL_ID);
    assert_eq!(on_mainnet.network(), -239);
    assert_ne!(
        on_devnet.client_contract(),
        on_mainnet.client_contract(),
        "one contract address on two networks"
    );

    // A devnet cheque presented on the mainnet contract does not verify.
    let worker =
        silk_chain::Wallet::new(silk_chain::WalletVersion::V4R2, &Keys::from_seed([72; 32]))
            .expect("wallet")
            .address();
    let signed = silk_chain::Cheque {
        contract: on_devnet.client_contract().clone(),
        worker: worker.clone(),
        lane_id: 1,
        cumulative: Coins(1_000_000),
    }
    .sign(&keys)
    .expect("sign");
    let replayed = silk_chain::SignedCheque {
        cheque: silk_chain::Cheque {
            contract: on_mainnet.client_contract().clone(),
            ..signed.cheque.clone()
        },
        signature: signed.signature,
    };
    assert!(signed.verify(&keys.public_key()).is_ok());
    assert!(replayed.verify(&keys.public_key()).is_err());

    drop(on_mainnet);

    // A worker on the other network refuses the devnet client's contract.
    devnet
        .mint(
            &on_devnet.wallet_address(),
            Coins::from_ton(10).expect("ton"),
        )
        .expect("mint");
    let lane = on_devnet
        .open_lane(&worker, Coins(20_000_000))
        .await
        .expect("lane");
    let far_worker = Payments::open(
        dirs[2].path(),
        config(),
        there.clone(),
        Keys::from_seed([72; 32]),
    )
    .await
    .expect("worker");
    let e = far_worker
        .admit_client(
            on_devnet.client_contract(),
            &keys.public_key(),
            lane.lane_id,
        )
        .await;
    match &e {
        Err(PaymentsError::BadClient { reason, .. }) => {
            assert!(reason.contains("made for network"), "{reason}")
        }
        other => panic!("a contract of another network was admitted: {other:?}"),
    }

    // The devnet's data directory refuses the other network.
    drop(on_devnet);
    let moved = Payments::open(dirs[0].path(), config(), there, keys).await;
    match moved {
        Err(PaymentsError::Config(why)) => assert!(why.contains("network"), "{why}"),
        other => panic!("a data directory moved to another network opened: {other:?}"),
    }
    cancel.cancel();
    producer.await.expect("producer");
}
