// A loopback OpenAI-compatible upstream that answers instantly (the benchmark's "provider").
import http from "node:http";

const body = JSON.stringify({
  id: "chatcmpl-bench", object: "chat.completion", created: 1741569952,
  model: "gpt-4o-mini-2024-07-18",
  choices: [{ index: 0, message: { role: "assistant", content: "ok", refusal: null },
              logprobs: null, finish_reason: "stop" }],
  usage: { prompt_tokens: 19, completion_tokens: 1, total_tokens: 20,
           prompt_tokens_details: { cached_tokens: 0 },
           completion_tokens_details: { reasoning_tokens: 0 } },
});
http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
    res.end(body);
  });
}).listen(Number(process.env.PORT), "127.0.0.1");
