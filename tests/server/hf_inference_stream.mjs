// Usage: node hf_inference_stream.mjs <module dir> <server url> <prompt> <max_new_tokens>
// Prints one JSON line per streamed event (token text and id, final generated_text).
const [moduleDir, url, prompt, maxNew] = process.argv.slice(2);
const { InferenceClient } = await import(`${moduleDir}/node_modules/@huggingface/inference/dist/esm/index.js`);
const client = new InferenceClient();
const ep = client.endpoint(url);
for await (const ev of ep.textGenerationStream({
  inputs: prompt,
  parameters: { max_new_tokens: Number(maxNew), details: true },
})) {
  console.log(JSON.stringify({ text: ev.token.text, id: ev.token.id, generated_text: ev.generated_text ?? null, details: ev.details ?? null }));
}
