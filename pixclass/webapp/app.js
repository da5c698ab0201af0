// Classifies a photo on the device with the exported ONNX model, preprocessed exactly as
// pixclass does it (meta.json carries the size, crop, channels and mean/std).
"use strict";
const statusEl = document.getElementById("status");
const resultEl = document.getElementById("result");
const preview = document.getElementById("preview");
let session = null;
let meta = null;

if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("sw.js").catch((e) => console.warn("offline mode unavailable:", e.message));
}

async function init() {
  meta = await (await fetch("meta.json")).json();
  ort.env.wasm.wasmPaths = "./";
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a plain static host lacks
  session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  statusEl.textContent = `ready: ${meta.classes.length} classes`;
}

// The source rectangle that becomes the model's input: the whole image ("squash"), or the
// centre crop after resizing the short side to size / crop_pct ("crop"), as in transforms.py.
function sourceBox(w, h, pre) {
  if (pre.resize === "squash") return [0, 0, w, h];
  const scaled = Math.floor(pre.size / pre.crop_pct);
  const ratio = scaled / Math.min(w, h);
  const outW = Math.max(scaled, Math.round(w * ratio)), outH = Math.max(scaled, Math.round(h * ratio));
  const left = Math.floor((outW - pre.size) / 2), top = Math.floor((outH - pre.size) / 2);
  const sx = w / outW, sy = h / outH;
  return [left * sx, top * sy, pre.size * sx, pre.size * sy];
}

function toTensor(bitmap) {
  const pre = meta.preprocess, n = pre.size;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = n;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff"; // transparency over white, as the decoder does
  ctx.fillRect(0, 0, n, n);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  const [sx, sy, sw, sh] = sourceBox(bitmap.width, bitmap.height, pre);
  ctx.drawImage(bitmap, sx, sy, sw, sh, 0, 0, n, n);
  const rgba = ctx.getImageData(0, 0, n, n).data;
  const c = pre.channels, data = new Float32Array(c * n * n);
  for (let i = 0; i < n * n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    const values = c === 1 ? [(r * 299 + g * 587 + b * 114) / 1000] : [r, g, b];
    for (let k = 0; k < c; k++) data[k * n * n + i] = (values[k] / 255 - pre.mean[k]) / pre.std[k];
  }
  return new ort.Tensor("float32", data, [1, c, n, n]);
}

// The abstain score: the graph's feature similarity for a knn_similarity threshold (its second
// output), else the top probability; null where the threshold needs an output the graph lacks.
function abstainScore(probs, similarity) {
  if (meta.abstain == null) return null;
  if (meta.abstain.method === "knn_similarity") return similarity;
  return meta.abstain.method === "max_probability" ? Math.max(...probs) : null;
}

function show(probs, similarity) {
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, 5);
  resultEl.innerHTML = "";
  for (const i of order) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = `<span class="name"></span><span class="bar"><div></div></span><span class="p"></span>`;
    row.querySelector(".name").textContent = meta.classes[i];
    row.querySelector(".bar > div").style.width = `${(100 * probs[i]).toFixed(1)}%`;
    row.querySelector(".p").textContent = probs[i].toFixed(3);
    resultEl.appendChild(row);
  }
  resultEl.dataset.top = meta.classes[order[0]];
  if (meta.thresholds != null) {
    // a multi-label model (sigmoid outputs): every label at or above its threshold (meta.json, tuned
    // on validation images), likeliest first, as predict and the service answer; no abstain
    const labels = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a])
      .filter((i) => probs[i] >= meta.thresholds[i]).map((i) => meta.classes[i]);
    resultEl.dataset.labels = JSON.stringify(labels);
    resultEl.dataset.answer = labels.join(" ");
    resultEl.dataset.unknown = "false";
    resultEl.dataset.score = "";
    return;
  }
  // below the abstain threshold (meta.json, fixed on validation images): "unknown", as predict answers
  const score = abstainScore(probs, similarity);
  const unknown = score != null && score < meta.abstain.threshold;
  resultEl.dataset.answer = unknown ? "unknown" : meta.classes[order[0]];
  resultEl.dataset.unknown = String(unknown);
  resultEl.dataset.score = score == null ? "" : score.toFixed(6);
}

document.getElementById("file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file || !session) return;
  statusEl.textContent = "classifying…";
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    preview.src = URL.createObjectURL(file);
    preview.style.display = "block";
    const output = await session.run({ [session.inputNames[0]]: toTensor(bitmap) });
    const similarity = output.similarity ? output.similarity.data[0] : null;
    show(Array.from(output[session.outputNames[0]].data), similarity);
    statusEl.textContent = meta.thresholds != null
      ? (resultEl.dataset.answer ? `labels: ${resultEl.dataset.answer}` : "no label reaches its threshold")
      : resultEl.dataset.unknown === "true"
      ? `unknown (score ${resultEl.dataset.score.slice(0, 5)}): none of the classes fits well`
      : `top class: ${resultEl.dataset.top}`;
  } catch (e) {
    statusEl.textContent = `could not classify this file: ${e.message}`;
  }
});

init().catch((e) => { statusEl.textContent = `could not load the model: ${e.message}`; });
