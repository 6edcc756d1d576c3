// The Vercel AI SDK against flowc, as an app would use it. Prints one JSON line.
//   node ai_sdk.mjs <openai|openai-chat|anthropic> <tools|stream|object> <base URL> <model>
// openai(model) speaks the Responses API, openai.chat(model) chat completions,
// anthropic(model) the Messages API.
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [provider, mode, baseURL, modelId] = process.argv.slice(2);
const settings = { baseURL, apiKey: "sk-client" };
const model = {
  openai: () => createOpenAI(settings)(modelId),
  "openai-chat": () => createOpenAI(settings).chat(modelId),
  anthropic: () => createAnthropic(settings)(modelId),
}[provider]();

const tools = {
  lookup: tool({
    description: "Look up facts about a city.",
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => `${city} has 2102650 inhabitants (flowc-census)`,
  }),
};
const prompt = "How many people live in Paris?";
const city = z.object({ name: z.string(), population: z.number().int() });

let out;
if (mode === "tools") {
  const r = await generateText({ model, tools, prompt, stopWhen: stepCountIs(3) });
  out = { text: r.text, steps: r.steps.length };
} else if (mode === "stream") {
  const r = streamText({ model, tools, prompt, stopWhen: stepCountIs(3) });
  let text = "";
  for await (const piece of r.textStream) text += piece;
  out = { text, steps: (await r.steps).length };
} else {
  const r = await generateObject({ model, schema: city, prompt: "Describe Paris." });
  out = { object: r.object };
}
console.log(JSON.stringify(out));
