// A loopback upstream that answers instantly (the benchmark's "provider"), in each wire the
// gateway forwards: OpenAI chat completions and responses, Anthropic messages; plain JSON,
// or a short SSE stream when the request asks for one.
import http from "node:http";

const chat = JSON.stringify({
  id: "chatcmpl-bench", object: "chat.completion", created: 1741569952,
  model: "gpt-4o-mini-2024-07-18",
  choices: [{ index: 0, message: { role: "assistant", content: "ok", refusal: null },
              logprobs: null, finish_reason: "stop" }],
  usage: { prompt_tokens: 19, completion_tokens: 1, total_tokens: 20,
           prompt_tokens_details: { cached_tokens: 0 },
           completion_tokens_details: { reasoning_tokens: 0 } },
});
const chatStream = [
  { id: "chatcmpl-bench", object: "chat.completion.chunk", created: 1741569952,
    model: "gpt-4o-mini-2024-07-18",
    choices: [{ index: 0, delta: { role: "assistant", content: "ok" }, finish_reason: null }] },
  { id: "chatcmpl-bench", object: "chat.completion.chunk", created: 1741569952,
    model: "gpt-4o-mini-2024-07-18", choices: [{ index: 0, delta: {}, finish_reason: "stop" }] },
  { id: "chatcmpl-bench", object: "chat.completion.chunk", created: 1741569952,
    model: "gpt-4o-mini-2024-07-18", choices: [],
    usage: { prompt_tokens: 19, completion_tokens: 1, total_tokens: 20 } },
].map((c) => `data: ${JSON.stringify(c)}\n\n`).join("") + "data: [DONE]\n\n";

const message = {
  id: "msg_bench", type: "message", role: "assistant", model: "claude-sonnet-4-6",
  content: [{ type: "text", text: "ok" }], stop_reason: "end_turn", stop_sequence: null,
  usage: { input_tokens: 19, output_tokens: 1, cache_creation_input_tokens: 0,
           cache_read_input_tokens: 0 },
};
const messageStream = [
  ["message_start", { type: "message_start", message: { ...message, content: [],
    stop_reason: null, usage: { input_tokens: 19, output_tokens: 1 } } }],
  ["content_block_start", { type: "content_block_start", index: 0,
    content_block: { type: "text", text: "" } }],
  ["content_block_delta", { type: "content_block_delta", index: 0,
    delta: { type: "text_delta", text: "ok" } }],
  ["content_block_stop", { type: "content_block_stop", index: 0 }],
  ["message_delta", { type: "message_delta", delta: { stop_reason: "end_turn",
    stop_sequence: null }, usage: { output_tokens: 1 } }],
  ["message_stop", { type: "message_stop" }],
].map(([e, d]) => `event: ${e}\ndata: ${JSON.stringify(d)}\n\n`).join("");

const response = {
  id: "resp_bench", object: "response", created_at: 1741569952, status: "completed",
  model: "gpt-4o-mini-2024-07-18", output: [{ type: "message", id: "msg_bench",
    status: "completed", role: "assistant",
    content: [{ type: "output_text", text: "ok", annotations: [] }] }],
  usage: { input_tokens: 19, input_tokens_details: { cached_tokens: 0 }, output_tokens: 1,
           output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 20 },
};
const item = response.output[0];
const responseStream = [
  { type: "response.created", sequence_number: 0,
    response: { ...response, status: "in_progress", output: [], usage: null } },
  { type: "response.output_item.added", sequence_number: 1, output_index: 0,
    item: { ...item, status: "in_progress", content: [] } },
  { type: "response.content_part.added", sequence_number: 2, output_index: 0, item_id: item.id,
    content_index: 0, part: { type: "output_text", text: "", annotations: [] } },
  { type: "response.output_text.delta", sequence_number: 3, output_index: 0, item_id: item.id,
    content_index: 0, delta: "ok" },
  { type: "response.output_text.done", sequence_number: 4, output_index: 0, item_id: item.id,
    content_index: 0, text: "ok" },
  { type: "response.content_part.done", sequence_number: 5, output_index: 0, item_id: item.id,
    content_index: 0, part: item.content[0] },
  { type: "response.output_item.done", sequence_number: 6, output_index: 0, item },
  { type: "response.completed", sequence_number: 7, response },
].map((e) => `event: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`).join("");

const answers = {
  "/v1/chat/completions": [chat, chatStream],
  "/v1/messages": [JSON.stringify(message), messageStream],
  "/v1/responses": [JSON.stringify(response), responseStream],
};

http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const [plain, streamed] = answers[req.url.split("?")[0]] || answers["/v1/chat/completions"];
    const stream = Buffer.concat(chunks).includes('"stream": true')
      || Buffer.concat(chunks).includes('"stream":true');
    const out = stream ? streamed : plain;
    res.writeHead(200, {
      "content-type": stream ? "text/event-stream" : "application/json",
      "content-length": Buffer.byteLength(out),
    });
    res.end(out);
  });
}).listen(Number(process.env.PORT), "127.0.0.1");
