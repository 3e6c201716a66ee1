// PaliGemma in the browser: the embedded model's export (transformers.js layout, ./model) run by transformers.js
// on onnxruntime-web, WebGPU where the browser has an adapter, WebAssembly otherwise. Everything is served from
// this folder (python -m demo.web.build): no CDN, no Hub.
import {
    AutoProcessor, PaliGemmaForConditionalGeneration, RawImage, Tensor, TextStreamer, env, matmul,
} from './vendor/transformers.min.js';
import { segmentations, sessionDecoder } from './segmentation.js';

const MAX_NEW_TOKENS = 96;  // demo/app.py's DEFAULT_MAX_NEW_TOKENS: three segmented shapes take about 70
// paligemma.locations.LOOSE_BOX: a box, a segmentation answer's codes if any, the label up to ";" or the next token.
const LOC = /((?:<loc\d{4}>){4})\s*(?:<seg\d{3}>)*\s*([^;<]*)/g;
const BOX_COLOUR = '#e6007e';
const MASK_RGBA = [0xe6, 0x00, 0x7e, Math.round(255 * 0.45)];  // the box colour at demo/draw.py's MASK_OPACITY
const $ = (id) => document.getElementById(id);

env.allowRemoteModels = false;
env.allowLocalModels = true;
// A path, not a URL: transformers.js looks a local model up only under a path (a URL counts as remote).
env.localModelPath = new URL('./', import.meta.url).pathname;
env.backends.onnx.wasm.wasmPaths = new URL('./vendor/', import.meta.url).href;  // the asyncify build (WebGPU's)
// The model variants the page holds (python -m demo.web.build), picked with ?dtype=: fp32 gives torch's answers.
const DTYPES = ['fp32', 'q8'];

// onnxruntime-web's plain WebAssembly build, where no WebGPU adapter is used: 14 MB instead of the asyncify build's
// 27 MB, compiled much faster (demo/web/README.md). The URL pair keeps the streaming compile: with useWasmCache,
// transformers.js would fetch the bytes itself and hand onnxruntime-web an ArrayBuffer.
function useWasmBuild(name) {
    env.backends.onnx.wasm.wasmPaths = {
        mjs: new URL(`./vendor/${name}.mjs`, import.meta.url).href,
        wasm: new URL(`./vendor/${name}.wasm`, import.meta.url).href,
    };
    env.useWasmCache = false;
}

// What the tests and the measurements read: the last run's inputs, answer (with its masks) and timings.
// `marks`: milliseconds from the navigation start at each loading step (demo.web.measure_page prints them).
const state = {
    image: null, imageSource: null, busy: false, runs: [], loadedMs: null, firstAnswerMs: null, device: null,
    lastInputs: null, marks: { moduleStart: performance.now() }, crossOriginIsolated: self.crossOriginIsolated,
    threads: null, sessionOptions: null,
};
window.paligemma = state;

// The page's URL options: ?dtype= picks the variant; ?threads=N (onnxruntime-web's WebAssembly threads; its
// default here is one, half the cores) and ?optimization= (onnxruntime's graphOptimizationLevel) are for measuring
// the page (demo/web/README.md).
const OPTIMIZATION_LEVELS = ['all', 'extended', 'basic', 'disabled'];
// On WebAssembly the graphs load unoptimized: on this small model the optimizer's passes cost more at load than
// they save per answer (demo/web/README.md); WebGPU keeps onnxruntime's default.
const WASM_OPTIMIZATION = 'disabled';

function pageOptions(query) {
    const dtype = query.get('dtype') ?? 'fp32';
    if (!DTYPES.includes(dtype)) {
        throw new Error(`?dtype=${dtype} is not a variant this page holds; use ${DTYPES.join(' or ')}.`);
    }
    const threads = query.has('threads') ? Number(query.get('threads')) : null;
    if (threads !== null && !(Number.isInteger(threads) && threads >= 1)) {
        throw new Error(`?threads=${query.get('threads')} is not a number of threads; use a whole number from 1.`);
    }
    const level = query.get('optimization');
    if (level !== null && !OPTIMIZATION_LEVELS.includes(level)) {
        throw new Error(`?optimization=${level} is not a graph optimization level; use ${OPTIMIZATION_LEVELS.join(', ')}.`);
    }
    return { dtype, threads };
}

function sessionOptions(query, device) {
    const level = query.get('optimization') ?? (device === 'wasm' ? WASM_OPTIMIZATION : null);
    return level === null ? {} : { graphOptimizationLevel: level };
}

async function chooseDevice() {
    try {
        if (navigator.gpu && (await navigator.gpu.requestAdapter())) return 'webgpu';
    } catch { /* no usable adapter */ }
    return 'wasm';
}

