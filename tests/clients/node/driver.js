// Node amqplib driver for the amqproxy client tests.
//   node driver.js COMMAND '{"host":..., "port":..., "user":..., "password":..., "vhost":..., ...}'
// Prints one JSON line with what it observed; exits non-zero on an unexpected error.
// amqplib does not implement transactions (no Tx.* API) and always numbers channels itself
// (no way to ask for channel 2047): those features are covered by the other clients.
'use strict';

const amqp = require('amqplib');
const crypto = require('crypto');

const [command, rawArgs] = process.argv.slice(2);
const args = JSON.parse(rawArgs || '{}');

function connect(extra) {
  return amqp.connect(Object.assign({
    protocol: 'amqp', hostname: args.host, port: args.port, username: args.user,
    password: args.password, vhost: args.vhost, heartbeat: 0, frameMax: args.frameMax || 131072,
  }, extra || {}), { timeout: 10000 });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function withTimeout(promise, ms, what) {
  let t;
  const timer = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms);
  });
  return Promise.race([promise, timer]).finally(() => clearTimeout(t));
}

// JSON view of decoded values: Buffers as {"$bytes": hex}
function view(v) {
  if (Buffer.isBuffer(v)) return { $bytes: v.toString('hex') };
  if (Array.isArray(v)) return v.map(view);
  if (v && typeof v === 'object') {
    const out = {};
    for (const k of Object.keys(v)) out[k] = view(v[k]);
    return out;
  }
  return v;
}

function bodyOf(size, seed) {
  const block = Buffer.alloc(251);
  for (let i = 0; i < 251; i++) block[i] = (i * 7 + seed) & 0xff;
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i += 251) block.copy(out, i, 0, Math.min(251, size - i));
  return out;
}

const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');

// Consume until n messages arrived (no-ack), cancel, return them. Use only on a queue holding
// exactly the messages wanted: a no-ack consumer takes everything that is there.
async function consumeN(ch, queue, n) {
  const got = [];
  let done;
  const all = new Promise((resolve) => { done = resolve; });
  const ok = await ch.consume(queue, (m) => {
    if (m === null) return;
    got.push(m);
    if (got.length === n) done();
  }, { noAck: true });
  await withTimeout(all, 20000, `${n} deliveries from ${queue} (have ${got.length})`);
  await ch.cancel(ok.consumerTag);
  return got;
}

