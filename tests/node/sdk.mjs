// Drives the gateway's /trigger.dev room with Trigger.dev's own SDK, unchanged.
// Reads one JSON request per line on stdin ({"op", "apiUrl", "secretKey", ...}),
// sets the SDK up as a user would (TRIGGER_API_URL, TRIGGER_SECRET_KEY: here
// through configure(), as the calls of one process go to several gateways),
// and prints one JSON line per request: {"result": ...} or {"error": {...}}.
// `node sdk.mjs '<request>'` runs one request and exits.
import readline from "node:readline";
import { apiClientManager } from "@trigger.dev/core/v3";
import { tasks, runs, batch, wait, queues, idempotencyKeys, schedules, configure } from "@trigger.dev/sdk";

function revive(value) {
  // Lets a test send what JSON cannot say: {"$date": iso}, {"$bigint": "10"},
  // {"$map": [[k, v]]}, {"$set": [...]}, {"$undefined": true}.
  if (Array.isArray(value)) return value.map(revive);
  if (value && typeof value === "object") {
    if ("$date" in value) return new Date(value.$date);
    if ("$bigint" in value) return BigInt(value.$bigint);
    if ("$map" in value) return new Map(value.$map.map(([k, v]) => [k, revive(v)]));
    if ("$set" in value) return new Set(value.$set.map(revive));
    if ("$undefined" in value) return undefined;
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, revive(v)]));
  }
  return value;
}

const ops = {
  async trigger({ task, payload, options }) {
    return await tasks.trigger(task, revive(payload), options);
  },
  async triggerAndPoll({ task, payload, options }) {
    const handle = await tasks.trigger(task, revive(payload), options);
    const run = await runs.poll(handle.id, { pollIntervalMs: 100 });
    return { handle, run };
  },
  async retrieve({ id }) {
    return await runs.retrieve(id);
  },
  async poll({ id }) {
    return await runs.poll(id, { pollIntervalMs: 100 });
  },
  async list({ filters }) {
    const seen = [];
    for await (const run of runs.list(filters)) seen.push(run);
    return seen;
  },
  async cancel({ id }) {
    return await runs.cancel(id);
  },
  async replay({ id }) {
    return await runs.replay(id);
  },
  async reschedule({ id, delay }) {
    return await runs.reschedule(id, { delay });
  },
  async subscribe({ id }) {
    // Every status the subscription yields, until it ends by itself.
    const seen = [];
    for await (const run of runs.subscribeToRun(id)) {
      seen.push({ status: run.status, isCompleted: run.isCompleted, output: run.output, finishedAt: run.finishedAt, at: Date.now() });
    }
    return seen;
  },
  async schedules({ actions }) {
    // Runs schedule calls in order; each entry is [method, ...args].
    const results = [];
    for (const [method, ...args] of actions) {
      const result = await schedules[method](...args);
      results.push(method === "list" ? { data: result.data, count: result.pagination?.count } : result);
    }
    return results;
  },
  async annotate({ id, tags, metadata, operations }) {
    // What tags.add() and metadata.flush() send from inside a Trigger.dev
    // task, through the SDK's own client (outside a task the SDK does not
    // call them).
    const client = apiClientManager.clientOrThrow();
    const tagged = await client.addTags(id, { tags });
    const updated = await client.updateRunMetadata(id, { metadata, operations });
    const read = await client.getRunMetadata(id);
    const run = await runs.retrieve(id);
    return { tagged, updated, read, tags: run.tags, runMetadata: run.metadata };
  },
  async resetKey({ task, idempotency, options }) {
    return await idempotencyKeys.reset(task, idempotency, options);
  },
  async batchTrigger({ task, items, options }) {
    return await tasks.batchTrigger(
      task,
      items.map((item) => ({ ...item, payload: revive(item.payload) })),
      options
    );
  },
  async batchTriggerMixed({ items }) {
    return await batch.trigger(items);
  },
  async createToken({ options }) {
    return await wait.createToken(options);
  },
  async completeToken({ id, data }) {
    return await wait.completeToken(id, data);
  },
  async retrieveToken({ id }) {
    const token = await wait.retrieveToken(id);
    return { ...token, error: token.error ? { name: token.error.name, message: token.error.message } : undefined };
  },
  async listTokens({ filters }) {
    const seen = [];
    for await (const token of wait.listTokens(filters)) seen.push(token);
    return seen;
  },
  async queues({ actions }) {
    // Runs queue calls in order; each entry is [method, ...args].
    const results = [];
    for (const [method, ...args] of actions) {
      if (method === "list") {
        const page = await queues.list(...args);
        results.push({ data: page.data, hasNextPage: page.hasNextPage() });
      } else {
        results.push(await queues[method](...args));
      }
    }
    return results;
  },
};

async function answer(request) {
  if (request.apiUrl) configure({ baseURL: request.apiUrl, accessToken: request.secretKey });
  try {
    return { result: await ops[request.op](request) };
  } catch (error) {
    return {
      error: {
        // A batch's errors wrap the gateway's answer as their cause.
        status: error.status ?? error.cause?.status ?? null,
        name: error.name ?? null,
        code: error.code ?? error.cause?.code ?? null,
        message: String(error.message ?? error),
      },
    };
  }
}

if (process.argv[2]) {
  console.log(JSON.stringify(await answer(JSON.parse(process.argv[2]))));
} else {
  for await (const line of readline.createInterface({ input: process.stdin })) {
    if (line.trim()) process.stdout.write(JSON.stringify(await answer(JSON.parse(line))) + "\n");
  }
}
