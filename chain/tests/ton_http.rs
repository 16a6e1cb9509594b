//! The HTTP-API ledger against recorded JSON-RPC responses, served from
//! 127.0.0.1.
//!
//! `tests/data/toncenter.json` holds responses in the toncenter v2 format
//! (the shapes `@ton/ton`'s `HttpApi` parses). They were not captured from a
//! live endpoint: this machine has no route to one. The accounts, get-method
//! stacks and transaction BOCs in them come from a devnet run of the real
//! wallet and settlement code (`SILK_BLESS=1 cargo test -p silk-chain --test
//! ton_http` rewrites the file), and `expect` records what the devnet's own
//! `Ledger` answered, so both ledgers must read the same chain state the same
//! way.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use num_bigint::BigInt;
use serde_json::{json, Value};
use silk_chain::devnet::{Clock, Devnet, DevnetConfig};
use silk_chain::ledger::{self, Ledger, StackValue};
use silk_chain::message::{to_boc, wallet_transfer, OutMessage};
use silk_chain::settlement::{self, LaneTopUp, SettlementParams};
use silk_chain::{Address, Coins, Keys, TonHttp, TonHttpConfig, Wallet, WalletVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join("toncenter.json")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn stack_json(stack: &[StackValue]) -> Value {
    Value::Array(
        stack
            .iter()
            .map(|v| match v {
                StackValue::Int(i) => {
                    let (sign, mag) = if *i < BigInt::from(0) {
                        ("-", -i.clone())
                    } else {
                        ("", i.clone())
                    };
                    json!(["num", format!("{sign}0x{}", mag.to_str_radix(16))])
                }
                StackValue::Null => json!(["null", null]),
                // toncenter returns slices, like cells, as ["cell", {"bytes": ...}].
                StackValue::Cell(c) | StackValue::Slice(c) => {
                    json!(["cell", { "bytes": b64(&to_boc(c).expect("boc")), "object": {} }])
                }
                StackValue::Tuple(_) => panic!("no tuples in this fixture"),
            })
            .collect(),
    )
}

/// Runs a small scenario on a devnet and records it as API responses.
async fn record() -> Value {
    let devnet = Devnet::in_memory(DevnetConfig {
        block_interval: Duration::from_millis(5),
        clock: Clock::Manual {
            start: 1_800_000_000,
        },
    })
    .expect("devnet");
    let client = Keys::from_seed([21; 32]);
    let wallet = Wallet::new(WalletVersion::V4R2, &client).expect("wallet");
    devnet
        .mint(&wallet.address(), Coins::from_ton(50).expect("c"))
        .expect("mint");
    let params = SettlementParams {
        owner: wallet.address(),
        public_key: client.public_key(),
        close_delay_s: 600,
        nonce: 3,
    };
    let contract = params.address().expect("address");
    let worker = Address::new(0, [0x77; 32]);
    let l: &dyn Ledger = &devnet;
    let deploy = OutMessage {
        dest: contract.clone(),
        value: Coins::from_ton(10).expect("c"),
        bounce: false,
        body: Some(
            settlement::open_lanes_body(
                1,
                &[LaneTopUp {
                    lane_id: 5,
                    worker: worker.clone(),
                    amount: Coins::from_ton(4).expect("c"),
                }],
            )
            .expect("body"),
        ),
        state_init: Some(params.state_init().expect("init")),
    };
    let cell = wallet_transfer(&wallet, 0, 1_800_000_600, &[deploy]).expect("transfer");
    let sent = to_boc(&cell).expect("boc");
    l.send_message(&sent).await.expect("send");
    devnet.run_until_idle(5).expect("idle");

    let info = l.account(&contract).await.expect("account");
    let get_state = l
        .run_get_method(&contract, "get_state", &[])
        .await
        .expect("get_state");
    let get_lane = l
        .run_get_method(&contract, "get_lane", &[StackValue::Int(BigInt::from(5))])
        .await
        .expect("get_lane");
    let seqno = l
        .run_get_method(&wallet.address(), "seqno", &[])
        .await
        .expect("seqno");
    let txs = devnet.transaction_bocs(&contract, 10).expect("txs");
    let tx_infos = l.transactions(&contract, 10).await.expect("txs");
    let state = ledger::settlement_state(l, &contract).await.expect("state");
    let lane = ledger::settlement_lane(l, &contract, 5)
        .await
        .expect("lane")
        .expect("lane 5");

    json!({
        "note": "toncenter v2 JSON-RPC response shapes; data from a devnet run, not a live endpoint (see tests/ton_http.rs)",
        "contract": contract.to_raw(),
        "wallet": wallet.address().to_raw(),
        "sent_boc": b64(&sent),
        "responses": {
            "sendBoc": { "ok": true, "result": { "@type": "ok", "@extra": "1:2:3" } },
            "getAddressInformation": { "ok": true, "result": {
                "@type": "raw.fullAccountState",
                "balance": info.balance.nano().to_string(),
                "code": "", "data": "",
                "last_transaction_id": { "@type": "internal.transactionId", "lt": info.last_lt.to_string(), "hash": b64(&info.last_hash) },
                "block_id": { "@type": "ton.blockIdExt", "workchain": -1, "shard": "-9223372036854775808", "seqno": 1, "root_hash": "", "file_hash": "" },
                "frozen_hash": "", "sync_utime": 1_800_000_000u32, "state": "active"
            } },
            "runGetMethod:get_state": { "ok": true, "result": { "@type": "smc.runResult", "gas_used": 2000, "exit_code": get_state.exit_code, "stack": stack_json(&get_state.stack) } },
            "runGetMethod:get_lane": { "ok": true, "result": { "@type": "smc.runResult", "gas_used": 2000, "exit_code": get_lane.exit_code, "stack": stack_json(&get_lane.stack) } },
            "runGetMethod:seqno": { "ok": true, "result": { "@type": "smc.runResult", "gas_used": 500, "exit_code": seqno.exit_code, "stack": stack_json(&seqno.stack) } },
            "getTransactions": { "ok": true, "result": txs.iter().zip(&tx_infos).map(|(bytes, t)| json!({
                "@type": "raw.transaction",
                "utime": t.now,
                "data": b64(bytes),
                "transaction_id": { "@type": "internal.transactionId", "lt": t.lt.to_string(), "hash": b64(&t.hash) },
                "fee": t.total_fees.nano().to_string(), "storage_fee": "0", "other_fee": t.total_fees.nano().to_string(),
                "in_msg": { "source": t.in_from.as_ref().map(|a| a.to_string()).unwrap_or_default(), "destination": contract.to_string(), "value": t.in_value.nano().to_string(), "fwd_fee": "0", "ihr_fee": "0", "created_lt": "0", "body_hash": "", "msg_data": { "@type": "msg.dataRaw", "body": "" } },
                "out_msgs": []
            })).collect::<Vec<_>>() },
        },
        "expect": {
            "balance": info.balance.nano().to_string(),
            "last_lt": info.last_lt,
            "committed": state.committed.nano().to_string(),
            "free_nano": state.free_nano.to_string(),
            "owner": state.owner.to_raw(),
            "lane_worker": lane.worker.to_raw(),
            "lane_deposited": lane.deposited.nano().to_string(),
            "seqno": 1,
            "tx_count": tx_infos.len(),
            "first_tx_lt": tx_infos[0].lt,
            "first_tx_exit": tx_infos[0].exit_code,
            "first_tx_in_value": tx_infos[0].in_value.nano().to_string(),
        }
    })
}

type Requests = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// Serves the recorded responses on 127.0.0.1; returns the endpoint and the
/// requests it saw (API key header, JSON body).
async fn serve(responses: HashMap<String, Value>) -> (String, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Requests = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let responses = responses.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_len, content_len) = loop {
                    let n = sock.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "client closed early");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().expect("len"))
                            })
                            .unwrap_or(0);
                        break (pos + 4, len);
                    }
                };
                while buf.len() < head_len + content_len {
                    let n = sock.read(&mut chunk).await.expect("read");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
                let key = head
                    .lines()
                    .find_map(|l| {
                        l.to_lowercase()
                            .strip_prefix("x-api-key:")
                            .map(|_| l.split_once(':').map(|(_, v)| v.trim().to_string()))
                    })
                    .flatten();
                let body: Value = serde_json::from_slice(&buf[head_len..head_len + content_len])
                    .expect("json body");
                let method = body["method"].as_str().unwrap_or_default().to_string();
                let lookup = if method == "runGetMethod" {
                    format!(
                        "runGetMethod:{}",
                        body["params"]["method"].as_str().unwrap_or_default()
                    )
                } else {
                    method
                };
                seen.lock().expect("lock").push((key, body));
                let payload = responses
                    .get(&lookup)
                    .cloned()
                    .unwrap_or_else(|| json!({ "ok": false, "error": format!("no recording for {lookup}"), "code": 404 }));
                let text = payload.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    text.len(),
                    text
                );
                sock.write_all(resp.as_bytes()).await.expect("write");
            });
        }
    });
    (format!("http://{addr}/api/v2/jsonRPC"), seen)
}

