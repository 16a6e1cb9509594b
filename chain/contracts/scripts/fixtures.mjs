// Writes fixtures/ton-transfers.json: wallet transfers signed by @ton/ton for
// fixed inputs. The Rust crate's tests build the same transfers and must get
// the same BOC bytes. Run `node scripts/fixtures.mjs` after changing inputs.
import { WalletContractV4, WalletContractV5R1, internal, external } from '@ton/ton';
import { beginCell, storeMessage, Address, toNano } from '@ton/core';
import { mnemonicToPrivateKey } from '@ton/crypto';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { settlementAddress, stateInit, depositBody, openLanesBody } from '../lib/settlement.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const M4 = 'fancy carpet hello mandate penalty trial consider property top vicious exit rebuild tragic profit urban major total month holiday sudden rib gather media vicious';
const M5 = 'section garden tomato dinner season dice renew length useful spin trade intact use universe what post spike keen mandate behind concert egg doll rug';
const SEND_MODE = 3;

const b64 = (cell) => cell.toBoc().toString('base64');

async function cases(mnemonic, version) {
  const key = await mnemonicToPrivateKey(mnemonic.split(' '));
  const wallet = version === 'V4R2'
    ? WalletContractV4.create({ workchain: 0, publicKey: key.publicKey })
    : WalletContractV5R1.create({ workchain: 0, publicKey: key.publicKey });
  const worker = Address.parse('0:' + '22'.repeat(32));
  const params = { owner: wallet.address, publicKey: key.publicKey, closeDelay: 3600, nonce: 1n };
  const contract = settlementAddress(params);
  const bigBody = beginCell().storeUint(0, 32).storeStringTail('x'.repeat(120)).endCell();
  const inputs = [
    { seqno: 0, valid_until: 0xffffffff, messages: [{ dest: worker, value: toNano('1.5'), bounce: false }] },
    {
      seqno: 5, valid_until: 1_800_000_060,
      messages: [
        { dest: contract, value: toNano('10'), bounce: true, body: depositBody(9n), init: stateInit(params) },
        { dest: worker, value: 1n, bounce: false, body: bigBody },
      ],
    },
    {
      seqno: 6, valid_until: 1_800_000_120,
      messages: [{ dest: contract, value: toNano('0.05'), bounce: true, body: openLanesBody([{ laneId: 3, worker, amount: toNano('2') }], 4n) }],
    },
  ];
  const out = [];
  for (const input of inputs) {
    const messages = input.messages.map((m) => internal({ to: m.dest, value: m.value, bounce: m.bounce, body: m.body, init: m.init }));
    const body = wallet.createTransfer({ seqno: input.seqno, secretKey: key.secretKey, messages, sendMode: SEND_MODE, timeout: input.valid_until });
    const ext = external({ to: wallet.address, init: input.seqno === 0 ? wallet.init : undefined, body });
    const boc = beginCell().store(storeMessage(ext)).endCell();
    out.push({
      seqno: input.seqno,
      valid_until: input.valid_until,
      messages: input.messages.map((m) => ({
        dest: m.dest.toRawString(),
        value: m.value.toString(),
        bounce: m.bounce,
        body: m.body ? b64(m.body) : null,
        settlement_init: m.init ? { owner: params.owner.toRawString(), close_delay_s: params.closeDelay, nonce: Number(params.nonce) } : null,
      })),
      boc: b64(boc),
    });
  }
  return { mnemonic, version, address: wallet.address.toRawString(), settlement_address: contract.toRawString(), transfers: out };
}

const fixture = { generated_by: 'chain/contracts/scripts/fixtures.mjs', send_mode: SEND_MODE, wallets: [await cases(M4, 'V4R2'), await cases(M5, 'V5R1')] };
writeFileSync(join(root, 'fixtures', 'ton-transfers.json'), JSON.stringify(fixture, null, 2) + '\n');
console.log('wrote fixtures/ton-transfers.json');
