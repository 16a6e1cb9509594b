//! The devnet runs the real wallet and settlement code: a client deploys its
//! contract, opens lanes, a worker redeems cheques signed in Rust, and money
//! is conserved across random sequences of operations.

use std::time::Duration;

use proptest::prelude::*;
use silk_chain::devnet::{Clock, Devnet, DevnetConfig};
use silk_chain::ledger::{self, AccountStatus, Ledger};
use silk_chain::message::{to_boc, wallet_transfer, OutMessage};
use silk_chain::settlement::{self, exit_code, LaneTopUp, SettlementParams};
use silk_chain::{Address, Cheque, Coins, Keys, Wallet, WalletVersion};
use tokio_util::sync::CancellationToken;

const START: u32 = 1_800_000_000;
const DELAY: u32 = 600;

fn ton(n: u64) -> Coins {
    Coins::from_ton(n).expect("coins")
}

fn milli(n: u128) -> Coins {
    Coins(n * 1_000_000)
}

fn manual_devnet() -> Devnet {
    Devnet::in_memory(DevnetConfig {
        block_interval: Duration::from_millis(5),
        clock: Clock::Manual { start: START },
    })
    .expect("devnet")
}

struct Setup {
    client: Keys,
    client_wallet: Wallet,
    worker_wallets: Vec<Wallet>,
    params: SettlementParams,
    contract: Address,
}

