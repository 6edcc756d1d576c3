// Starts @modelcontextprotocol/server-everything in streamable-HTTP mode bound to 127.0.0.1
// (it listens on all interfaces by default). PORT comes from the environment.
import http from "node:http";

const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (port, ...rest) {
  if (rest.length === 0 || typeof rest[0] === "function") {
    return listen.call(this, port, "127.0.0.1", ...rest);
  }
  return listen.call(this, port, ...rest);
};
process.argv = [process.argv[0], process.argv[1], "streamableHttp"];
await import("./node_modules/@modelcontextprotocol/server-everything/dist/index.js");
