//! A real TON network through the widely used HTTP API (toncenter v2 and
//! compatible providers), over its JSON-RPC endpoint: `sendBoc`,
//! `runGetMethod`, `getAddressInformation`, `getTransactions`.
//!
//! Point a node at the TON testnet with the endpoint
//! `https://testnet.toncenter.com/api/v2/jsonRPC`, at mainnet with
//! `https://toncenter.com/api/v2/jsonRPC`, plus an API key from the
//! provider (without one, requests are rate-limited to about one per second).

use std::time::Duration;

use base64::Engine as _;
use num_bigint::BigInt;
use serde_json::{json, Value};

use crate::address::Address;
use crate::coins::Coins;
use crate::devnet::tx_info_from_boc;
use crate::error::{Error, Result};
use crate::ledger::{AccountInfo, AccountStatus, GetMethodOutput, Ledger, StackValue, TxInfo};
use crate::message::{from_boc, to_boc};

/// Where the API is and how to authenticate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TonHttpConfig {
    /// The JSON-RPC endpoint, e.g. `https://testnet.toncenter.com/api/v2/jsonRPC`.
    pub endpoint: String,
    /// Sent as `X-API-Key` when set.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl TonHttpConfig {
    /// An endpoint with no API key and a 20 s timeout.
    pub fn new(endpoint: impl Into<String>) -> Self {
        TonHttpConfig {
            endpoint: endpoint.into(),
            api_key: None,
            timeout: Duration::from_secs(20),
        }
    }
}

/// A [`Ledger`] backed by a TON HTTP API.
#[derive(Clone, Debug)]
pub struct TonHttp {
    config: TonHttpConfig,
    client: reqwest::Client,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn api_err(method: &str, e: impl std::fmt::Display) -> Error {
    Error::Ledger(format!("TON HTTP API {method}: {e}"))
}

impl TonHttp {
    /// A client for `config`.
    pub fn new(config: TonHttpConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Ledger(format!("cannot build HTTP client: {e}")))?;
        Ok(TonHttp { config, client })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let body = json!({ "id": "1", "jsonrpc": "2.0", "method": method, "params": params });
        let mut req = self.client.post(&self.config.endpoint).json(&body);
        if let Some(key) = &self.config.api_key {
            req = req.header("X-API-Key", key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| api_err(method, format!("{e}; check the endpoint in the config")))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .map_err(|e| api_err(method, format!("HTTP {status}, body is not JSON: {e}")))?;
        if v["ok"].as_bool() != Some(true) {
            let why = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            let hint = if status.as_u16() == 429 {
                " (rate limited: set an API key)"
            } else {
                ""
            };
            return Err(api_err(method, format!("HTTP {status}: {why}{hint}")));
        }
        Ok(v["result"].clone())
    }
}

fn parse_int(s: &str) -> Option<BigInt> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => BigInt::parse_bytes(hex.as_bytes(), 16)?,
        None => BigInt::parse_bytes(digits.as_bytes(), 10)?,
    };
    Some(if neg { -v } else { v })
}

fn parse_stack_entry(e: &Value) -> Result<StackValue> {
    let bad = || api_err("runGetMethod", format!("unexpected stack entry {e}"));
    let kind = e.get(0).and_then(Value::as_str).ok_or_else(bad)?;
    let val = e.get(1).ok_or_else(bad)?;
    let boc = |v: &Value| -> Result<_> {
        let s = v
            .get("bytes")
            .and_then(Value::as_str)
            .or_else(|| v.as_str())
            .ok_or_else(bad)?;
        from_boc(&b64().decode(s).map_err(|_| bad())?)
    };
    Ok(match kind {
        "num" => StackValue::Int(val.as_str().and_then(parse_int).ok_or_else(bad)?),
        "null" => StackValue::Null,
        "cell" => StackValue::Cell(boc(val)?),
        "slice" => StackValue::Slice(boc(val)?),
        "tuple" | "list" => {
            let items = val
                .get("elements")
                .and_then(Value::as_array)
                .ok_or_else(bad)?;
            StackValue::Tuple(
                items
                    .iter()
                    .map(parse_tuple_element)
                    .collect::<Result<_>>()?,
            )
        }
        _ => return Err(bad()),
    })
}

/// Tuple elements come in tonlib's typed form (`tvm.stackEntryNumber` ...).
fn parse_tuple_element(e: &Value) -> Result<StackValue> {
    let bad = || api_err("runGetMethod", format!("unexpected tuple element {e}"));
    match e.get("@type").and_then(Value::as_str).ok_or_else(bad)? {
        "tvm.stackEntryNumber" => {
            let n = e["number"]["number"]
                .as_str()
                .and_then(parse_int)
                .ok_or_else(bad)?;
            Ok(StackValue::Int(n))
        }
        "tvm.stackEntryCell" => {
            let s = e["cell"]["bytes"].as_str().ok_or_else(bad)?;
            Ok(StackValue::Cell(from_boc(
                &b64().decode(s).map_err(|_| bad())?,
            )?))
        }
        "tvm.stackEntrySlice" => {
            let s = e["slice"]["bytes"].as_str().ok_or_else(bad)?;
            Ok(StackValue::Slice(from_boc(
                &b64().decode(s).map_err(|_| bad())?,
            )?))
        }
        "tvm.stackEntryTuple" | "tvm.stackEntryList" => {
            let key = if e.get("tuple").is_some() {
                "tuple"
            } else {
                "list"
            };
            let items = e[key]["elements"].as_array().ok_or_else(bad)?;
            Ok(StackValue::Tuple(
                items
                    .iter()
                    .map(parse_tuple_element)
                    .collect::<Result<_>>()?,
            ))
        }
        _ => Err(bad()),
    }
}

