// Sandbox tests of the settlement contract: every path and the attacks we
// could think of. Run with `npm test` (after `npm ci`).
import { describe, it, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { Blockchain } from '@ton/sandbox';
import { beginCell, toNano } from '@ton/core';
import { keyPairFromSeed } from '@ton/crypto';
import {
  ERR, MIN_RESERVE, OP, stateInit, settlementAddress, depositBody, openLanesBody, signCheque,
  redeemBody, closeLaneBody, reclaimLaneBody, withdrawBody, getState, getLane,
} from '../lib/settlement.mjs';

const NOW = 1_800_000_000;
const DELAY = 3600;
const clientKey = keyPairFromSeed(Buffer.alloc(32, 7));
const otherKey = keyPairFromSeed(Buffer.alloc(32, 8));

/** The transaction that processed a message sent to `to`. */
function txTo(result, to) {
  const tx = result.transactions.find((t) => t.inMessage?.info.dest?.equals?.(to));
  assert.ok(tx, `no transaction at ${to}`);
  return tx;
}
function computeOf(tx) {
  const c = tx.description.computePhase;
  return c.type === 'vm' ? c : { success: false, exitCode: null, skipped: true };
}
function assertOk(result, to) {
  const tx = txTo(result, to);
  const c = computeOf(tx);
  assert.equal(c.exitCode, 0, `expected success, exit code ${c.exitCode}`);
  assert.equal(tx.description.aborted, false);
  return tx;
}
function assertFails(result, to, exitCode) {
  const tx = txTo(result, to);
  const c = computeOf(tx);
  assert.equal(c.exitCode, exitCode, `expected exit code ${exitCode}, got ${c.exitCode}`);
  assert.equal(tx.description.aborted, true);
  return tx;
}
/** Money that arrived at `to` in a message from `from` in this result. */
function received(result, from, to) {
  let total = 0n;
  for (const t of result.transactions) {
    const m = t.inMessage;
    if (m?.info.type === 'internal' && m.info.src.equals(from) && m.info.dest.equals(to)) total += m.info.value.coins;
  }
  return total;
}

describe('settlement contract', () => {
  let chain, owner, w1, w2, w3, stranger, params, addr, contract;

  async function deploy(extra = {}) {
    const p = { owner: owner.address, publicKey: clientKey.publicKey, closeDelay: DELAY, nonce: 1n, ...extra };
    const a = settlementAddress(p);
    const r = await owner.send({ to: a, value: toNano('10'), init: stateInit(p), body: depositBody() });
    assertOk(r, a);
    return { p, a };
  }
  async function balanceOf(a) {
    return (await chain.getContract(a)).balance;
  }
  function cheque(worker, laneId, cumulative, { key = clientKey, contract = addr } = {}) {
    return { laneId, cumulative, signature: signCheque({ contract, worker, laneId, cumulative }, key.secretKey) };
  }
  async function open(lanes) {
    const r = await owner.send({ to: addr, value: toNano('0.05'), body: openLanesBody(lanes) });
    return r;
  }
  async function redeem(worker, ch, value = toNano('0.05')) {
    return worker.send({ to: addr, value, body: redeemBody(ch) });
  }

  beforeEach(async () => {
    chain = await Blockchain.create();
    chain.now = NOW;
    owner = await chain.treasury('owner');
    w1 = await chain.treasury('worker1');
    w2 = await chain.treasury('worker2');
    w3 = await chain.treasury('worker3');
    stranger = await chain.treasury('stranger');
    const d = await deploy();
    params = d.p;
    addr = d.a;
    contract = { runGetMethod: (m, s) => chain.runGetMethod(addr, m, s) };
  });

  it('deploys with the deposit as free balance and reports its parameters', async () => {
    const st = await getState(contract);
    assert.ok(st.owner.equals(owner.address));
    assert.equal(st.publicKey, BigInt('0x' + Buffer.from(clientKey.publicKey).toString('hex')));
    assert.equal(st.closeDelay, DELAY);
    assert.equal(st.nonce, 1n);
    assert.equal(st.committed, 0n);
    assert.equal(st.balance, await balanceOf(addr));
    assert.equal(st.free, st.balance - MIN_RESERVE);
    assert.ok(st.balance > toNano('9.9') && st.balance <= toNano('10'));
  });

  it('treats an explicit deposit, an empty body and a text comment as deposits from anyone', async () => {
    const before = (await getState(contract)).balance;
    assertOk(await stranger.send({ to: addr, value: toNano('1'), body: depositBody(5n) }), addr);
    assertOk(await stranger.send({ to: addr, value: toNano('1') }), addr);
    const comment = beginCell().storeUint(0, 32).storeStringTail('top up').endCell();
    assertOk(await stranger.send({ to: addr, value: toNano('1'), body: comment }), addr);
    const after = (await getState(contract)).balance;
    assert.ok(after - before > toNano('2.99') && after - before <= toNano('3'));
  });

  it('opens lanes to several workers in one message and tops one up', async () => {
    const r = await open([
      { laneId: 1, worker: w1.address, amount: toNano('1') },
      { laneId: 2, worker: w2.address, amount: toNano('2') },
      { laneId: 3, worker: w3.address, amount: toNano('3') },
    ]);
    assertOk(r, addr);
    let st = await getState(contract);
    assert.equal(st.committed, toNano('6'));
    const l2 = await getLane(contract, 2);
    assert.deepEqual(
      { ...l2, worker: l2.worker.toString() },
      { found: true, worker: w2.address.toString(), deposited: toNano('2'), redeemed: 0n, closingAt: 0, finished: false },
    );
    assert.equal((await getLane(contract, 9)).found, false);
    assertOk(await open([{ laneId: 2, worker: w2.address, amount: toNano('0.5') }]), addr);
    assert.equal((await getLane(contract, 2)).deposited, toNano('2.5'));
    st = await getState(contract);
    assert.equal(st.committed, toNano('6.5'));
    assert.equal(st.free, st.balance - st.committed - MIN_RESERVE);
  });

  it('deposits and opens in one message: the attached value counts as free', async () => {
    const before = await getState(contract);
    const r = await owner.send({
      to: addr,
      value: toNano('5'),
      body: openLanesBody([{ laneId: 1, worker: w1.address, amount: before.free + toNano('4') }]),
    });
    assertOk(r, addr);
    assert.equal((await getState(contract)).committed, before.free + toNano('4'));
  });

  it('refuses lanes beyond the free balance, zero amounts, and lanes from anyone but the owner', async () => {
    const st = await getState(contract);
    const r = await open([
      { laneId: 1, worker: w1.address, amount: st.free },
      { laneId: 2, worker: w2.address, amount: toNano('0.1') },
    ]);
    assertFails(r, addr, ERR.insufficientFree);
    assertFails(await open([{ laneId: 1, worker: w1.address, amount: 0n }]), addr, ERR.zeroAmount);
    const r2 = await stranger.send({
      to: addr, value: toNano('0.05'), body: openLanesBody([{ laneId: 1, worker: stranger.address, amount: 1n }]),
    });
    assertFails(r2, addr, ERR.notOwner);
    assert.equal((await getLane(contract, 1)).found, false);
    assert.equal((await getState(contract)).committed, 0n);
  });

  it('refuses to rebind a lane id to another worker', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assertFails(await open([{ laneId: 1, worker: w2.address, amount: toNano('1') }]), addr, ERR.wrongWorker);
    assert.ok((await getLane(contract, 1)).worker.equals(w1.address));
  });

  it('pays the difference between cumulative cheques, gas paid by the worker', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    const b0 = await balanceOf(addr);
    const r = await redeem(w1, cheque(w1.address, 1, toNano('0.3')));
    assertOk(r, addr);
    assert.equal(await balanceOf(addr), b0 - toNano('0.3'));
    const got = received(r, addr, w1.address);
    assert.ok(got > toNano('0.3') && got < toNano('0.35'), `worker got ${got}`);
    const paid = r.transactions.find((t) => t.inMessage?.info.src?.equals?.(addr)).inMessage.body.beginParse();
    assert.equal(paid.loadUint(32), OP.paid);

    const r2 = await redeem(w1, cheque(w1.address, 1, toNano('0.7')));
    assertOk(r2, addr);
    assert.equal(await balanceOf(addr), b0 - toNano('0.7'));
    const lane = await getLane(contract, 1);
    assert.equal(lane.redeemed, toNano('0.7'));
    assert.equal((await getState(contract)).committed, toNano('0.3'));
    assert.equal((await contract.runGetMethod('get_redeemed', [{ type: 'int', value: 1n }])).stackReader.readBigNumber(), toNano('0.7'));
  });

  it('rejects a replayed or lower cheque', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    const high = cheque(w1.address, 1, toNano('0.5'));
    assertOk(await redeem(w1, high), addr);
    const b = await balanceOf(addr);
    assertFails(await redeem(w1, high), addr, ERR.nothingToRedeem);
    assertFails(await redeem(w1, cheque(w1.address, 1, toNano('0.2'))), addr, ERR.nothingToRedeem);
    assert.ok((await balanceOf(addr)) >= b);
    assert.equal((await getLane(contract, 1)).redeemed, toNano('0.5'));
  });

  it('never pays more than the lane holds, and pays the rest after a top-up', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    const b0 = await balanceOf(addr);
    const big = cheque(w1.address, 1, toNano('3'));
    assertOk(await redeem(w1, big), addr);
    assert.equal(await balanceOf(addr), b0 - toNano('1'));
    assert.equal((await getLane(contract, 1)).redeemed, toNano('1'));
    assertFails(await redeem(w1, big), addr, ERR.nothingToRedeem);
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assertOk(await redeem(w1, big), addr);
    assert.equal((await getLane(contract, 1)).redeemed, toNano('2'));
    assert.equal((await getState(contract)).committed, 0n);
  });

  it('rejects a forged or tampered signature', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assertFails(await redeem(w1, cheque(w1.address, 1, toNano('0.5'), { key: otherKey })), addr, ERR.badSignature);
    const c = cheque(w1.address, 1, toNano('0.1'));
    assertFails(await redeem(w1, { ...c, cumulative: toNano('0.9') }), addr, ERR.badSignature);
    assertFails(await redeem(w1, { ...c, signature: Buffer.alloc(64) }), addr, ERR.badSignature);
    assert.equal((await getLane(contract, 1)).redeemed, 0n);
  });

  it('rejects a cheque signed for another contract of the same client', async () => {
    const other = await deploy({ nonce: 2n });
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    const forOther = cheque(w1.address, 1, toNano('0.5'), { contract: other.a });
    assertFails(await redeem(w1, forOther), addr, ERR.badSignature);
  });

  it('rejects a cheque for another worker or another lane', async () => {
    assertOk(await open([
      { laneId: 1, worker: w1.address, amount: toNano('1') },
      { laneId: 2, worker: w2.address, amount: toNano('1') },
    ]), addr);
    const forW1 = cheque(w1.address, 1, toNano('0.5'));
    assertFails(await redeem(w2, forW1), addr, ERR.wrongWorker);
    assertFails(await redeem(w2, { ...forW1, laneId: 2 }), addr, ERR.badSignature);
    assertFails(await redeem(w1, { ...forW1, laneId: 2 }), addr, ERR.wrongWorker);
    assertFails(await redeem(w1, { ...forW1, laneId: 7 }), addr, ERR.noLane);
    assert.equal((await getState(contract)).committed, toNano('2'));
  });

  it('closes a lane only after the delay; the worker can redeem meanwhile but not after', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: reclaimLaneBody(1) }), addr, ERR.notClosing);
    assertFails(await stranger.send({ to: addr, value: toNano('0.05'), body: closeLaneBody(1) }), addr, ERR.notOwner);
    assertOk(await owner.send({ to: addr, value: toNano('0.05'), body: closeLaneBody(1) }), addr);
    assert.equal((await getLane(contract, 1)).closingAt, NOW + DELAY);
    // Closing again does not push the deadline.
    chain.now = NOW + 10;
    assertOk(await owner.send({ to: addr, value: toNano('0.05'), body: closeLaneBody(1) }), addr);
    assert.equal((await getLane(contract, 1)).closingAt, NOW + DELAY);

    chain.now = NOW + DELAY - 1;
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: reclaimLaneBody(1) }), addr, ERR.delayNotElapsed);
    const late = cheque(w1.address, 1, toNano('0.4'));
    assertOk(await redeem(w1, late), addr);

    chain.now = NOW + DELAY;
    const freeBefore = (await getState(contract)).committed;
    assert.equal(freeBefore, toNano('0.6'));
    assertOk(await owner.send({ to: addr, value: toNano('0.05'), body: reclaimLaneBody(1) }), addr);
    const st = await getState(contract);
    assert.equal(st.committed, 0n);
    assert.equal((await getLane(contract, 1)).finished, true);

    assertFails(await redeem(w1, cheque(w1.address, 1, toNano('0.9'))), addr, ERR.laneFinished);
    assertFails(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr, ERR.laneFinished);
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: closeLaneBody(1) }), addr, ERR.laneFinished);
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: reclaimLaneBody(1) }), addr, ERR.laneFinished);
  });

  it('a top-up cancels a pending close', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assertOk(await owner.send({ to: addr, value: toNano('0.05'), body: closeLaneBody(1) }), addr);
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    assert.equal((await getLane(contract, 1)).closingAt, 0);
    chain.now = NOW + DELAY;
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: reclaimLaneBody(1) }), addr, ERR.notClosing);
  });

  it('withdraws only free balance, only to the owner', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('4') }]), addr);
    const st = await getState(contract);
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: withdrawBody(st.free + 1n) }), addr, ERR.insufficientFree);
    assertFails(await stranger.send({ to: addr, value: toNano('0.05'), body: withdrawBody(toNano('1')) }), addr, ERR.notOwner);

    const b0 = await balanceOf(addr);
    const r = await owner.send({ to: addr, value: toNano('0.05'), body: withdrawBody(toNano('1')) });
    assertOk(r, addr);
    assert.equal(await balanceOf(addr), b0 - toNano('1'));
    const got = received(r, addr, owner.address);
    assert.ok(got > toNano('1') && got < toNano('1.05'));

    const r2 = await owner.send({ to: addr, value: toNano('0.05'), body: withdrawBody(0n) });
    assertOk(r2, addr);
    const end = await getState(contract);
    assert.equal(end.balance, end.committed + MIN_RESERVE);
    assert.equal(end.free, 0n);
    assertFails(await owner.send({ to: addr, value: toNano('0.05'), body: withdrawBody(0n) }), addr, ERR.zeroAmount);
    // The lane is intact and redeemable in full.
    assertOk(await redeem(w1, cheque(w1.address, 1, toNano('4'))), addr);
    assert.equal((await getState(contract)).balance, MIN_RESERVE);
  });

  it('a message with too little gas changes nothing and costs the contract nothing', async () => {
    assertOk(await open([{ laneId: 1, worker: w1.address, amount: toNano('1') }]), addr);
    const b0 = await balanceOf(addr);
    for (const value of [1n, toNano('0.0001'), toNano('0.001')]) {
      const r = await redeem(w1, cheque(w1.address, 1, toNano('1')), value);
      const tx = txTo(r, addr);
      assert.equal(tx.description.aborted, true, `value ${value} should abort`);
      assert.ok((await balanceOf(addr)) >= b0);
    }
    assert.equal((await getLane(contract, 1)).redeemed, 0n);
    const r = await owner.send({ to: addr, value: toNano('0.0005'), body: withdrawBody(toNano('1')) });
    assert.equal(txTo(r, addr).description.aborted, true);
    assert.ok((await balanceOf(addr)) >= b0);
  });

  it('bounces unknown opcodes and truncated bodies back to the sender', async () => {
    const b0 = await balanceOf(addr);
    const before = await stranger.getBalance();
    const r = await stranger.send({ to: addr, value: toNano('1'), body: beginCell().storeUint(0x12345678, 32).endCell() });
    assertFails(r, addr, ERR.unknownOp);
    assert.ok(received(r, addr, stranger.address) > toNano('0.99'));
    assert.ok(before - (await stranger.getBalance()) < toNano('0.01'));
    const truncated = beginCell().storeUint(OP.redeem, 32).storeUint(0, 64).storeUint(1, 32).endCell();
    const r2 = await w1.send({ to: addr, value: toNano('1'), body: truncated });
    assertFails(r2, addr, 9);
    assert.ok(received(r2, addr, w1.address) > toNano('0.99'));
    const trailing = beginCell().storeUint(OP.deposit, 32).storeUint(0, 64).storeUint(1, 1).endCell();
    assertFails(await w1.send({ to: addr, value: toNano('1'), body: trailing }), addr, 9);
    assert.ok((await balanceOf(addr)) >= b0);
  });
});
