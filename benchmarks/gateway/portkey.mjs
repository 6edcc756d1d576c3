// Starts Portkey's gateway bound to 127.0.0.1 (it listens on all interfaces by default).
// Usage: node portkey.mjs PORT
import http from "node:http";

const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "object" && args[0] !== null) {
    args[0] = { ...args[0], host: "127.0.0.1" };
    return listen.apply(this, args);
  }
  if (args.length === 1 || typeof args[1] === "function") args.splice(1, 0, "127.0.0.1");
  return listen.apply(this, args);
};
const port = process.argv[2];
process.argv = [process.argv[0], process.argv[1], `--port=${port}`, "--headless"];
await import("./node_modules/@portkey-ai/gateway/build/start-server.js");