fn serialize_stack_entry(v: &StackValue) -> Result<Value> {
    Ok(match v {
        StackValue::Int(i) => json!(["num", i.to_string()]),
        StackValue::Cell(c) => json!(["tvm.Cell", b64().encode(to_boc(c)?)]),
        StackValue::Slice(c) => json!(["tvm.Slice", b64().encode(to_boc(c)?)]),
        StackValue::Null | StackValue::Tuple(_) => {
            return Err(api_err(
                "runGetMethod",
                "only integers, cells and slices can be passed as arguments",
            ))
        }
    })
}

#[async_trait::async_trait]
impl Ledger for TonHttp {
    async fn global_id(&self) -> Result<i32> {
        const M: &str = "getConfigParam";
        let r = self.call(M, json!({ "config_id": 19 })).await?;
        let bytes = r["config"]["bytes"]
            .as_str()
            .ok_or_else(|| api_err(M, format!("no config.bytes in {r}")))?;
        let cell = from_boc(&b64().decode(bytes).map_err(|e| api_err(M, e))?)?;
        crate::ledger::global_id_from_param(&cell)
    }

    async fn send_message(&self, boc: &[u8]) -> Result<[u8; 32]> {
        let cell = from_boc(boc)?;
        self.call("sendBoc", json!({ "boc": b64().encode(boc) }))
            .await?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(cell.cell_hash().as_slice());
        Ok(hash)
    }

    async fn run_get_method(
        &self,
        address: &Address,
        method: &str,
        stack: &[StackValue],
    ) -> Result<GetMethodOutput> {
        let args = stack
            .iter()
            .map(serialize_stack_entry)
            .collect::<Result<Vec<_>>>()?;
        let r = self
            .call(
                "runGetMethod",
                json!({ "address": address.to_raw(), "method": method, "stack": args }),
            )
            .await?;
        let exit_code = r["exit_code"]
            .as_i64()
            .and_then(|c| i32::try_from(c).ok())
            .ok_or_else(|| api_err("runGetMethod", "no exit_code"))?;
        let entries = r["stack"]
            .as_array()
            .ok_or_else(|| api_err("runGetMethod", "no stack"))?;
        Ok(GetMethodOutput {
            exit_code,
            stack: entries
                .iter()
                .map(parse_stack_entry)
                .collect::<Result<_>>()?,
        })
    }

    async fn account(&self, address: &Address) -> Result<AccountInfo> {
        const M: &str = "getAddressInformation";
        let r = self.call(M, json!({ "address": address.to_raw() })).await?;
        let balance = match &r["balance"] {
            Value::String(s) => s
                .parse::<u128>()
                .map_err(|_| api_err(M, format!("balance {s}")))?,
            Value::Number(n) => n
                .as_u64()
                .map(u128::from)
                .ok_or_else(|| api_err(M, format!("balance {n}")))?,
            other => return Err(api_err(M, format!("balance {other}"))),
        };
        let last_lt = r["last_transaction_id"]["lt"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut last_hash = [0u8; 32];
        if let Some(h) = r["last_transaction_id"]["hash"].as_str() {
            let bytes = b64()
                .decode(h)
                .map_err(|_| api_err(M, "last transaction hash is not base64"))?;
            if bytes.len() == 32 {
                last_hash.copy_from_slice(&bytes);
            }
        }
        let status = match r["state"].as_str() {
            Some("active") => AccountStatus::Active,
            Some("frozen") => AccountStatus::Frozen,
            Some("uninitialized") if balance == 0 && last_lt == 0 => AccountStatus::NonExist,
            Some("uninitialized") => AccountStatus::Uninit,
            other => return Err(api_err(M, format!("unknown state {other:?}"))),
        };
        Ok(AccountInfo {
            balance: Coins(balance),
            status,
            last_lt,
            last_hash,
        })
    }

    async fn transactions(&self, address: &Address, limit: usize) -> Result<Vec<TxInfo>> {
        const M: &str = "getTransactions";
        let r = self
            .call(
                M,
                json!({ "address": address.to_raw(), "limit": limit, "archival": true }),
            )
            .await?;
        let txs = r
            .as_array()
            .ok_or_else(|| api_err(M, "result is not a list"))?;
        txs.iter()
            .take(limit)
            .map(|t| {
                let data = t["data"]
                    .as_str()
                    .ok_or_else(|| api_err(M, "transaction without data"))?;
                let bytes = b64()
                    .decode(data)
                    .map_err(|_| api_err(M, "transaction data is not base64"))?;
                tx_info_from_boc(&bytes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_hex_numbers() {
        assert_eq!(parse_int("0x1f"), Some(BigInt::from(31)));
        assert_eq!(parse_int("-0x10"), Some(BigInt::from(-16)));
        assert_eq!(parse_int("12345"), Some(BigInt::from(12345)));
        assert_eq!(parse_int("-7"), Some(BigInt::from(-7)));
        assert_eq!(parse_int("zz"), None);
    }
}
