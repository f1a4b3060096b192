// Drives the gateway's /trigger.dev room with Trigger.dev's own SDK, unchanged.
// Usage: node sdk.mjs '<JSON {"op": ..., ...}>'; TRIGGER_API_URL and
// TRIGGER_SECRET_KEY come from the environment, as a user sets them.
// Prints one JSON line: {"result": ...} or {"error": {status, name, message, code}}.
import { tasks, runs } from "@trigger.dev/sdk";

const request = JSON.parse(process.argv[2]);

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
};

try {
  const result = await ops[request.op](request);
  console.log(JSON.stringify({ result }));
} catch (error) {
  console.log(
    JSON.stringify({
      error: {
        status: error.status ?? null,
        name: error.name ?? null,
        code: error.code ?? null,
        message: String(error.message ?? error),
      },
    })
  );
}
