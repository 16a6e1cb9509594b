// Replays fixtures/rust-settlement.json (written by the Rust crate's
// `tests/fixtures.rs`) against the contract: the address and initial data
// Rust computes, and the cheques and message bodies Rust signs and builds,
// must be what the contract accepts (or refuses, where the fixture says so).
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Blockchain, internal } from '@ton/sandbox';
import { Address, Cell, toNano } from '@ton/core';
import { initData, settlementAddress, settlementCode, getLane, getState } from '../lib/settlement.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const fx = JSON.parse(readFileSync(join(root, 'fixtures', 'rust-settlement.json'), 'utf-8'));
const cell = (b64) => Cell.fromBoc(Buffer.from(b64, 'base64'))[0];

it('accepts what the Rust crate builds and signs', async () => {
  const params = {
    owner: Address.parse(fx.owner),
    publicKey: Buffer.from(fx.public_key, 'hex'),
    closeDelay: fx.close_delay_s,
    nonce: BigInt(fx.nonce),
  };
  assert.equal(settlementCode().hash().toString('hex'), fx.code_hash);
  assert.ok(initData(params).equals(cell(fx.data)), 'Rust initial data differs from the JS layout');
  const addr = settlementAddress(params);
  assert.equal(addr.toRawString(), fx.contract);

  const chain = await Blockchain.create();
  chain.now = 1_800_000_000;
  const send = (from, body, value = toNano('0.05'), stateInit) =>
    chain.sendMessage(internal({ from: Address.parse(from), to: addr, value, body, stateInit, bounce: true }));
  const exitOf = (r) => {
    const tx = r.transactions.find((t) => t.inMessage?.info.dest?.equals?.(addr));
    return tx.description.computePhase.exitCode;
  };
  const paidTo = (r, to) => {
    let sum = 0n;
    for (const t of r.transactions) {
      const m = t.inMessage;
      if (m?.info.type === 'internal' && m.info.src.equals(addr) && m.info.dest.equals(Address.parse(to))) sum += m.info.value.coins;
    }
    return sum;
  };

  let r = await send(fx.owner, cell(fx.deposit), toNano('10'), { code: settlementCode(), data: cell(fx.data) });
  assert.equal(exitOf(r), 0);
  r = await send(fx.owner, cell(fx.open_lanes));
  assert.equal(exitOf(r), 0);
  assert.equal((await getLane({ runGetMethod: (m, s) => chain.runGetMethod(addr, m, s) }, 2)).deposited, toNano('3'));

  for (const [i, step] of fx.steps.entries()) {
    const before = (await chain.getContract(addr)).balance;
    r = await send(step.from, cell(step.body));
    assert.equal(exitOf(r), step.expect_exit, `step ${i}`);
    const payout = BigInt(step.expect_payout);
    if (step.expect_exit === 0 && payout > 0n) {
      assert.equal((await chain.getContract(addr)).balance, before - payout, `step ${i} contract balance`);
      assert.ok(paidTo(r, step.from) >= payout, `step ${i} payout`);
    }
  }
  const st = await getState({ runGetMethod: (m, s) => chain.runGetMethod(addr, m, s) });
  assert.equal(st.committed, toNano('0.5'));
});