function showError(message) {
    $('error').textContent = message;
    $('error').hidden = !message;
}

// The masks (Uint8Array [height * width] each, 1 inside) as one translucent layer in the box colour, image-sized.
function maskLayer(masks, width, height) {
    const pixels = new ImageData(width, height);
    for (const { mask } of masks) {
        for (let i = 0; i < mask.length; i++) if (mask[i]) pixels.data.set(MASK_RGBA, i * 4);
    }
    const layer = new OffscreenCanvas(width, height);
    layer.getContext('2d').putImageData(pixels, 0, 0);
    return layer;
}

function draw(image, text = '', masks = []) {
    const canvas = $('canvas');
    const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    const ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(image.toCanvas(), 0, 0, w, h);
    if (masks.length) {
        // Under the outlines and labels, scaled without smoothing (demo/draw.py's nearest resize of the mask).
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(maskLayer(masks, image.width, image.height), 0, 0, w, h);
        ctx.imageSmoothingEnabled = true;
    }
    ctx.lineWidth = 2;
    ctx.font = '14px sans-serif';
    for (const [, locs, label] of text.matchAll(LOC)) {
        // <locY1><locX1><locY2><locX2>, bins of 1024 over each side, decoded as index / 1023 (paligemma.locations).
        const [y1, x1, y2, x2] = [...locs.matchAll(/\d{4}/g)].map((m) => Number(m[0]) / 1023);
        ctx.strokeStyle = ctx.fillStyle = BOX_COLOUR;
        ctx.strokeRect(x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h);
        ctx.fillText(label.trim(), x1 * w + 3, y1 * h + 15);
    }
}

// mask_decoder.onnx, where the model's config.json lists one (python -m export --format transformers.js), run by the
// onnxruntime-web transformers.js bundles: transformers.js 4.3.2 exports neither it nor its session helper, and its
// hook for supplying onnxruntime (globalThis[Symbol.for('onnxruntime')]) leaves its device list empty, so the class
// comes from a session of the loaded model (`sessions`, a public field): one runtime, its WebAssembly already
// compiled, its settings (threads, files) applied. Loaded at the first segmentation answer; on the CPU (wasm)
// whatever the model's device: it is small.
let maskDecoder = null;
function loadMaskDecoder() {
    const entry = state.model.custom_config?.mask_decoder;
    if (!entry) return Promise.resolve(null);
    maskDecoder ??= (async () => {
        const InferenceSession = Object.values(state.model.sessions)[0].constructor;
        const url = new URL(`model/onnx/${entry.file}`, location.href).href;
        const session = await InferenceSession.create(url, { ...state.sessionOptions, executionProviders: ['wasm'] });
        return sessionDecoder(session, (...args) => new Tensor(...args).ort_tensor);
    })();
    maskDecoder.catch(() => { maskDecoder = null; });  // reported by the run; the next one tries again
    return maskDecoder;
}

// [{label, box, mask}] of the answer's segmentation objects (demo/web/segmentation.js), [] when it has none or the
// model folder lists no mask decoder.
async function findMasks(text) {
    if (!text.includes('<seg')) return [];
    const decode = await loadMaskDecoder();
    return decode ? segmentations(text, state.image.width, state.image.height, decode) : [];
}

async function setImage(source, read = RawImage.read(source)) {
    try {
        state.image = await read;
    } catch (e) {
        state.image = null;
        showError(`That file could not be read as an image (${e.message || e}); choose a PNG, JPEG or WebP picture.`);
        return false;
    }
    showError('');
    state.imageSource = source;  // which picture is shown (the tests wait on it)
    draw(state.image);
    return true;
}

