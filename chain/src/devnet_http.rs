//! Serves a [`Devnet`] over the same JSON-RPC API [`crate::TonHttp`] speaks
//! (`sendBoc`, `runGetMethod`, `getAddressInformation`, `getTransactions`,
//! toncenter v2 shapes), so nodes in other processes can share one devnet by
//! pointing their TON HTTP ledger at `http://127.0.0.1:PORT/api/v2/jsonRPC`.
//!
//! A deliberately small HTTP/1.1 server: one request per connection, bodies
//! up to [`MAX_BODY`], at most [`MAX_CONNECTIONS`] at once, each request
//! read within [`READ_TIMEOUT`] (so idle sockets cannot hold every
//! connection and stall every node's payments, audit F21).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use num_bigint::BigInt;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::address::Address;
use crate::devnet::Devnet;
use crate::error::{Error, Result};
use crate::ledger::{AccountStatus, Ledger, StackValue};
use crate::message::{from_boc, to_boc};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a connection has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most transactions one `getTransactions` returns.
const MAX_TXS: usize = 100;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Accepts connections on `listener` until `cancel`, answering JSON-RPC calls from `devnet`.
pub async fn serve(devnet: Devnet, listener: TcpListener, cancel: CancellationToken) -> Result<()> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            p = permits.clone().acquire_owned() => p.map_err(|e| Error::Ledger(e.to_string()))?,
        };
        let (sock, peer) = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, or a connection reset in the
                    // backlog: the server goes on.
                    tracing::warn!(error = %e, "devnet server could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let devnet = devnet.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(devnet, sock).await {
                tracing::debug!(%peer, error = %e, "devnet HTTP request failed");
            }
            drop(permit);
        });
    }
}