const commands = {
  // Connect and close; a refusal is reported, not thrown: {"ok": false, "error": message}.
  async login() {
    try {
      const conn = await connect();
      await conn.close();
      return { ok: true };
    } catch (err) {
      return { ok: false, error: String(err && err.message ? err.message : err) };
    }
  },
  // Read the reference message by get and by deliver; publish a message with typed headers.
  async props() {
    const conn = await connect();
    const ch = await conn.createConfirmChannel();
    const viewMsg = (m) => ({
      body: m.content.toString('utf8'), properties: view(m.properties),
    });
    const got = await ch.get(args.q_in, { noAck: true });
    const [delivered] = await consumeN(ch, args.q_in, 1);
    ch.publish('', args.q_out, Buffer.from('out'), {
      contentType: 'text/plain', contentEncoding: 'utf-8', persistent: true, priority: 5,
      correlationId: 'c', replyTo: 'r', expiration: '10000', messageId: 'm',
      timestamp: 1700000000, type: 't', userId: args.user, appId: 'node',
      headers: {
        str: 'n\u00f6de', i8: { '!': 'int8', value: -5 }, u8: { '!': 'uint8', value: 200 },
        i16: { '!': 'int16', value: -300 }, u16: { '!': 'uint16', value: 65535 },
        i32: { '!': 'int32', value: -70000 }, u32: { '!': 'uint32', value: 4000000000 },
        i64: { '!': 'int64', value: -5000000000 }, auto: 70000,
        f32: { '!': 'float', value: 1.5 }, f64: 3.25,
        dec: { '!': 'decimal', value: { places: 2, digits: 12345 } },
        ts: { '!': 'timestamp', value: 1700000000 }, yes: true, no: false,
        table: { k: 'v', inner: { deep: true } }, array: ['a', 1, [true]],
        bytes: Buffer.from([0, 1, 254, 255]), void: null,
      },
    });
    await ch.waitForConfirms();
    await conn.close();
    return { get: viewMsg(got), deliver: viewMsg(delivered) };
  },

  // Confirms, mandatory return, qos/ack/nack/reject/recover/cancel.
  async features() {
    const conn = await connect();
    const out = {};
    const cch = await conn.createConfirmChannel();
    const returns = [];
    cch.on('return', (m) => returns.push({
      replyCode: m.fields.replyCode, replyText: m.fields.replyText,
      exchange: m.fields.exchange, routingKey: m.fields.routingKey,
      body: m.content.toString(), messageId: m.properties.messageId,
    }));
    let acked = 0;
    for (let i = 0; i < 20; i++) {
      cch.publish('', args.q, Buffer.from(`c${i}`), { mandatory: true }, (err) => {
        if (!err) acked += 1;
      });
    }
    cch.publish('amq.direct', 'nowhere', Buffer.from('lost'), { mandatory: true, messageId: 'r1' });
    await withTimeout(cch.waitForConfirms(), 10000, 'confirms');
    out.acked = acked;
    out.returns = returns;

    // qos / ack / nack / reject / recover / cancel on a second queue
    const ch = await conn.createChannel();
    for (let i = 0; i < 6; i++) ch.sendToQueue(args.q2, Buffer.from(`m${i}`));
    await ch.prefetch(2);
    const got = [];
    const { consumerTag } = await ch.consume(args.q2, (m) => got.push(m));
    const take = async (n, wait = 5000) => {
      const deadline = Date.now() + wait;
      while (got.length < n && Date.now() < deadline) await sleep(10);
      await sleep(200);
      return got.length;
    };
    const steps = [];
    steps.push(await take(2));
    ch.ack(got[0]);
    steps.push(await take(3));
    ch.nack(got[1], false, true);
    steps.push(await take(4));
    out.nackRedelivered = [got[3].content.toString(), got[3].fields.redelivered];
    ch.reject(got[2], false);
    steps.push(await take(5));
    await ch.recover();
    steps.push(await take(7));
    out.recovered = got.slice(5, 7).map((m) => [m.content.toString(), m.fields.redelivered]);
    ch.ack(got[6], true);
    steps.push(await take(9));
    await ch.cancel(consumerTag);
    ch.sendToQueue(args.q2, Buffer.from('m6'));
    steps.push(await take(10, 300));  // must stay at 9
    ch.nack(got[8], true, true);
    out.steps = steps;
    out.order = got.map((m) => m.content.toString());
    await sleep(100);
    await conn.close();
    return out;
  },

  // Bodies of the given sizes out and back by get and by deliver; optional frameMax.
  async bodies() {
    const conn = await connect();
    const ch = await conn.createConfirmChannel();
    const out = { frameMax: conn.connection.frameMax, get: [], deliver: [] };
    for (let copy = 0; copy < 2; copy++) {
      for (const [i, size] of args.sizes.entries()) ch.sendToQueue(args.q, bodyOf(size, i));
    }
    await withTimeout(ch.waitForConfirms(), 30000, 'confirms');
    for (let i = 0; i < args.sizes.length; i++) {  // first copies by get
      const m = await ch.get(args.q, { noAck: true });
      out.get.push(m ? [m.content.length, sha(m.content)] : null);
    }
    // second copies by deliver
    const ds = await consumeN(ch, args.q, args.sizes.length);
    out.deliver = ds.map((d) => [d.content.length, sha(d.content)]);
    if (args.q_ref) {  // two copies published directly by the test
      const m = await ch.get(args.q_ref, { noAck: true });
      out.refGet = m ? [m.content.length, sha(m.content)] : null;
      const [d] = await consumeN(ch, args.q_ref, 1);
      out.refDeliver = [d.content.length, sha(d.content)];
    }
    await conn.close();
    return out;
  },

  // topic/fanout/headers, exchange-to-exchange, direct reply-to, broker cancel, user_id.
  async routing() {
    const conn = await connect();
    const ch = await conn.createConfirmChannel();
    const t = `t-${args.tag}`; const f = `f-${args.tag}`; const h = `h-${args.tag}`;
    await ch.assertExchange(t, 'topic', { autoDelete: true, durable: false });
    await ch.assertExchange(f, 'fanout', { autoDelete: true, durable: false });
    await ch.assertExchange(h, 'headers', { autoDelete: true, durable: false });
    await ch.bindQueue(args.q_topic, t, 'a.*.c');
    await ch.bindQueue(args.q_fan, f, '');
    await ch.bindQueue(args.q_hdr, h, '', { 'x-match': 'all', a: 'x', b: 2 });
    await ch.bindExchange(f, t, 'to-fan.#');
    ch.publish(t, 'a.b.c', Buffer.from('abc'));
    ch.publish(t, 'a.b.c.d', Buffer.from('abcd'));
    ch.publish(t, 'to-fan.1', Buffer.from('e2e'));
    ch.publish(h, '', Buffer.from('h-yes'), { headers: { a: 'x', b: 2, c: 3 } });
    ch.publish(h, '', Buffer.from('h-no'), { headers: { a: 'x' } });
    await ch.unbindExchange(f, t, 'to-fan.#');
    ch.publish(t, 'to-fan.2', Buffer.from('late'));
    await ch.waitForConfirms();
    const out = {};

    // direct reply-to RPC, server on its own connection
    const sconn = await connect();
    const sch = await sconn.createChannel();
    await sch.consume(args.rpc_q, (m) => {
      sch.sendToQueue(m.properties.replyTo, Buffer.from(m.content.toString().toUpperCase()),
        { correlationId: m.properties.correlationId });
      sch.ack(m);
    });
    const rch = await conn.createChannel();
    const reply = withTimeout(new Promise((resolve) => {
      rch.consume('amq.rabbitmq.reply-to', (m) => resolve(
        [m.content.toString(), m.properties.correlationId]), { noAck: true });
    }), 10000, 'rpc reply');
    await sleep(50);
    rch.sendToQueue(args.rpc_q, Buffer.from('hello'),
      { replyTo: 'amq.rabbitmq.reply-to', correlationId: 'rpc-7' });
    out.rpc = await reply;
    await sconn.close();

    // broker-initiated consumer cancel: amqplib calls the consumer with null
    const cch = await conn.createChannel();
    const cancelled = withTimeout(new Promise((resolve) => {
      cch.consume(args.doomed, (m) => { if (m === null) resolve('cancelled'); });
    }), 10000, 'broker cancel');
    await sleep(50);
    await rch.deleteQueue(args.doomed);
    out.cancel = await cancelled;
    await cch.checkQueue(args.q_fan);  // the channel is still open
    out.cancelChannelOpen = true;

    // a forged user_id: the broker closes that channel only (406)
    const bad = await conn.createConfirmChannel();
    const closed = new Promise((resolve) => bad.on('error', (e) => resolve(e.message)));
    bad.publish('', args.q_fan, Buffer.from('forged'), { userId: 'mallory' });
    out.userIdError = await withTimeout(closed, 10000, 'channel error');
    ch.sendToQueue(args.q_fan, Buffer.from('after'));
    await ch.waitForConfirms();
    const again = await conn.createChannel();
    await again.checkQueue(args.q_fan);
    out.connectionAlive = true;
    await conn.close();
    return out;
  },
};

(async () => {
  if (!commands[command]) throw new Error(`unknown command ${command}`);
  const result = await withTimeout(commands[command](), 50000, command);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
})().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
