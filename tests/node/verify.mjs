// Verifies one callback of the gateway with npm's standardwebhooks, as a
// Node receiver would. Usage: node verify.mjs '<JSON {secret, body, headers}>'.
// Prints {"verified": <the event>} or {"refused": <why>}.
import { Webhook } from "standardwebhooks";

const { secret, body, headers } = JSON.parse(process.argv[2]);
try {
  const event = new Webhook(secret).verify(body, headers);
  console.log(JSON.stringify({ verified: event }));
} catch (error) {
  console.log(JSON.stringify({ refused: String(error.message ?? error) }));
}
