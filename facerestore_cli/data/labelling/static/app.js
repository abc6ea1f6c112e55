// The labelling page: show the pair the server gives, send the answer, show the next one.
"use strict";

let current = null;   // id of the pair on screen
let busy = false;     // an answer is on its way: ignore further clicks and keys

const $ = (id) => document.getElementById(id);

function show(state) {
  const seen = state.labelled + state.skipped;
  $("progress").textContent = `${state.labelled} labelled, ${state.skipped} skipped, ${state.total - seen} to go (of ${state.total})`;
  if (!state.pair) {
    current = null;
    $("pair").hidden = true;
    $("done").hidden = false;
    return;
  }
  current = state.pair.id;
  $("left").src = state.pair.left;
  $("right").src = state.pair.right;
  $("caption").hidden = !state.pair.caption;
  $("caption").textContent = state.pair.caption ? `caption: ${state.pair.caption}` : "";
  $("pair").dataset.id = String(current);
  $("pair").hidden = false;
}

function fail(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function load() {
  const res = await fetch("/api/state");
  show(await res.json());
}

async function answer(choice) {
  if (busy || current === null) return;
  busy = true;
  try {
    const res = await fetch("/api/label", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id: current, choice: choice}),
    });
    const body = await res.json();
    if (!res.ok) fail(body.error || `error ${res.status}`);
    else { $("error").hidden = true; show(body); }
  } catch (err) {
    fail(`the labelling server cannot be reached (${err})`);
  } finally {
    busy = false;
  }
}

const KEYS = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "0": "tie", "ArrowDown": "tie", "s": "skip"};

document.addEventListener("keydown", (e) => {
  if (KEYS[e.key]) { e.preventDefault(); answer(KEYS[e.key]); }
});
for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => answer(b.dataset.choice));
}
load().catch((err) => fail(`cannot load the pairs (${err})`));
