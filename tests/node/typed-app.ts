// A small app typed from the gateway's /openapi.json by openapi-typescript
// with its default flags (tests/test_openapi.py generates ./api.d.ts next to
// it, then compiles this with tsc --strict). Each `@ts-expect-error` line
// must be an error: if the document lost a type, tsc fails on that line.
import type { components, paths, webhooks } from "./api";

type Json<T> = T extends { content: { "application/json": infer B } } ? B : never;

// The generic trigger: every option is optional, the body may be empty.
type Trigger = Json<paths["/api/v1/tasks/{task}/trigger"]["post"]["requestBody"]>;
export const empty: Trigger = {};
export const withOptions: Trigger = { payload: { any: "thing" }, options: { tags: ["a"], delay: "10m" } };
// @ts-expect-error an option that does not exist
export const unknownOption: Trigger = { options: { not_an_option: 1 } };

// A task's own operation: its payload and its output are typed.
type CropTrigger = Json<paths["/api/v1/tasks/crop-image/trigger"]["post"]["requestBody"]>;
export const crop: CropTrigger = {
  payload: { image_url: "https://example.com/a.png", x: 0, y: 0, width: 10, height: 10 },
  options: { idempotency_key: "crop-1" },
};
// @ts-expect-error width is a number
export const badCrop: CropTrigger = { payload: { image_url: "https://x/a.png", width: "10" } };

type CropRun = Json<paths["/api/v1/tasks/crop-image/trigger"]["post"]["responses"]["202"]>;
export function croppedUrl(run: CropRun): string | undefined {
  const url: string | undefined = run.output?.url;
  return run.status === "COMPLETED" ? url : undefined;
}
export function croppedSize(run: CropRun): number {
  // @ts-expect-error the output has no such field
  return run.output?.pixels ?? 0;
}

// A run as GET /api/v1/runs/{id} answers it.
type Run = components["schemas"]["RunView"];
export const isDone = (run: Run): boolean => run.is_final && run.status !== "FAILED";

// Callbacks: each event's body, with `type` pinned.
type Completed = Json<webhooks["run.completed"]["post"]["requestBody"]>;
export function onCompleted(event: Completed): string {
  const kind: "run.completed" = event.type;
  return `${kind} ${event.data.id} ${event.data.status}`;
}
type WaitpointDone = Json<webhooks["waitpoint.completed"]["post"]["requestBody"]>;
export const waitpointOf = (event: WaitpointDone): string => event.data.id;

// The workers' listing.
type Workers = Json<paths["/api/v1/workers"]["get"]["responses"]["200"]>;
export const busy = (w: Workers): number => w.data.reduce((n, x) => n + x.slots_in_use, 0);