#[tokio::test]
async fn reads_and_sends_through_recorded_toncenter_responses() {
    if std::env::var_os("SILK_BLESS").is_some() {
        let fresh = serde_json::to_string_pretty(&record().await).expect("json") + "\n";
        std::fs::write(fixture_path(), fresh).expect("write fixture");
    }
    let text = std::fs::read_to_string(fixture_path()).expect("read tests/data/toncenter.json");
    let fx: Value = serde_json::from_str(&text).expect("parse fixture");
    let responses: HashMap<String, Value> = fx["responses"]
        .as_object()
        .expect("responses")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (endpoint, seen) = serve(responses).await;
    let mut config = TonHttpConfig::new(endpoint);
    config.api_key = Some("test-key".into());
    let api = TonHttp::new(config).expect("client");
    let l: &dyn Ledger = &api;
    let e = &fx["expect"];
    let contract: Address = fx["contract"]
        .as_str()
        .expect("contract")
        .parse()
        .expect("address");
    let wallet: Address = fx["wallet"]
        .as_str()
        .expect("wallet")
        .parse()
        .expect("address");

    let info = l.account(&contract).await.expect("account");
    assert_eq!(
        info.balance.nano().to_string(),
        e["balance"].as_str().expect("balance")
    );
    assert_eq!(info.last_lt, e["last_lt"].as_u64().expect("lt"));

    let state = ledger::settlement_state(l, &contract).await.expect("state");
    assert_eq!(
        state.committed.nano().to_string(),
        e["committed"].as_str().expect("c")
    );
    assert_eq!(
        state.free_nano.to_string(),
        e["free_nano"].as_str().expect("f")
    );
    assert_eq!(state.owner.to_raw(), e["owner"].as_str().expect("o"));
    let lane = ledger::settlement_lane(l, &contract, 5)
        .await
        .expect("lane")
        .expect("lane 5");
    assert_eq!(lane.worker.to_raw(), e["lane_worker"].as_str().expect("w"));
    assert_eq!(
        lane.deposited.nano().to_string(),
        e["lane_deposited"].as_str().expect("d")
    );
    assert_eq!(
        u64::from(ledger::wallet_seqno(l, &wallet).await.expect("seqno")),
        e["seqno"].as_u64().expect("s")
    );

    let txs = l.transactions(&contract, 10).await.expect("txs");
    assert_eq!(txs.len() as u64, e["tx_count"].as_u64().expect("n"));
    assert_eq!(txs[0].lt, e["first_tx_lt"].as_u64().expect("lt"));
    assert_eq!(txs[0].exit_code.map(i64::from), e["first_tx_exit"].as_i64());
    assert_eq!(
        txs[0].in_value.nano().to_string(),
        e["first_tx_in_value"].as_str().expect("v")
    );

    let sent = base64::engine::general_purpose::STANDARD
        .decode(fx["sent_boc"].as_str().expect("boc"))
        .expect("b64");
    let hash = l.send_message(&sent).await.expect("send");
    let root = silk_chain::message::from_boc(&sent).expect("boc");
    assert_eq!(hash, silk_chain::message::cell_hash(&root));

    // What went over the wire: JSON-RPC with the key header, raw addresses,
    // the lane id as a number argument, the BOC as base64.
    let seen = seen.lock().expect("lock");
    assert!(seen
        .iter()
        .all(|(key, _)| key.as_deref() == Some("test-key")));
    assert!(seen.iter().all(|(_, b)| b["jsonrpc"] == "2.0"));
    let lane_call = seen
        .iter()
        .find(|(_, b)| b["params"]["method"] == "get_lane")
        .expect("get_lane call");
    assert_eq!(lane_call.1["params"]["stack"], json!([["num", "5"]]));
    assert_eq!(lane_call.1["params"]["address"], contract.to_raw());
    let send_call = seen
        .iter()
        .find(|(_, b)| b["method"] == "sendBoc")
        .expect("sendBoc call");
    assert_eq!(send_call.1["params"]["boc"], fx["sent_boc"]);
}