fn setup(devnet: &Devnet, workers: usize) -> Setup {
    let client = Keys::from_seed([1; 32]);
    let client_wallet = Wallet::new(WalletVersion::V4R2, &client).expect("wallet");
    devnet
        .mint(&client_wallet.address(), ton(1_000))
        .expect("mint");
    let worker_wallets: Vec<Wallet> = (0..workers)
        .map(|i| {
            let k = Keys::from_seed([10 + i as u8; 32]);
            let w = Wallet::new(WalletVersion::V5R1, &k).expect("wallet");
            devnet.mint(&w.address(), ton(10)).expect("mint");
            w
        })
        .collect();
    let params = SettlementParams {
        owner: client_wallet.address(),
        public_key: client.public_key(),
        close_delay_s: DELAY,
        nonce: 1,
    };
    let contract = params.address().expect("address");
    Setup {
        client,
        client_wallet,
        worker_wallets,
        params,
        contract,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_and_a_worker_settle_through_the_real_contract() {
    let devnet = manual_devnet();
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let s = setup(&devnet, 2);
    let l: &dyn Ledger = &devnet;
    let timeout = Duration::from_secs(20);
    let now = devnet.now().expect("now");

    // Deploy the wallet and the contract with a 100 TON deposit in one transfer.
    let deploy = OutMessage {
        dest: s.contract.clone(),
        value: ton(100),
        bounce: false,
        body: Some(settlement::deposit_body(1).expect("body")),
        state_init: Some(s.params.state_init().expect("init")),
    };
    let tx = ledger::send_transfer(l, &s.client_wallet, &[deploy], now, timeout)
        .await
        .expect("deploy");
    assert_eq!(tx.exit_code, Some(0));
    assert_eq!(
        l.account(&s.contract).await.expect("account").status,
        AccountStatus::Active
    );
    let st = ledger::settlement_state(l, &s.contract)
        .await
        .expect("state");
    assert_eq!(st.owner, s.client_wallet.address());
    assert_eq!(st.public_key, s.client.public_key());
    assert_eq!(st.committed, Coins::ZERO);
    assert!(
        st.balance > ton(99) && st.balance <= ton(100),
        "balance {}",
        st.balance
    );

    // Open lanes to both workers in one message.
    let w0 = s.worker_wallets[0].address();
    let w1 = s.worker_wallets[1].address();
    let lanes = [
        LaneTopUp {
            lane_id: 1,
            worker: w0.clone(),
            amount: ton(5),
        },
        LaneTopUp {
            lane_id: 2,
            worker: w1.clone(),
            amount: ton(7),
        },
    ];
    let open = OutMessage {
        dest: s.contract.clone(),
        value: milli(50),
        bounce: true,
        body: Some(settlement::open_lanes_body(2, &lanes).expect("body")),
        state_init: None,
    };
    ledger::send_transfer(l, &s.client_wallet, &[open], now, timeout)
        .await
        .expect("open");
    let lane = ledger::settlement_lane(l, &s.contract, 2)
        .await
        .expect("lane")
        .expect("lane 2 exists");
    assert_eq!(
        (lane.worker.clone(), lane.deposited, lane.redeemed),
        (w1.clone(), ton(7), Coins::ZERO)
    );
    assert_eq!(
        ledger::settlement_lane(l, &s.contract, 3)
            .await
            .expect("lane"),
        None
    );
    assert_eq!(
        ledger::settlement_state(l, &s.contract)
            .await
            .expect("state")
            .committed,
        ton(12)
    );

    // The worker redeems a cheque signed in Rust.
    let cheque = Cheque {
        contract: s.contract.clone(),
        worker: w0.clone(),
        lane_id: 1,
        cumulative: milli(1_250),
    }
    .sign(&s.client)
    .expect("sign");
    cheque.verify(&s.client.public_key()).expect("verify");
    let before = l.account(&s.contract).await.expect("account").balance;
    let redeem = OutMessage {
        dest: s.contract.clone(),
        value: milli(50),
        bounce: true,
        body: Some(settlement::redeem_body(3, &cheque).expect("body")),
        state_init: None,
    };
    ledger::send_transfer(
        l,
        &s.worker_wallets[0],
        std::slice::from_ref(&redeem),
        now,
        timeout,
    )
    .await
    .expect("redeem");
    assert_eq!(
        l.account(&s.contract).await.expect("account").balance,
        Coins(before.nano() - milli(1_250).nano())
    );
    let lane = ledger::settlement_lane(l, &s.contract, 1)
        .await
        .expect("lane")
        .expect("lane 1");
    assert_eq!(lane.redeemed, milli(1_250));
    let worker_txs = l.transactions(&w0, 4).await.expect("txs");
    assert!(worker_txs
        .iter()
        .any(|t| t.in_from.as_ref() == Some(&s.contract) && t.in_value > milli(1_250)));

    // A replay is refused by the contract.
    ledger::send_transfer(l, &s.worker_wallets[0], &[redeem], now, timeout)
        .await
        .expect("replay");
    let contract_txs = l.transactions(&s.contract, 1).await.expect("txs");
    assert_eq!(
        contract_txs[0].exit_code,
        Some(exit_code::NOTHING_TO_REDEEM)
    );
    assert!(contract_txs[0].aborted);
    // The other worker cannot use this cheque.
    let stolen = OutMessage {
        dest: s.contract.clone(),
        value: milli(50),
        bounce: true,
        body: Some(settlement::redeem_body(4, &cheque).expect("body")),
        state_init: None,
    };
    ledger::send_transfer(l, &s.worker_wallets[1], &[stolen], now, timeout)
        .await
        .expect("stolen");
    assert_eq!(
        l.transactions(&s.contract, 1).await.expect("txs")[0].exit_code,
        Some(exit_code::WRONG_WORKER)
    );

    let audit = devnet.audit().expect("audit");
    assert!(audit.balanced(), "{audit:?}");
    assert!(audit.fees > 0);
    cancel.cancel();
    producer.await.expect("producer");
}

/// One step of a random scenario.
#[derive(Clone, Debug)]
enum Op {
    Deposit(u8),
    Open { lane: u8, worker: u8, amount: u16 },
    Cheque { lane: u8, add: u16 },
    Redeem { lane: u8 },
    Close { lane: u8 },
    Reclaim { lane: u8 },
    Wait(u16),
    Withdraw(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..20).prop_map(Op::Deposit),
        (0u8..3, 0u8..2, 1u16..3000).prop_map(|(lane, worker, amount)| Op::Open {
            lane,
            worker,
            amount
        }),
        (0u8..3, 1u16..2000).prop_map(|(lane, add)| Op::Cheque { lane, add }),
        (0u8..3).prop_map(|lane| Op::Redeem { lane }),
        (0u8..3).prop_map(|lane| Op::Close { lane }),
        (0u8..3).prop_map(|lane| Op::Reclaim { lane }),
        (1u16..1200).prop_map(Op::Wait),
        (1u16..5000).prop_map(Op::Withdraw),
    ]
}

struct Sim {
    devnet: Devnet,
    rt: tokio::runtime::Runtime,
    s: Setup,
    /// Highest cheque signed per lane (cheques only grow).
    signed: [u128; 3],
    /// Redeemed per lane, as last observed (must never decrease).
    redeemed: [u128; 3],
}

impl Sim {
    fn transfer(&self, wallet: &Wallet, msg: OutMessage) {
        let l: &dyn Ledger = &self.devnet;
        let seqno = self
            .rt
            .block_on(ledger::wallet_seqno(l, &wallet.address()))
            .expect("seqno");
        let now = self.devnet.now().expect("now");
        let cell = wallet_transfer(wallet, seqno, now + 600, &[msg]).expect("transfer");
        self.rt
            .block_on(l.send_message(&to_boc(&cell).expect("boc")))
            .expect("send");
        self.devnet.run_until_idle(10).expect("idle");
    }

    fn to_contract(
        &self,
        body: silk_chain::tonlib_core::cell::ArcCell,
        value: Coins,
    ) -> OutMessage {
        OutMessage {
            dest: self.s.contract.clone(),
            value,
            bounce: true,
            body: Some(body),
            state_init: None,
        }
    }

    fn apply(&mut self, op: &Op) {
        let owner = self.s.client_wallet.clone();
        match *op {
            Op::Deposit(t) => self.transfer(
                &owner,
                self.to_contract(settlement::deposit_body(0).expect("b"), ton(t as u64)),
            ),
            Op::Open {
                lane,
                worker,
                amount,
            } => {
                let top = LaneTopUp {
                    lane_id: lane as u32,
                    worker: self.s.worker_wallets[worker as usize].address(),
                    amount: milli(amount as u128),
                };
                self.transfer(
                    &owner,
                    self.to_contract(
                        settlement::open_lanes_body(0, &[top]).expect("b"),
                        milli(50),
                    ),
                )
            }
            Op::Cheque { lane, add } => self.signed[lane as usize] += milli(add as u128).nano(),
            Op::Redeem { lane } => {
                let l: &dyn Ledger = &self.devnet;
                let Some(state) = self
                    .rt
                    .block_on(ledger::settlement_lane(l, &self.s.contract, lane as u32))
                    .expect("lane")
                else {
                    return;
                };
                let worker = self
                    .s
                    .worker_wallets
                    .iter()
                    .find(|w| w.address() == state.worker)
                    .expect("lane worker is ours")
                    .clone();
                let cheque = Cheque {
                    contract: self.s.contract.clone(),
                    worker: state.worker.clone(),
                    lane_id: lane as u32,
                    cumulative: Coins(self.signed[lane as usize]),
                }
                .sign(&self.s.client)
                .expect("sign");
                self.transfer(
                    &worker,
                    self.to_contract(settlement::redeem_body(0, &cheque).expect("b"), milli(50)),
                )
            }
            Op::Close { lane } => self.transfer(
                &owner,
                self.to_contract(
                    settlement::close_lane_body(0, lane as u32).expect("b"),
                    milli(50),
                ),
            ),
            Op::Reclaim { lane } => self.transfer(
                &owner,
                self.to_contract(
                    settlement::reclaim_lane_body(0, lane as u32).expect("b"),
                    milli(50),
                ),
            ),
            Op::Wait(s) => self.devnet.advance_time(s as u32).expect("time"),
            Op::Withdraw(m) => self.transfer(
                &owner,
                self.to_contract(
                    settlement::withdraw_body(0, Some(milli(m as u128))).expect("b"),
                    milli(50),
                ),
            ),
        }
    }

    fn check(&mut self) {
        let audit = self.devnet.audit().expect("audit");
        assert!(audit.balanced(), "money appeared or vanished: {audit:?}");
        let l: &dyn Ledger = &self.devnet;
        let st = self
            .rt
            .block_on(ledger::settlement_state(l, &self.s.contract))
            .expect("state");
        assert!(
            st.balance >= st.committed,
            "contract holds less than its lanes: {st:?}"
        );
        let mut committed = 0u128;
        for lane in 0..3u32 {
            if let Some(state) = self
                .rt
                .block_on(ledger::settlement_lane(l, &self.s.contract, lane))
                .expect("lane")
            {
                assert!(
                    state.redeemed <= state.deposited,
                    "payout above lane: {state:?}"
                );
                assert!(
                    state.redeemed.nano() >= self.redeemed[lane as usize],
                    "redeemed went down"
                );
                assert!(
                    state.redeemed.nano() <= self.signed[lane as usize],
                    "paid more than the client signed"
                );
                self.redeemed[lane as usize] = state.redeemed.nano();
                committed += state.remaining().nano();
            }
        }
        assert_eq!(st.committed.nano(), committed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn funds_are_conserved_and_lanes_never_overpay(ops in proptest::collection::vec(op(), 1..25)) {
        let devnet = manual_devnet();
        let s = setup(&devnet, 2);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut sim = Sim { devnet, rt, s, signed: [0; 3], redeemed: [0; 3] };
        let deploy = OutMessage {
            dest: sim.s.contract.clone(),
            value: ton(20),
            bounce: false,
            body: Some(settlement::deposit_body(0).expect("b")),
            state_init: Some(sim.s.params.state_init().expect("init")),
        };
        let owner = sim.s.client_wallet.clone();
        sim.transfer(&owner, deploy);
        sim.check();
        for op in &ops {
            sim.apply(op);
            sim.check();
        }
    }
}

/// The same simulator on a fixed script, so we know the random runs above
/// exercise real payouts, closes and withdrawals rather than only refusals.
#[test]
fn scripted_lane_lifecycle() {
    let devnet = manual_devnet();
    let s = setup(&devnet, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut sim = Sim {
        devnet,
        rt,
        s,
        signed: [0; 3],
        redeemed: [0; 3],
    };
    let deploy = OutMessage {
        dest: sim.s.contract.clone(),
        value: ton(20),
        bounce: false,
        body: Some(settlement::deposit_body(0).expect("b")),
        state_init: Some(sim.s.params.state_init().expect("init")),
    };
    let owner = sim.s.client_wallet.clone();
    sim.transfer(&owner, deploy);
    let lane = |sim: &Sim| {
        let l: &dyn Ledger = &sim.devnet;
        sim.rt
            .block_on(ledger::settlement_lane(l, &sim.s.contract, 0))
            .expect("lane")
            .expect("lane 0")
    };
    for op in [
        Op::Open {
            lane: 0,
            worker: 1,
            amount: 2000,
        },
        Op::Cheque { lane: 0, add: 500 },
        Op::Redeem { lane: 0 },
    ] {
        sim.apply(&op);
        sim.check();
    }
    assert_eq!(lane(&sim).redeemed, milli(500));
    for op in [Op::Close { lane: 0 }, Op::Reclaim { lane: 0 }] {
        sim.apply(&op);
        sim.check();
    }
    assert!(!lane(&sim).finished, "reclaimed before the delay");
    for op in [Op::Cheque { lane: 0, add: 3000 }, Op::Redeem { lane: 0 }] {
        sim.apply(&op);
        sim.check();
    }
    assert_eq!(
        lane(&sim).redeemed,
        milli(2000),
        "a cheque above the lane pays the lane"
    );
    for op in [
        Op::Open {
            lane: 1,
            worker: 0,
            amount: 1000,
        },
        Op::Close { lane: 1 },
        Op::Wait(DELAY as u16),
        Op::Reclaim { lane: 1 },
    ] {
        sim.apply(&op);
        sim.check();
    }
    let devnet = sim.devnet.clone();
    let l: &dyn Ledger = &devnet;
    let lane1 = sim
        .rt
        .block_on(ledger::settlement_lane(l, &sim.s.contract, 1))
        .expect("lane")
        .expect("lane 1");
    assert!(lane1.finished);
    let before = sim
        .rt
        .block_on(l.account(&owner.address()))
        .expect("account")
        .balance;
    sim.apply(&Op::Withdraw(1000));
    sim.check();
    let after = sim
        .rt
        .block_on(l.account(&owner.address()))
        .expect("account")
        .balance;
    assert!(
        after > before,
        "withdrawal reached the owner: {before} -> {after}"
    );
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("devnet.redb");
    let config = DevnetConfig {
        block_interval: Duration::from_millis(5),
        clock: Clock::Manual { start: START },
    };
    let keys = Keys::from_seed([3; 32]);
    let wallet = Wallet::new(WalletVersion::V4R2, &keys).expect("wallet");
    let other = Address::new(0, [0x44; 32]);
    let first_tx = {
        let devnet = Devnet::open(&path, config.clone()).expect("open");
        devnet.mint(&wallet.address(), ton(5)).expect("mint");
        let msg = OutMessage {
            dest: other.clone(),
            value: ton(1),
            bounce: false,
            body: None,
            state_init: None,
        };
        let cell = wallet_transfer(&wallet, 0, START + 600, &[msg]).expect("transfer");
        let l: &dyn Ledger = &devnet;
        let hash = l
            .send_message(&to_boc(&cell).expect("boc"))
            .await
            .expect("send");
        devnet.run_until_idle(5).expect("idle");
        l.wait_for_message(&wallet.address(), hash, Duration::from_secs(5))
            .await
            .expect("included")
    };
    let devnet = Devnet::open(&path, config).expect("reopen");
    let l: &dyn Ledger = &devnet;
    assert_eq!(l.account(&other).await.expect("account").balance, ton(1));
    assert_eq!(
        l.account(&wallet.address()).await.expect("account").status,
        AccountStatus::Active
    );
    assert_eq!(
        l.transactions(&wallet.address(), 10).await.expect("txs")[0],
        first_tx
    );
    assert_eq!(
        ledger::wallet_seqno(l, &wallet.address())
            .await
            .expect("seqno"),
        1
    );
    assert!(devnet.audit().expect("audit").balanced());
}
