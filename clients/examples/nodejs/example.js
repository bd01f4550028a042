#!/usr/bin/env node
// A ringlm client in Node.js: tokenize a text, run a seeded generate, stream the same request, print JSON.
//
//   node example.js --port 9090 --text "Hello" [--max-tokens 16 --temperature 0.8 --seed 7]
//                   [--tls --ca ca.pem --cert client.pem --key client.key] [--token TOKEN]
//
// The code in gen-nodejs/ is generated from idl/ringlm.thrift by `make clients`; the token may also come
// from RINGLM_AUTH_TOKEN, so that it need not show in the process list.
'use strict';

const fs = require('fs');
const { parseArgs } = require('util');
const thrift = require('thrift');
const Generator = require('./gen-nodejs/Generator');
const ttypes = require('./gen-nodejs/ringlm_types');

const { values: flags } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '9090' },
    text: { type: 'string', default: 'The quick brown fox' },
    'max-tokens': { type: 'string', default: '16' },
    temperature: { type: 'string', default: '0.8' },
    seed: { type: 'string', default: '7' },
    tls: { type: 'boolean', default: false },
    ca: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    token: { type: 'string', default: process.env.RINGLM_AUTH_TOKEN },
  },
});

function connect() {
  // ringlm speaks the framed transport with the strict binary protocol, in TLS or not.
  const options = { transport: thrift.TFramedTransport, protocol: thrift.TBinaryProtocol, connect_timeout: 10000 };
  let connection;
  if (flags.tls) {
    const read = (file) => (file ? fs.readFileSync(file) : undefined);
    Object.assign(options, { ca: read(flags.ca), cert: read(flags.cert), key: read(flags.key) });
    connection = thrift.createSSLConnection(flags.host, Number(flags.port), options);
  } else {
    connection = thrift.createConnection(flags.host, Number(flags.port), options);
  }
  // A connection error that no call is waiting on would otherwise be an unhandled 'error' event.
  const failed = new Promise((_, reject) => connection.on('error', reject));
  failed.catch(() => {});
  return { connection, client: thrift.createClient(Generator, connection), failed };
}

// Every call races the connection's failure, so a refused or dropped connection ends the program with an error.
const call = (session, promise) => Promise.race([promise, session.failed]);

async function main() {
  const session = connect();
  try {
    const { client } = session;
    if (flags.token) {
      await call(session, client.authenticate(flags.token));
    }
    const request = () => new ttypes.GenerateRequest({
      prompt: flags.text,
      max_tokens: Number(flags['max-tokens']),
      sampling: new ttypes.SamplingOptions({
        temperature: Number(flags.temperature),
        seed: new thrift.Int64(Number(flags.seed)),   // i64: node-int64 holds all 64 bits, a Number only 53
      }),
    });
    const textIds = await call(session, client.tokenize(flags.text, true, false));
    const result = await call(session, client.generate(request()));

    // The same seeded request, streamed: next_chunk long-polls until the last chunk (done) brings the result.
    const streamId = await call(session, client.open_stream(request()));
    let streamed = '';
    let chunk;
    do {
      chunk = await call(session, client.next_chunk(streamId, 1000));
      streamed += chunk.text;
    } while (!chunk.done);

    print({
      text_ids: textIds,
      generate: { token_ids: result.token_ids, text: result.text },
      stream: { text: streamed, token_ids: chunk.result.token_ids },
    });
  } finally {
    session.connection.end();
  }
}

function print(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

// The IDL's exceptions arrive as instances of the generated classes: report them with their fields.
const OTHER_EXCEPTIONS = ['Unauthorized', 'ModelError', 'DeadlineExceeded', 'Cancelled'];

function report(error) {
  if (error instanceof ttypes.InvalidRequest) {
    print({ error: 'InvalidRequest', field: error.field, message: error.message });
  } else if (error instanceof ttypes.Overloaded) {
    print({ error: 'Overloaded', message: error.message, retry_after_ms: error.retry_after_ms,
            draining: error.draining });
  } else if (OTHER_EXCEPTIONS.some((name) => error instanceof ttypes[name])) {
    // By name from the list: the generated classes are anonymous, so constructor.name is empty.
    print({ error: OTHER_EXCEPTIONS.find((name) => error instanceof ttypes[name]), message: error.message });
  } else {
    print({ error: 'TransportError', message: String(error && error.message || error) });
  }
  process.exitCode = 1;
}

main().catch(report);