#[tokio::test]
async fn api_errors_are_reported_not_swallowed() {
    let mut responses = HashMap::new();
    responses.insert(
        "getAddressInformation".to_string(),
        json!({ "ok": false, "error": "Incorrect address", "code": 416 }),
    );
    let (endpoint, _) = serve(responses).await;
    let api = TonHttp::new(TonHttpConfig::new(endpoint)).expect("client");
    let err = api
        .account(&Address::new(0, [1; 32]))
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("Incorrect address"), "{err}");
    let err = api
        .run_get_method(&Address::new(0, [1; 32]), "seqno", &[])
        .await
        .expect_err("no recording");
    assert!(err.to_string().contains("no recording"), "{err}");
}

/// A node in another process reaches a shared devnet through `TonHttp`:
/// the full path (sign, send, wait for inclusion, read state) over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ton_http_drives_a_devnet_served_over_http() {
    let devnet = Devnet::in_memory(DevnetConfig {
        block_interval: Duration::from_millis(10),
        clock: Clock::Manual {
            start: 1_800_000_000,
        },
    })
    .expect("devnet");
    let cancel = tokio_util::sync::CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!(
        "http://{}/api/v2/jsonRPC",
        listener.local_addr().expect("addr")
    );
    let server = tokio::spawn(silk_chain::devnet_http::serve(
        devnet.clone(),
        listener,
        cancel.clone(),
    ));

    let client = Keys::from_seed([31; 32]);
    let wallet = Wallet::new(WalletVersion::V5R1, &client).expect("wallet");
    devnet
        .mint(&wallet.address(), Coins::from_ton(30).expect("c"))
        .expect("mint");
    let params = SettlementParams {
        owner: wallet.address(),
        public_key: client.public_key(),
        close_delay_s: 60,
        nonce: 9,
    };
    let contract = params.address().expect("address");
    let worker = Address::new(0, [0x55; 32]);

    let api = TonHttp::new(TonHttpConfig::new(endpoint)).expect("client");
    let l: &dyn Ledger = &api;
    // getConfigParam 19, as toncenter serves it, names the devnet.
    assert_eq!(
        l.global_id().await.expect("global id"),
        silk_chain::devnet::DEVNET_GLOBAL_ID
    );
    let deploy = OutMessage {
        dest: contract.clone(),
        value: Coins::from_ton(10).expect("c"),
        bounce: false,
        body: Some(
            settlement::open_lanes_body(
                1,
                &[LaneTopUp {
                    lane_id: 1,
                    worker: worker.clone(),
                    amount: Coins::from_ton(3).expect("c"),
                }],
            )
            .expect("body"),
        ),
        state_init: Some(params.state_init().expect("init")),
    };
    let now = devnet.now().expect("now");
    let tx = ledger::send_transfer(l, &wallet, &[deploy], now, Duration::from_secs(20))
        .await
        .expect("transfer");
    assert_eq!(tx.exit_code, Some(0));
    assert_eq!(
        ledger::wallet_seqno(l, &wallet.address())
            .await
            .expect("seqno"),
        1
    );
    let state = ledger::settlement_state(l, &contract).await.expect("state");
    assert_eq!(state.committed, Coins::from_ton(3).expect("c"));
    assert_eq!(state.owner, wallet.address());
    let lane = ledger::settlement_lane(l, &contract, 1)
        .await
        .expect("lane")
        .expect("lane 1");
    assert_eq!(lane.worker, worker);
    assert_eq!(
        ledger::settlement_lane(l, &contract, 2)
            .await
            .expect("lane"),
        None
    );
    assert!(devnet.audit().expect("audit").balanced());

    cancel.cancel();
    producer.await.expect("producer");
    server.await.expect("server").expect("serve");
}

/// Idle sockets cannot hold every connection of the devnet server (audit
/// F21): with all of them taken by connections that never send a request,
/// a real request is still answered once those time out. Before the fix it
/// waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_stall_the_devnet_server() {
    let devnet = Devnet::in_memory(DevnetConfig {
        block_interval: Duration::from_millis(10),
        clock: Clock::Manual {
            start: 1_800_000_000,
        },
    })
    .expect("devnet");
    let cancel = tokio_util::sync::CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(silk_chain::devnet_http::serve(
        devnet.clone(),
        listener,
        cancel.clone(),
    ));
    let mut idle = Vec::new();
    for _ in 0..silk_chain::devnet_http::MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let body = serde_json::json!({
        "id": 1, "jsonrpc": "2.0", "method": "getAddressInformation",
        "params": { "address": Address::new(0, [7; 32]).to_string() },
    })
    .to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "POST /api/v2/jsonRPC HTTP/1.1\r\nHost: devnet\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(
        silk_chain::devnet_http::READ_TIMEOUT * 3,
        s.read_to_end(&mut out),
    )
    .await
    .expect("answered once the idle connections timed out")
    .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"ok\":true"), "{text}");
    cancel.cancel();
    server.await.expect("server").expect("serve");
}