async function run(prompt) {
    if (state.busy || !state.image) return null;
    state.busy = true;
    $('run').disabled = true;
    const start = performance.now();
    let firstTokenAt = null;
    let count = 0;
    $('output').textContent = '';
    try {
        // A leading <image> makes the processor expand it to image_seq_length tokens and put <bos> after them.
        const inputs = await state.processor(state.image, '<image>' + prompt);
        state.lastInputs = inputs;
        const streamer = new TextStreamer(state.processor.tokenizer, {
            skip_prompt: true,
            skip_special_tokens: true,
            callback_function: (text) => { $('output').textContent += text; },
            token_callback_function: () => {
                count += 1;
                firstTokenAt ??= performance.now();
            },
        });
        const output = await state.model.generate({ ...inputs, max_new_tokens: MAX_NEW_TOKENS, do_sample: false, streamer });
        const end = performance.now();
        const promptLength = inputs.input_ids.dims.at(-1);
        const tokens = Array.from(output.slice(0, [promptLength, null]).data, Number);
        const text = state.processor.batch_decode(output.slice(null, [promptLength, null]), { skip_special_tokens: true })[0];
        $('output').textContent = text;
        let masks = [];
        try {
            masks = await findMasks(text);
        } catch (e) {
            showError(`The masks could not be decoded (${e.message || e}); the boxes are drawn without them; rebuild the page (python -m demo.web.build --rebuild).`);
        }
        draw(state.image, text, masks);
        const decodeS = (end - firstTokenAt) / 1000;
        const record = {
            prompt, text, tokens, masks, total_ms: end - start, ttft_ms: firstTokenAt - start,
            tokens_per_s: count > 1 ? (count - 1) / decodeS : 0,
        };
        state.runs.push(record);
        $('stats').textContent = `time to first token ${record.ttft_ms.toFixed(0)} ms · ` +
            `${record.tokens_per_s.toFixed(1)} tokens/s · ${tokens.length} tokens in ${record.total_ms.toFixed(0)} ms · ${state.device}`;
        return record;
    } catch (e) {
        showError(`The model could not answer: ${e.message || e}`);
        return null;
    } finally {
        state.busy = false;
        $('run').disabled = false;
    }
}

async function main() {
    const query = new URLSearchParams(location.search);
    const { dtype, threads } = pageOptions(query);
    const exampleList = fetch('examples/examples.json').then((response) => response.json());
    exampleList.catch(() => {});  // awaited below
    state.device = await chooseDevice();
    if (state.device === 'wasm') useWasmBuild('ort-wasm-simd-threaded');
    if (threads) env.backends.onnx.wasm.numThreads = threads;
    const session_options = sessionOptions(query, state.device);
    state.sessionOptions = session_options;
    state.marks.deviceChosen = performance.now();
    // onnxruntime-web fetches and compiles its .wasm when the first session is created: for the model, only once
    // a model file has arrived. A 1 x 1 matmul (one of transformers.js' own small sessions) starts that now, beside
    // the model files' download (demo/web/README.md, "Where the first seconds go").
    const runtimeReady = matmul(new Tensor('float32', [1], [1, 1]), new Tensor('float32', [1], [1, 1])).then(() => {
        state.marks.runtimeReady = performance.now();
    });
    runtimeReady.catch(() => {});  // the model's load reports a runtime that cannot start
    // The model first (the longest), then the processor and the first example, all at once.
    const options = { dtype, session_options };
    const model = PaliGemmaForConditionalGeneration.from_pretrained('model', { ...options, device: state.device });
    model.catch(() => {});  // awaited below
    const processor = AutoProcessor.from_pretrained('model').then((p) => {
        state.marks.processorLoaded = performance.now();
        return p;
    });
    processor.catch(() => {});  // awaited below
    const examples = await exampleList;
    for (const example of examples) {
        $('example').add(new Option(`${example.file} (${example.prompt})`, example.file));
    }
    const firstSource = `examples/${examples[0].file}`;
    const firstImage = RawImage.read(firstSource);
    firstImage.catch(() => {});  // setImage reports it
    try {
        state.model = await model;
    } catch (e) {
        if (state.device === 'wasm') throw e;
        state.device = 'wasm';  // an adapter that cannot run the graphs: WebAssembly instead
        state.model = await PaliGemmaForConditionalGeneration.from_pretrained('model', { ...options, device: 'wasm' });
    }
    state.processor = await processor;
    state.threads = env.backends.onnx.wasm.numThreads;
    state.loadedMs = performance.now();
    $('status').textContent = `Model loaded (${state.device}).`;
    $('example').addEventListener('change', () => setImage(`examples/${$('example').value}`));
    $('upload').addEventListener('change', async () => {
        const file = $('upload').files[0];
        if (file) await setImage(file);
    });
    for (const button of document.querySelectorAll('#presets button')) {
        button.addEventListener('click', () => {
            $('prompt').value = button.dataset.prompt;
            run(button.dataset.prompt);
        });
    }
    $('run').addEventListener('click', () => run($('prompt').value));
    $('run').disabled = false;
    // The first answer, so that a visitor sees the model work without a click.
    await setImage(firstSource, firstImage);
    state.marks.imageShown = performance.now();
    await run($('prompt').value);
    state.firstAnswerMs = performance.now();  // from the page's navigation start
    $('status').textContent = `Model loaded (${state.device}); first answer in ${(state.firstAnswerMs / 1000).toFixed(2)} s.`;
}

main().catch((e) => {
    console.error(e.stack);
    $('status').textContent = 'The model could not be loaded.';
    showError(`${e.message || e}`);
});
