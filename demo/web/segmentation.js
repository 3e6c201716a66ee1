// Segmentation answers in the page (and in Node: demo/web/segment.mjs), as paligemma.parse_segmentations reads
// them: each well-formed object's box in whole pixels, its 16 codes decoded to 64 x 64 logits by mask_decoder.onnx,
// the logits resized into the box with Pillow's bilinear filter and a pixel in the mask where the result is > 0.
// tests/test_web_segmentation.py checks the masks equal the Python ones. No DOM, no imports.

export const MASK_SIZE = 64;
export const NUM_MASK_CODES = 16;
const NUM_LOC_BINS = 1024;
const NUM_SEG_CODES = 128;
// paligemma.locations.STRICT_BOX: four location tokens, any run of segmentation tokens, a label up to ";" or the end.
const STRICT_BOX = /((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>)*)\s*([^;<]*?)\s*(?:;|$)/g;

/** [{bins: [yMin, xMin, yMax, xMax], codes (16), label}] of each well-formed mask (paligemma.locations.parse_masks:
 * bins in 0..1023 with yMax > yMin and xMax > xMin, exactly 16 codes each in 0..127). */
export function parseMasks(text) {
    const masks = [];
    for (const [, locs, segs, label] of text.matchAll(STRICT_BOX)) {
        const bins = [...locs.matchAll(/<loc(\d{4})>/g)].map((m) => Number(m[1]));
        const codes = [...segs.matchAll(/<seg(\d{3})>/g)].map((m) => Number(m[1]));
        if (codes.length === NUM_MASK_CODES && codes.every((c) => c < NUM_SEG_CODES)
            && bins.every((b) => b < NUM_LOC_BINS) && bins[2] > bins[0] && bins[3] > bins[1]) {
            masks.push({ bins, codes, label: label.trim() });
        }
    }
    return masks;
}

/** The box in pixels (xMin, yMin, xMax, yMax) of location bins (y, x order), each decoded as index / 1023. */
export function boxInPixels(bins, width, height) {
    const [y1, x1, y2, x2] = bins.map((b) => b / (NUM_LOC_BINS - 1));
    return [x1 * width, y1 * height, x2 * width, y2 * height];
}

// Pillow's resampling (libImaging/Resample.c, precompute_coeffs) with its bilinear filter: output pixel centres at
// (i + 0.5) * scale, the triangle widened by the scale when shrinking, weights normalized to sum 1.
function bilinearTaps(inSize, outSize) {
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    const support = filterScale;  // the bilinear filter's support (1) times filterScale
    const inverse = 1 / filterScale;  // Pillow multiplies by it (dividing can differ in the last bit)
    const taps = [];
    for (let i = 0; i < outSize; i++) {
        const center = (i + 0.5) * scale;
        const first = Math.max(0, Math.trunc(center - support + 0.5));
        const end = Math.min(inSize, Math.trunc(center + support + 0.5));
        const weights = [];
        let total = 0;
        for (let x = first; x < end; x++) {
            const w = Math.max(0, 1 - Math.abs((x - center + 0.5) * inverse));
            weights.push(w);
            total += w;
        }
        taps.push({ first, weights: total !== 0 ? weights.map((w) => w / total) : weights });
    }
    return taps;
}

/** Float32Array [outHeight * outWidth]: `source` [height * width] resized as Pillow resizes a float ("F") image
 * with Image.BILINEAR: horizontal pass then vertical, sums in double, each pass stored as float32. */
export function resizeBilinear(source, width, height, outWidth, outHeight) {
    let rows = source;
    if (outWidth !== width) {
        const taps = bilinearTaps(width, outWidth);
        rows = new Float32Array(outWidth * height);
        for (let y = 0; y < height; y++) {
            for (let x = 0; x < outWidth; x++) {
                const { first, weights } = taps[x];
                let sum = 0;
                for (let k = 0; k < weights.length; k++) sum += source[y * width + first + k] * weights[k];
                rows[y * outWidth + x] = sum;
            }
        }
    }
    if (outHeight === height) return Float32Array.from(rows);
    const taps = bilinearTaps(height, outHeight);
    const out = new Float32Array(outWidth * outHeight);
    for (let y = 0; y < outHeight; y++) {
        const { first, weights } = taps[y];
        for (let x = 0; x < outWidth; x++) {
            let sum = 0;
            for (let k = 0; k < weights.length; k++) sum += rows[(first + k) * outWidth + x] * weights[k];
            out[y * outWidth + x] = sum;
        }
    }
    return out;
}

/** Uint8Array [height * width], 1 inside the mask: the 64 x 64 logits resized into the box's whole pixels (each
 * coordinate truncated, as Python's int()), > 0. An empty box gives an empty mask. */
export function pasteMask(logits, box, width, height) {
    const [x0, y0, x1, y1] = box.map(Math.trunc);
    const mask = new Uint8Array(width * height);
    if (x1 > x0 && y1 > y0) {
        const resized = resizeBilinear(logits, MASK_SIZE, MASK_SIZE, x1 - x0, y1 - y0);
        for (let y = y0; y < y1; y++) {
            for (let x = x0; x < x1; x++) mask[y * width + x] = resized[(y - y0) * (x1 - x0) + (x - x0)] > 0 ? 1 : 0;
        }
    }
    return mask;
}

/** [{label, box, mask}] of each well-formed mask in `text` for a width x height image. `decode(codes)` takes a
 * BigInt64Array [n * 16] and resolves to Float32Array logits [n * 64 * 64] (mask_decoder.onnx's codes ->
 * mask_logits); it is not called when there is no mask. */
export async function segmentations(text, width, height, decode) {
    const found = parseMasks(text);
    if (!found.length) return [];
    const logits = await decode(BigInt64Array.from(found.flatMap((m) => m.codes), BigInt));
    const area = MASK_SIZE * MASK_SIZE;
    return found.map(({ bins, label }, i) => {
        const box = boxInPixels(bins, width, height);
        return { label, box, mask: pasteMask(logits.subarray(i * area, (i + 1) * area), box, width, height) };
    });
}

/** A `decode` for segmentations() running `session` (an onnxruntime InferenceSession of mask_decoder.onnx);
 * `tensor(type, data, dims)` makes an input tensor of that runtime. */
export function sessionDecoder(session, tensor) {
    return async (codes) => {
        const feeds = { codes: tensor('int64', codes, [codes.length / NUM_MASK_CODES, NUM_MASK_CODES]) };
        const { mask_logits: logits } = await session.run(feeds);
        return logits.data;
    };
}
