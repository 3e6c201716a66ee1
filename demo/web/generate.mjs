// Greedy generation with transformers.js (Node, onnxruntime-node on the CPU) from an export in its layout.
//
//   node demo/web/generate.mjs --model OUT --prompt "caption en" [--image FILE] [--pixels FILE] [--max-new-tokens N]
//                              [--dtype fp32|fp16|q8|q4|q4f16] [--pixels-out FILE]
//
// --pixels: raw little-endian float32 [1, 3, S, S] pixel values to use instead of transformers.js' own resize
// (the Python tests write them, so both sides see the same pixels). Without it, --image goes through
// transformers.js' image processor. --pixels-out writes the pixel values the processor made (to measure its resize).
// Prints one JSON line: {"input_ids": [...], "tokens": [...], "text": "...", "load_s", "generate_s"}.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { AutoProcessor, PaliGemmaForConditionalGeneration, RawImage, Tensor, env } from '@huggingface/transformers';

const { values: args } = parseArgs({
    options: {
        model: { type: 'string' },
        prompt: { type: 'string', default: 'caption en' },
        image: { type: 'string' },
        pixels: { type: 'string' },
        'pixels-out': { type: 'string' },
        'max-new-tokens': { type: 'string', default: '32' },
        dtype: { type: 'string', default: 'fp32' },
    },
});
if (!args.model || !(args.image || args.pixels)) {
    console.error('usage: generate.mjs --model OUT --prompt TEXT (--image FILE | --pixels FILE)');
    process.exit(2);
}

env.allowRemoteModels = false; // everything from the local folder, nothing from the Hub
env.localModelPath = path.dirname(path.resolve(args.model)) + path.sep;
const modelId = path.basename(path.resolve(args.model));

const loadStart = performance.now();
const processor = await AutoProcessor.from_pretrained(modelId);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(modelId, { dtype: args.dtype });
const loadSeconds = (performance.now() - loadStart) / 1000;

const size = processor.image_processor.config.size.height;
const image = args.image ? await RawImage.read(args.image) : new RawImage(new Uint8ClampedArray(size * size * 3), size, size, 3);
// A leading <image> makes the processor expand it to image_seq_length tokens and put <bos> after them.
const inputs = await processor(image, '<image>' + args.prompt);
if (args['pixels-out']) {
    fs.writeFileSync(args['pixels-out'], Buffer.from(inputs.pixel_values.data.buffer));
}
if (args.pixels) {
    const bytes = fs.readFileSync(args.pixels);
    const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    if (data.length !== inputs.pixel_values.data.length) {
        console.error(`${args.pixels} holds ${data.length} values; the model takes ${inputs.pixel_values.dims.join('x')}`);
        process.exit(2);
    }
    inputs.pixel_values = new Tensor('float32', Float32Array.from(data), inputs.pixel_values.dims);
}

const generateStart = performance.now();
const output = await model.generate({ ...inputs, max_new_tokens: Number(args['max-new-tokens']), do_sample: false });
const generateSeconds = (performance.now() - generateStart) / 1000;
const promptLength = inputs.input_ids.dims.at(-1);
const tokens = Array.from(output.slice(0, [promptLength, null]).data, Number);
console.log(JSON.stringify({
    input_ids: Array.from(inputs.input_ids.data, Number),
    tokens,
    text: processor.batch_decode(output.slice(null, [promptLength, null]), { skip_special_tokens: true })[0],
    load_s: loadSeconds,
    generate_s: generateSeconds,
}));
