#!/usr/bin/env bash
# openai-client-check.sh [RRNSERVE] - drives /v1/completions and /v1/models
# with OpenAI's own client library (the `openai` package of the npm
# registry, for Node.js), to check that a client of that API reads what the
# server answers: the model list, a completion of n 2 with logprobs and
# their text offsets, a stream with its usage, two prompts echoed and
# scored (the offsets slice the text into the tokens), a stream echoing
# its prompt, and an error's message.  Not part of `make test`:
# it fetches the package from the registry.  Needs node and npm
# (`apt-get install nodejs npm`).  Prints what the client read; exits
# non-zero when any of it is wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-./rrnserve}
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
"$bin" serve --models tests/fixtures --port "$port" >"$work/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
(cd "$work" && npm install --silent --no-audit --no-fund openai@4 >/dev/null)
for _ in $(seq 100); do curl -sf "localhost:$port/healthz" >/dev/null && break; sleep 0.1; done
cat >"$work/check.mjs" <<JS
import OpenAI from 'openai';
import assert from 'node:assert/strict';
const client = new OpenAI({ baseURL: 'http://127.0.0.1:$port/v1', apiKey: 'unused' });
const models = await client.models.list();
assert.ok(models.data.some(m => m.id === 'combo_lstm_lm'));
const c = await client.completions.create({ model: 'combo_lstm_lm', prompt: 'good day', max_tokens: 5, seed: 7,
                                            logprobs: 1, n: 2 });
assert.equal(c.choices.length, 2);
assert.equal(c.choices[0].logprobs.token_logprobs.length, 5);
assert.deepEqual(c.choices[0].logprobs.text_offset, [8, 9, 10, 11, 12]);
assert.equal(c.usage.total_tokens, 8 + 2 * 5);
let text = '', finish = null, usage = null;
for await (const chunk of await client.completions.create({ model: 'combo_lstm_lm', prompt: 'good day', max_tokens: 5,
                                                            seed: 7, stream: true,
                                                            stream_options: { include_usage: true } })) {
  if (chunk.choices.length) { text += chunk.choices[0].text; finish = chunk.choices[0].finish_reason ?? finish; }
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(text, c.choices[0].text);
assert.equal(finish, 'length');
assert.equal(usage.completion_tokens, 5);
const scored = await client.completions.create({ model: 'combo_lstm_lm', prompt: ['good day', 'the '], echo: true,
                                                 max_tokens: 0, logprobs: 1 });
assert.deepEqual(scored.choices.map(x => x.text), ['good day', 'the ']);
assert.equal(scored.choices[1].logprobs.token_logprobs.length, 4);
assert.equal(scored.choices[1].logprobs.token_logprobs[0], null);
const offsets = scored.choices[0].logprobs.text_offset;
assert.deepEqual(offsets.map((o, i) => scored.choices[0].text.slice(o, o + 1)), scored.choices[0].logprobs.tokens);
const lp = scored.choices[0].logprobs.token_logprobs.slice(1).reduce((a, b) => a + b, 0);
let echoed = '';
for await (const chunk of await client.completions.create({ model: 'combo_lstm_lm', prompt: 'good day', max_tokens: 5,
                                                            seed: 7, stream: true, echo: true })) {
  if (chunk.choices.length) echoed += chunk.choices[0].text;
}
assert.equal(echoed, 'good day' + c.choices[0].text);
await assert.rejects(client.completions.create({ model: 'combo_lstm_lm', prompt: 'x', suffix: 'y' }),
                     e => e.status === 422 && e.message.includes('suffix'));
console.log('openai ' + (await import('openai/version')).VERSION + ': ' + models.data.length + ' models; ' +
            JSON.stringify(c.choices.map(x => x.text)) + ', ' + c.usage.total_tokens + ' tokens; stream ' +
            JSON.stringify(text) + ' (' + finish + ', usage ' + usage.completion_tokens + '); echoed ' +
            JSON.stringify(scored.choices.map(x => x.text)) + ', ln p ' + lp.toFixed(4) + ', text_offset ' +
            JSON.stringify(offsets) + '; a stream echoed ' +
            JSON.stringify(echoed) + '; suffix refused');
JS
node "$work/check.mjs"
