// An in-memory JSON CRUD API: a TQServer worker on Bun, no dependencies.
//
// With the /api prefix already stripped by the proxy:
//   GET    /items        200 [item, ...]
//   POST   /items        201 item (Location: /api/items/<id>); 400 on bad JSON
//   GET    /items/:id    200 item | 404
//   PUT    /items/:id    200 item (replaces its fields) | 400 | 404
//   DELETE /items/:id    204 | 404
//   GET    /bench        "Hello, World!" (cheap, for load tests)
//   GET    /health       200 "ok" (WORKER_HEALTH_PATH)
// An item is any JSON object; the API sets its "id", "created" and "updated".
//
// SIGTERM: stop accepting, finish the requests in flight, exit 0.

type Item = { id: number; created: string; updated: string; [field: string]: unknown };

const host = process.env.WORKER_HOST || "127.0.0.1";
const port = Number(process.env.WORKER_PORT || process.env.PORT || 3000);
const healthPath = process.env.WORKER_HEALTH_PATH || "/health";
const prefix = process.env.WORKER_ROUTE && process.env.WORKER_ROUTE !== "/" ? process.env.WORKER_ROUTE : "";
const maxItems = Number(process.env.API_MAX_ITEMS || 10000);

const items = new Map<number, Item>();
let nextId = 1;

const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body) + "\n", {
    status,
    headers: { "Content-Type": "application/json", ...headers },
  });
const problem = (status: number, error: string, headers: Record<string, string> = {}) =>
  json(status, { error }, headers);
const notAllowed = (allow: string) => problem(405, "method not allowed", { Allow: allow });

// The body as a JSON object, or a 400 response saying what is wrong with it.
async function readObject(req: Request): Promise<Record<string, unknown> | Response> {
  let body: unknown;
  try {
    body = JSON.parse(await req.text());
  } catch (e) {
    return problem(400, `bad JSON: ${(e as Error).message}`);
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    return problem(400, "the body must be a JSON object");
  }
  return body as Record<string, unknown>;
}

function parseId(text: string): number | null {
  return /^[1-9][0-9]{0,15}$/.test(text) ? Number(text) : null;
}

async function handleItems(req: Request): Promise<Response> {
  if (req.method === "GET" || req.method === "HEAD") {
    return json(200, [...items.values()]);
  }
  if (req.method === "POST") {
    const fields = await readObject(req);
    if (fields instanceof Response) return fields;
    if (items.size >= maxItems) return problem(507, `at most ${maxItems} items`);
    const now = new Date().toISOString();
    const item: Item = { ...fields, id: nextId++, created: now, updated: now };
    items.set(item.id, item);
    return json(201, item, { Location: `${prefix}/items/${item.id}` });
  }
  return notAllowed("GET, HEAD, POST");
}

async function handleItem(req: Request, idText: string): Promise<Response> {
  const id = parseId(idText);
  const item = id === null ? undefined : items.get(id);
  if (req.method === "GET" || req.method === "HEAD") {
    return item ? json(200, item) : problem(404, "no such item");
  }
  if (req.method === "PUT") {
    const fields = await readObject(req);
    if (fields instanceof Response) return fields;
    if (!item) return problem(404, "no such item");
    const updated: Item = { ...fields, id: item.id, created: item.created, updated: new Date().toISOString() };
    items.set(item.id, updated);
    return json(200, updated);
  }
  if (req.method === "DELETE") {
    if (!item) return problem(404, "no such item");
    items.delete(item.id);
    return new Response(null, { status: 204 });
  }
  return notAllowed("GET, HEAD, PUT, DELETE");
}

const benchBody = "Hello, World!";

const server = Bun.serve({
  hostname: host,
  port,
  async fetch(req) {
    const path = new URL(req.url).pathname.replace(/\/+$/, "") || "/";
    if (path === "/bench") return new Response(benchBody, { headers: { "Content-Type": "text/plain" } });
    if (path === healthPath) return new Response("ok", { headers: { "Cache-Control": "no-store" } });
    if (path === "/items") return handleItems(req);
    if (path.startsWith("/items/")) return handleItem(req, path.slice("/items/".length));
    if (path === "/") {
      return json(200, { service: "items API on Bun", items: items.size, endpoints: ["/items", "/items/:id"] });
    }
    return problem(404, "not found");
  },
  error(e) {
    console.error(e);
    return problem(500, "internal error");
  },
});

console.log(`api listening on http://${host}:${server.port} (bun ${Bun.version})`);

let stopping = false;
async function shutdown(signal: string) {
  if (stopping) return;
  stopping = true;
  console.log(`${signal}: finishing requests in flight`);
  await server.stop(); // stops accepting; resolves once in-flight requests are answered
  process.exit(0);
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
