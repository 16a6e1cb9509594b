// JS mirror of the layouts in README.md: init data, message bodies, cheques.
// Used by the sandbox tests; the Rust crate builds the same cells.
import { beginCell, Cell, contractAddress, Dictionary } from '@ton/core';
import { sign } from '@ton/crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const OP = {
  deposit: 0x5e1c0001,
  openLanes: 0x5e1c0002,
  redeem: 0x5e1c0003,
  closeLane: 0x5e1c0004,
  reclaimLane: 0x5e1c0005,
  withdraw: 0x5e1c0006,
  paid: 0x5e1c0103,
  withdrawn: 0x5e1c0106,
};
export const CHEQUE_TAG = 0x5e1cc4e9;
export const MIN_RESERVE = 10_000_000n;
export const ERR = {
  notOwner: 100,
  noLane: 101,
  wrongWorker: 102,
  laneFinished: 103,
  badSignature: 104,
  nothingToRedeem: 105,
  insufficientFree: 106,
  notClosing: 107,
  delayNotElapsed: 108,
  zeroAmount: 109,
  unknownOp: 0xffff,
};

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** The committed compiled code. */
export function settlementCode() {
  return Cell.fromBoc(readFileSync(join(root, 'build', 'settlement.boc')))[0];
}

/** Initial data: owner, public key, close delay, nonce, committed = 0, no lanes. */
export function initData({ owner, publicKey, closeDelay, nonce }) {
  return beginCell()
    .storeAddress(owner)
    .storeBuffer(publicKey, 32)
    .storeUint(closeDelay, 32)
    .storeUint(nonce, 64)
    .storeCoins(0n)
    .storeDict(null)
    .endCell();
}

export function stateInit(params) {
  return { code: settlementCode(), data: initData(params) };
}

export function settlementAddress(params, workchain = 0) {
  return contractAddress(workchain, stateInit(params));
}

const laneTopUpValue = {
  serialize: (src, b) => {
    b.storeAddress(src.worker).storeCoins(src.amount);
  },
  parse: (s) => ({ worker: s.loadAddress(), amount: s.loadCoins() }),
};

export function depositBody(queryId = 0n) {
  return beginCell().storeUint(OP.deposit, 32).storeUint(queryId, 64).endCell();
}

/** lanes: array of { laneId, worker, amount } */
export function openLanesBody(lanes, queryId = 0n) {
  const dict = Dictionary.empty(Dictionary.Keys.Uint(32), laneTopUpValue);
  for (const l of lanes) dict.set(l.laneId, { worker: l.worker, amount: l.amount });
  return beginCell().storeUint(OP.openLanes, 32).storeUint(queryId, 64).storeDict(dict).endCell();
}

export function chequeCell({ contract, worker, laneId, cumulative }) {
  return beginCell()
    .storeUint(CHEQUE_TAG, 32)
    .storeAddress(contract)
    .storeAddress(worker)
    .storeUint(laneId, 32)
    .storeCoins(cumulative)
    .endCell();
}

export function signCheque(cheque, secretKey) {
  return sign(chequeCell(cheque).hash(), secretKey);
}

export function redeemBody({ laneId, cumulative, signature }, queryId = 0n) {
  return beginCell()
    .storeUint(OP.redeem, 32)
    .storeUint(queryId, 64)
    .storeUint(laneId, 32)
    .storeCoins(cumulative)
    .storeBuffer(signature, 64)
    .endCell();
}

export function closeLaneBody(laneId, queryId = 0n) {
  return beginCell().storeUint(OP.closeLane, 32).storeUint(queryId, 64).storeUint(laneId, 32).endCell();
}

export function reclaimLaneBody(laneId, queryId = 0n) {
  return beginCell().storeUint(OP.reclaimLane, 32).storeUint(queryId, 64).storeUint(laneId, 32).endCell();
}

export function withdrawBody(amount, queryId = 0n) {
  return beginCell().storeUint(OP.withdraw, 32).storeUint(queryId, 64).storeCoins(amount).endCell();
}

/** Reads get_state's stack. */
export async function getState(contract) {
  const r = await contract.runGetMethod('get_state');
  const s = r.stackReader;
  return {
    owner: s.readAddress(),
    publicKey: s.readBigNumber(),
    closeDelay: s.readNumber(),
    nonce: s.readBigNumber(),
    balance: s.readBigNumber(),
    committed: s.readBigNumber(),
    free: s.readBigNumber(),
  };
}

/** Reads get_lane's stack. */
export async function getLane(contract, laneId) {
  const r = await contract.runGetMethod('get_lane', [{ type: 'int', value: BigInt(laneId) }]);
  const s = r.stackReader;
  return {
    found: s.readBoolean(),
    worker: s.readAddressOpt(),
    deposited: s.readBigNumber(),
    redeemed: s.readBigNumber(),
    closingAt: s.readNumber(),
    finished: s.readBoolean(),
  };
}
