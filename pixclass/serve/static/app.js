// The upload page: send images to /v1/predict, show the top classes as bars, and on request the
// Grad-CAM overlay from /v1/explain. Everything is served by the app itself (no CDN).
"use strict";
const results = document.getElementById("results");
const errorEl = document.getElementById("error");
const camToggle = document.getElementById("cam");
const tokenInput = document.getElementById("token");

function headers() {
  const t = tokenInput.value || localStorage.getItem("pixclass-token");
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function loadModel() {
  const r = await fetch("/v1/model", { headers: headers() });
  if (r.status === 401) { document.getElementById("token-row").hidden = false; return; }
  const m = await r.json();
  document.getElementById("model").textContent = `${m.name} · ${m.classes.length} classes · v${m.version}`;
}

function bars(topK) {
  const box = document.createElement("div");
  box.className = "bars";
  for (const { class: name, probability } of topK) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = '<span class="name"></span><span class="bar"><div></div></span><span class="p"></span>';
    row.querySelector(".name").textContent = name;
    row.querySelector(".bar div").style.width = `${(probability * 100).toFixed(1)}%`;
    row.querySelector(".p").textContent = probability.toFixed(3);
    box.appendChild(row);
  }
  return box;
}

async function classify(file) {
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  card.appendChild(img);
  results.prepend(card);
  const form = new FormData();
  form.append("files", file, file.name);
  const r = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
  const body = await r.json();
  if (!r.ok) { card.remove(); errorEl.textContent = `${file.name}: ${body.detail || body.error}`; return; }
  const prediction = body.predictions[0];
  card.dataset.top = prediction.top_k[0].class;
  card.dataset.answer = prediction.answer;
  if (prediction.unknown) { // below the model's abstain threshold: unlike the images it was trained on
    const note = document.createElement("p");
    note.className = "unknown";
    note.textContent = `unknown (score ${prediction.score.toFixed(3)}): none of the classes fits well`;
    card.appendChild(note);
  }
  card.appendChild(bars(prediction.top_k));
  if (camToggle.checked) {
    const f = new FormData();
    f.append("file", file, file.name);
    const e = await fetch("/v1/explain", { method: "POST", body: f, headers: headers() });
    if (e.ok) { img.src = URL.createObjectURL(await e.blob()); img.classList.add("cam"); }
  }
}

async function handle(fileList) {
  errorEl.textContent = "";
  for (const file of fileList) await classify(file);
}

for (const id of ["files", "camera"]) {
  document.getElementById(id).addEventListener("change", (e) => handle(e.target.files));
}
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handle(e.dataTransfer.files); });
tokenInput.addEventListener("change", () => { localStorage.setItem("pixclass-token", tokenInput.value); loadModel(); });
loadModel();
