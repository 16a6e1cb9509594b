//! Cross-checks with the JS side (`contracts/`):
//!
//! - `ton-transfers.json`, written by `contracts/scripts/fixtures.mjs` with
//!   `@ton/ton`: wallet transfers we sign must be byte-identical.
//! - `rust-settlement.json`, written here: cheques and messages the sandbox
//!   test `contracts/tests/rust-fixture.test.mjs` sends to the real contract.
//!   This test fails if the committed file is stale; `SILK_BLESS=1 cargo test
//!   -p silk-chain --test fixtures` rewrites it.

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{json, Value};
use silk_chain::message::{cell_hash, from_boc, to_boc, wallet_transfer, OutMessage};
use silk_chain::settlement::{self, LaneTopUp, SettlementParams};
use silk_chain::{Address, Cheque, Coins, Keys, Wallet, WalletVersion};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("contracts")
        .join("fixtures")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("fixture base64")
}

#[test]
fn wallet_transfers_are_byte_identical_to_ton_ton() {
    let text = std::fs::read_to_string(fixtures_dir().join("ton-transfers.json"))
        .expect("read ton-transfers.json");
    let fixture: Value = serde_json::from_str(&text).expect("parse ton-transfers.json");
    let mut checked = 0;
    for w in fixture["wallets"].as_array().expect("wallets") {
        let keys =
            Keys::from_mnemonic(w["mnemonic"].as_str().expect("mnemonic")).expect("mnemonic");
        let version = match w["version"].as_str() {
            Some("V4R2") => WalletVersion::V4R2,
            Some("V5R1") => WalletVersion::V5R1,
            other => panic!("unknown wallet version {other:?}"),
        };
        let wallet = Wallet::new(version, &keys).expect("wallet");
        assert_eq!(
            wallet.address().to_raw(),
            w["address"].as_str().expect("address"),
            "{version:?} address"
        );
        for t in w["transfers"].as_array().expect("transfers") {
            let messages: Vec<OutMessage> = t["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    let state_init = m["settlement_init"].as_object().map(|i| {
                        let params = SettlementParams {
                            owner: i["owner"]
                                .as_str()
                                .expect("owner")
                                .parse()
                                .expect("owner address"),
                            public_key: keys.public_key(),
                            close_delay_s: i["close_delay_s"].as_u64().expect("delay") as u32,
                            nonce: i["nonce"].as_u64().expect("nonce"),
                        };
                        assert_eq!(
                            params.address().expect("address").to_raw(),
                            w["settlement_address"].as_str().expect("sa")
                        );
                        params.state_init().expect("state init")
                    });
                    OutMessage {
                        dest: m["dest"]
                            .as_str()
                            .expect("dest")
                            .parse()
                            .expect("dest address"),
                        value: Coins(m["value"].as_str().expect("value").parse().expect("value")),
                        bounce: m["bounce"].as_bool().expect("bounce"),
                        body: m["body"]
                            .as_str()
                            .map(|b| from_boc(&unb64(b)).expect("body boc")),
                        state_init,
                    }
                })
                .collect();
            let seqno = t["seqno"].as_u64().expect("seqno") as u32;
            let valid_until = t["valid_until"].as_u64().expect("valid_until") as u32;
            let cell = wallet_transfer(&wallet, seqno, valid_until, &messages).expect("transfer");
            let ours = to_boc(&cell).expect("boc");
            let theirs = from_boc(&unb64(t["boc"].as_str().expect("boc"))).expect("their boc");
            // Same cell tree, every cell byte for byte: same root hash, and
            // the same bytes once both trees go through one serialiser.
            // (tonlib-core and @ton/core order cells differently inside a
            // BOC file; the order carries no meaning.)
            assert_eq!(
                hex::encode(cell_hash(&cell)),
                hex::encode(cell_hash(&theirs)),
                "{version:?} seqno {seqno}: message hash differs from @ton/ton's"
            );
            assert_eq!(
                b64(&ours),
                b64(&to_boc(&theirs).expect("boc")),
                "{version:?} seqno {seqno}: cells differ from @ton/ton's"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

/// The settlement scenario the sandbox replays: fixed keys and addresses.
fn settlement_fixture() -> Value {
    let client = Keys::from_seed([11; 32]);
    let owner = Address::new(0, [0xaa; 32]);
    let w1 = Address::new(0, [0xb1; 32]);
    let w2 = Address::new(0, [0xb2; 32]);
    let params = SettlementParams {
        owner: owner.clone(),
        public_key: client.public_key(),
        close_delay_s: 600,
        nonce: 42,
    };
    let contract = params.address().expect("address");
    let init = params.state_init().expect("state init");
    let ton = |t: u64| Coins::from_ton(t).expect("coins");
    let lanes = [
        LaneTopUp {
            lane_id: 1,
            worker: w1.clone(),
            amount: ton(2),
        },
        LaneTopUp {
            lane_id: 2,
            worker: w2.clone(),
            amount: ton(3),
        },
    ];
    let cheque = |worker: &Address, lane_id: u32, nano: u128| {
        Cheque {
            contract: contract.clone(),
            worker: worker.clone(),
            lane_id,
            cumulative: Coins(nano),
        }
        .sign(&client)
        .expect("sign")
    };
    let c1a = cheque(&w1, 1, 700_000_000);
    let c1b = cheque(&w1, 1, 1_500_000_000);
    let c2 = cheque(&w2, 2, 4_000_000_000); // above the lane: pays 3 TON
    let boc = |c: &silk_chain::tonlib_core::cell::ArcCell| b64(&to_boc(c).expect("boc"));
    json!({
        "generated_by": "chain/tests/fixtures.rs (SILK_BLESS=1 to rewrite)",
        "owner": owner.to_raw(),
        "public_key": hex::encode(client.public_key()),
        "close_delay_s": params.close_delay_s,
        "nonce": params.nonce,
        "code_hash": settlement::settlement_code_hash_hex(),
        "contract": contract.to_raw(),
        "data": boc(&init.data),
        "deposit": boc(&settlement::deposit_body(1).expect("deposit")),
        "open_lanes": boc(&settlement::open_lanes_body(2, &lanes).expect("open")),
        "steps": [
            { "from": w1.to_raw(), "body": boc(&settlement::redeem_body(3, &c1a).expect("redeem")), "expect_exit": 0, "expect_payout": "700000000" },
            { "from": w1.to_raw(), "body": boc(&settlement::redeem_body(4, &c1a).expect("redeem")), "expect_exit": settlement::exit_code::NOTHING_TO_REDEEM, "expect_payout": "0" },
            { "from": w1.to_raw(), "body": boc(&settlement::redeem_body(5, &c1b).expect("redeem")), "expect_exit": 0, "expect_payout": "800000000" },
            { "from": w2.to_raw(), "body": boc(&settlement::redeem_body(6, &c1b).expect("redeem")), "expect_exit": settlement::exit_code::WRONG_WORKER, "expect_payout": "0" },
            { "from": w2.to_raw(), "body": boc(&settlement::redeem_body(7, &c2).expect("redeem")), "expect_exit": 0, "expect_payout": "3000000000" },
            { "from": owner.to_raw(), "body": boc(&settlement::close_lane_body(8, 1).expect("close")), "expect_exit": 0, "expect_payout": "0" },
            { "from": owner.to_raw(), "body": boc(&settlement::reclaim_lane_body(9, 1).expect("reclaim")), "expect_exit": settlement::exit_code::DELAY_NOT_ELAPSED, "expect_payout": "0" },
            { "from": owner.to_raw(), "body": boc(&settlement::withdraw_body(10, Some(ton(1))).expect("withdraw")), "expect_exit": 0, "expect_payout": "1000000000" },
        ],
    })
}

#[test]
fn settlement_fixture_for_the_sandbox_is_current() {
    let path = fixtures_dir().join("rust-settlement.json");
    let fresh = serde_json::to_string_pretty(&settlement_fixture()).expect("json") + "\n";
    if std::env::var_os("SILK_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write fixture");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    // Compare values, not text: serde_json orders object keys differently
    // when another crate in the build enables its `preserve_order` feature.
    let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
    assert!(
        committed == settlement_fixture(),
        "{} is stale: run `SILK_BLESS=1 cargo test -p silk-chain --test fixtures` and commit it",
        path.display()
    );
}