/// Answers one request as [`serve`] does a connection's: `request` is what
/// the client wrote (HTTP head and body), the result is what the server
/// writes back. In process, for the fuzz targets (`fuzz/`) and tests.
pub async fn answer(devnet: &Devnet, request: &[u8]) -> Result<Vec<u8>> {
    let mut response = Vec::new();
    handle(devnet.clone(), tokio::io::join(request, &mut response)).await?;
    Ok(response)
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(devnet: Devnet, mut sock: S) -> Result<()> {
    let request = tokio::time::timeout(READ_TIMEOUT, read_request(&mut sock))
        .await
        .map_err(|_| Error::Ledger(format!("no whole request within {READ_TIMEOUT:?}")))??;
    let body = match request {
        Request::Body(body) => body,
        Request::TooLarge => {
            return respond(
                &mut sock,
                413,
                &json!({ "ok": false, "error": "request body too large", "code": 413 }),
            )
            .await
        }
    };
    let reply = match serde_json::from_slice::<Value>(&body) {
        Ok(req) => match dispatch(&devnet, &req).await {
            Ok(result) => {
                json!({ "ok": true, "result": result, "id": req["id"], "jsonrpc": "2.0" })
            }
            Err(e) => {
                json!({ "ok": false, "error": e.to_string(), "code": 500, "id": req["id"], "jsonrpc": "2.0" })
            }
        },
        Err(e) => json!({ "ok": false, "error": format!("body is not JSON: {e}"), "code": 400 }),
    };
    respond(&mut sock, 200, &reply).await
}

/// A request as read off a connection.
enum Request {
    /// Its body.
    Body(Vec<u8>),
    /// It announced a body over [`MAX_BODY`].
    TooLarge,
}

async fn read_request<R: AsyncRead + Unpin>(sock: &mut R) -> Result<Request> {
    let io = |e: std::io::Error| Error::Ledger(format!("devnet server: {e}"));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_len, content_len) = loop {
        let n = sock.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(Error::Ledger(
                "connection closed before a full request".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (pos + 4, len);
        }
        if buf.len() > 16 * 1024 {
            return Err(Error::Ledger("request head too large".into()));
        }
    };
    if content_len > MAX_BODY {
        return Ok(Request::TooLarge);
    }
    while buf.len() < head_len + content_len {
        let n = sock.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(Error::Ledger("connection closed mid-body".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Request::Body(
        buf[head_len..head_len + content_len].to_vec(),
    ))
}

async fn respond<W: AsyncWrite + Unpin>(sock: &mut W, status: u16, body: &Value) -> Result<()> {
    let text = body.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    sock.write_all(resp.as_bytes())
        .await
        .map_err(|e| Error::Ledger(format!("devnet server write: {e}")))
}

fn param_address(req: &Value) -> Result<Address> {
    req["params"]["address"]
        .as_str()
        .ok_or_else(|| Error::Ledger("missing params.address".into()))?
        .parse()
}

fn stack_to_json(stack: &[StackValue]) -> Result<Value> {
    stack
        .iter()
        .map(|v| {
            Ok(match v {
                StackValue::Int(i) => {
                    let (sign, mag) = if *i < BigInt::from(0) {
                        ("-", -i.clone())
                    } else {
                        ("", i.clone())
                    };
                    json!(["num", format!("{sign}0x{}", mag.to_str_radix(16))])
                }
                StackValue::Null => json!(["null", null]),
                StackValue::Cell(c) => json!(["cell", { "bytes": b64().encode(to_boc(c)?) }]),
                StackValue::Slice(c) => json!(["slice", { "bytes": b64().encode(to_boc(c)?) }]),
                StackValue::Tuple(items) => {
                    let elements = items
                        .iter()
                        .map(tuple_element)
                        .collect::<Result<Vec<_>>>()?;
                    json!(["tuple", { "elements": elements }])
                }
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

fn tuple_element(v: &StackValue) -> Result<Value> {
    Ok(match v {
        StackValue::Int(i) => {
            json!({ "@type": "tvm.stackEntryNumber", "number": { "number": i.to_string() } })
        }
        StackValue::Null => json!({ "@type": "tvm.stackEntryTuple", "tuple": { "elements": [] } }),
        StackValue::Cell(c) => {
            json!({ "@type": "tvm.stackEntryCell", "cell": { "bytes": b64().encode(to_boc(c)?) } })
        }
        StackValue::Slice(c) => {
            json!({ "@type": "tvm.stackEntrySlice", "slice": { "bytes": b64().encode(to_boc(c)?) } })
        }
        StackValue::Tuple(items) => json!({
            "@type": "tvm.stackEntryTuple",
            "tuple": { "elements": items.iter().map(tuple_element).collect::<Result<Vec<_>>>()? }
        }),
    })
}

fn stack_from_json(v: &Value) -> Result<Vec<StackValue>> {
    let bad = || Error::Ledger(format!("unsupported stack argument {v}"));
    let Some(items) = v.as_array() else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .map(|e| {
            let kind = e.get(0).and_then(Value::as_str).ok_or_else(bad)?;
            let val = e.get(1).and_then(Value::as_str).ok_or_else(bad)?;
            Ok(match kind {
                "num" => {
                    let v = match val.strip_prefix("0x") {
                        Some(h) => BigInt::parse_bytes(h.as_bytes(), 16),
                        None => BigInt::parse_bytes(val.as_bytes(), 10),
                    };
                    StackValue::Int(v.ok_or_else(bad)?)
                }
                "tvm.Cell" => StackValue::Cell(from_boc(&b64().decode(val).map_err(|_| bad())?)?),
                "tvm.Slice" => StackValue::Slice(from_boc(&b64().decode(val).map_err(|_| bad())?)?),
                _ => return Err(bad()),
            })
        })
        .collect()
}

async fn dispatch(devnet: &Devnet, req: &Value) -> Result<Value> {
    let method = req["method"].as_str().unwrap_or_default();
    match method {
        "sendBoc" => {
            let boc = req["params"]["boc"]
                .as_str()
                .ok_or_else(|| Error::Ledger("missing params.boc".into()))?;
            let bytes = b64()
                .decode(boc)
                .map_err(|_| Error::Ledger("params.boc is not base64".into()))?;
            devnet.send_message(&bytes).await?;
            Ok(json!({ "@type": "ok" }))
        }
        "runGetMethod" => {
            let address = param_address(req)?;
            let name = req["params"]["method"]
                .as_str()
                .ok_or_else(|| Error::Ledger("params.method must be a name".into()))?;
            let args = stack_from_json(&req["params"]["stack"])?;
            let out = devnet.run_get_method(&address, name, &args).await?;
            Ok(
                json!({ "@type": "smc.runResult", "gas_used": 0, "exit_code": out.exit_code, "stack": stack_to_json(&out.stack)? }),
            )
        }
        "getConfigParam" => {
            let id = req["params"]["config_id"]
                .as_u64()
                .ok_or_else(|| Error::Ledger("params.config_id must be a number".into()))?;
            if id != 19 {
                return Err(Error::Ledger(format!(
                    "the devnet serves configuration parameter 19 only, not {id}"
                )));
            }
            let cell = crate::ledger::global_id_param(devnet.global_id().await?)?;
            Ok(json!({
                "@type": "configInfo",
                "config": { "@type": "tvm.cell", "bytes": b64().encode(to_boc(&cell)?) },
            }))
        }
        "getAddressInformation" => {
            let address = param_address(req)?;
            let info = devnet.account(&address).await?;
            let state = match info.status {
                AccountStatus::Active => "active",
                AccountStatus::Frozen => "frozen",
                AccountStatus::Uninit | AccountStatus::NonExist => "uninitialized",
            };
            Ok(json!({
                "@type": "raw.fullAccountState",
                "balance": info.balance.nano().to_string(),
                "code": "", "data": "",
                "last_transaction_id": { "@type": "internal.transactionId", "lt": info.last_lt.to_string(), "hash": b64().encode(info.last_hash) },
                "state": state,
                "sync_utime": devnet.now()?,
            }))
        }
        "getTransactions" => {
            let address = param_address(req)?;
            let limit = req["params"]["limit"]
                .as_u64()
                .map_or(10, |l| l as usize)
                .min(MAX_TXS);
            let bocs = devnet.transaction_bocs(&address, limit)?;
            let infos = devnet.transactions(&address, limit).await?;
            let txs: Vec<Value> = bocs
                .iter()
                .zip(&infos)
                .map(|(bytes, t)| {
                    json!({
                        "@type": "raw.transaction",
                        "utime": t.now,
                        "data": b64().encode(bytes),
                        "transaction_id": { "@type": "internal.transactionId", "lt": t.lt.to_string(), "hash": b64().encode(t.hash) },
                        "fee": t.total_fees.nano().to_string(),
                    })
                })
                .collect();
            Ok(Value::Array(txs))
        }
        other => Err(Error::Ledger(format!(
            "method {other:?} is not served by the devnet"
        ))),
    }
}
