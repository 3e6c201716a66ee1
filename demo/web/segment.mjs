// A segmentation answer's masks in Node, by the page's code (segmentation.js) on the export's mask_decoder.onnx
// (onnxruntime-node, the runtime transformers.js uses in Node; the page uses onnxruntime-web's).
//
//   node demo/web/segment.mjs --model OUT --text "<loc...><seg...> circle ; ..." --width W --height H
//
// OUT is an export in transformers.js' layout whose config.json lists the mask decoder. Prints one JSON line:
// {"objects": [{"label", "box": [x0, y0, x1, y1], "mask": base64 of H * W bytes, 1 inside}]}.
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { InferenceSession, Tensor } from 'onnxruntime-node';

import { segmentations, sessionDecoder } from './segmentation.js';

const { values: args } = parseArgs({
    options: { model: { type: 'string' }, text: { type: 'string' }, width: { type: 'string' }, height: { type: 'string' } },
});
const [width, height] = [Number(args.width), Number(args.height)];
if (!args.model || args.text === undefined || !(Number.isInteger(width) && width > 0 && Number.isInteger(height) && height > 0)) {
    console.error('usage: segment.mjs --model OUT --text ANSWER --width W --height H (W, H whole numbers from 1)');
    process.exit(2);
}
const config = JSON.parse(fs.readFileSync(path.join(args.model, 'config.json'), 'utf8'));
const entry = config['transformers.js_config']?.mask_decoder;
if (!entry) {
    console.error(`${args.model}/config.json lists no mask decoder: export a checkpoint that ships one`);
    process.exit(2);
}
const session = await InferenceSession.create(path.join(args.model, 'onnx', entry.file));
const objects = await segmentations(args.text, width, height, sessionDecoder(session, (...args) => new Tensor(...args)));
console.log(JSON.stringify({
    objects: objects.map(({ label, box, mask }) => ({ label, box, mask: Buffer.from(mask).toString('base64') })),
}));
