// The web page of `mvit serve`: choose images and heads, send each image to v1/predict on its own
// (so one unreadable file does not block the others), show each head's answer and the attention map.
// Plain DOM, no framework and no build step. Every URL is relative, so the page also works under a
// reverse proxy's path prefix; nothing is loaded from anywhere else (the server's CSP forbids it).
// Text from the server or from file names only ever goes in through textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "mvit-token"; // sessionStorage: the token lives as long as the browser tab
  const PARALLEL = 3; // images in flight at once: the server batches them anyway, more would only queue
  const RETRIES = 3; // a 503 (busy) is retried this many times, after the Retry-After it gives
  const NETWORK_FAILURE = "Could not reach the mvit server: check that it is still running, then press Classify again.";

  const $ = (id) => document.getElementById(id);
  const state = {
    files: [], // the File objects chosen or dropped
    heads: new Map(), // name -> its description from v1/heads, in the model's order
    limits: null,
    loadingHeads: null, // the v1/heads request in flight, shared by whoever asks meanwhile
    run: 0, // which Classify press the cards on screen belong to
    urls: [], // object URLs to revoke when the cards go
  };

  // ---- small helpers ---------------------------------------------------------------------------

  // Children without the nulls that stand for "nothing here".
  const present = (children) => children.filter((child) => child !== null && child !== undefined);

  // An element with attributes (`class`, `text`, and `data-*` and aria attributes as named) and children.
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    node.append(...present(children));
    return node;
  }

  const fixed = (p) => p.toFixed(3);
  const mib = (bytes) => (bytes / 2 ** 20).toPrecision(3);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const plural = (n, word) => `${n} ${n === 1 ? word : word.replace(/y$/, "ie") + "s"}`;

  function objectUrl(blob) {
    const url = URL.createObjectURL(blob);
    state.urls.push(url);
    return url;
  }

  function say(text) {
    $("status").textContent = text;
  }

  // ---- talking to the API ----------------------------------------------------------------------

  class Refusal extends Error {
    constructor(status, sentence, retryAfter = null) {
      super(sentence);
      this.status = status; // 0: no answer at all
      this.retryAfter = retryAfter;
    }
  }

  function authorization() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  // The response when it is 2xx; otherwise a Refusal carrying the server's one sentence.
  async function call(path, init = {}) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: authorization(), cache: "no-store" });
    } catch {
      throw new Refusal(0, NETWORK_FAILURE);
    }
    if (response.ok) return response;
    let sentence = `The server answered ${response.status} ${response.statusText}`.trim() + ".";
    try { // mvit's refusals are {"error": sentence}; a proxy in front of it may answer otherwise
      const body = await response.json();
      if (body && typeof body.error === "string") sentence = body.error;
    } catch { /* not JSON: keep the status line */ }
    throw new Refusal(response.status, sentence, response.headers.get("Retry-After"));
  }

  // `attempt()`, tried again after Retry-After while the server says it is busy (503).
  async function patiently(attempt, waiting) {
    for (let tries = 0; ; tries++) {
      try {
        return await attempt();
      } catch (error) {
        if (!(error instanceof Refusal) || error.status !== 503 || tries >= RETRIES) throw error;
        const seconds = Math.min(Math.max(Number(error.retryAfter) || 1, 1), 30);
        waiting(seconds);
        await sleep(seconds * 1000);
      }
    }
  }

  // A refusal in words for the person at the page.
  function explain(error) {
    if (!(error instanceof Refusal)) return `Something went wrong in this page: ${error.message}`;
    if (error.status === 401) { // the server's sentence speaks of headers; here there is a field for it
      $("token-row").hidden = false;
      return sessionStorage.getItem(TOKEN_KEY) ? "The server did not accept this access token: check it and enter it again."
        : "This server needs its access token: enter it above.";
    }
    if (error.status === 503) { // already retried after each Retry-After
      return `The server stayed busy with other images after ${plural(RETRIES, "retry")}: press Classify to try again in a moment.`;
    }
    return error.message;
  }

  // ---- the heads -------------------------------------------------------------------------------

  // The heads, loaded once (the model does not change while the server runs); true when they are.
  function loadHeads() {
    if (state.heads.size) return Promise.resolve(true);
    state.loadingHeads ??= fetchHeads().finally(() => { state.loadingHeads = null; });
    return state.loadingHeads;
  }

  async function fetchHeads() {
    const status = $("heads-status");
    status.hidden = false;
    status.classList.remove("error");
    status.textContent = "Loading the model's heads…";
    let body;
    try {
      body = await (await call("v1/heads")).json();
    } catch (error) {
      status.textContent = explain(error);
      status.classList.add("error");
      return false;
    }
    state.heads = new Map(body.heads.map((head) => [head.name, head]));
    state.limits = body.limits;
    $("abstain-row").hidden = !body.gate; // abstaining needs the out-of-distribution gate
    const sites = body.sites || [];
    $("site-row").hidden = sites.length === 0;
    $("site").append(...sites.map((site) =>
      el("option", { value: site.name, text: `${site.name} (${site.heads.join(", ")}; ${site.images} images)` })));
    const list = $("head-list");
    list.replaceChildren(...body.heads.map((head, index) => {
      const id = `head-${index}`;
      return el("div", { class: "head-option" },
        el("input", { type: "checkbox", id, name: "head", value: head.name, checked: true }),
        el("label", { for: id },
          el("span", { class: "head-name", text: head.name }),
          el("span", { class: "head-classes", text: head.classes.join(" · ") }),
          head.description ? el("span", { class: "head-description", text: head.description }) : null));
    }));
    status.hidden = true;
    return true;
  }

  function chosenHeads() {
    return [...document.querySelectorAll("#head-list input[name=head]:checked")].map((box) => box.value);
  }

  // ---- choosing images ---------------------------------------------------------------------------

  function choose(files) {
    state.files = [...files];
    const names = state.files.map((file) => file.name).join(", ");
    $("chosen").textContent = state.files.length ? `${plural(state.files.length, "image")} chosen: ${names}` : "No images chosen.";
  }

  function wireChoosing() {
    const input = $("file-input");
    const zone = $("drop-zone");
    input.addEventListener("change", () => choose(input.files));
    zone.addEventListener("click", () => input.click());
    zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault(); // Space would scroll the page; Enter would submit the form
        input.click();
      }
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      if (!event.dataTransfer.files.length) return;
      input.files = event.dataTransfer.files; // so the input shows what was dropped, not what was picked before
      choose(input.files);
    });
    // A file dropped beside the zone would make the browser open it and leave the results behind.
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  }

  // ---- the cards ---------------------------------------------------------------------------------

  function clearResults() {
    for (const card of document.querySelectorAll("#results .result")) card.remove();
    state.urls.forEach((url) => URL.revokeObjectURL(url));
    state.urls = [];
  }

  function makeCard(file, index, heads) {
    const id = `result-${index}`;
    const thumb = el("img", { class: "thumb", src: objectUrl(file), alt: `The image ${file.name} as uploaded` });
    // Not an image this browser can show (or not an image at all): the answers and the map may still come.
    thumb.addEventListener("error", () => { thumb.hidden = true; thumb.closest(".result")?.classList.add("no-thumb"); });
    const select = el("select", { id: `${id}-overlay-head`, class: "overlay-head" },
      ...heads.map((head) => el("option", { value: head, text: head })));
    const overlay = el("div", { class: "overlay-box", hidden: true },
      el("p", { class: "overlay-choice" },
        el("label", { for: select.id, text: "Attention map for head " }), select),
      el("img", { class: "overlay", alt: "" }),
      el("p", { class: "overlay-caption muted" }));
    const card = el("article", { class: "result", "data-file": file.name, "aria-labelledby": `${id}-name` },
      el("header", { class: "result-header" },
        el("h3", { id: `${id}-name`, text: file.name }),
        el("span", { class: "card-status muted", text: "Waiting…" })),
      el("div", { class: "result-body" },
        el("div", { class: "pictures" }, thumb, overlay),
        el("div", { class: "answers" })));
    $("results").append(card);
    return { file, card, select, overlays: new Map() };
  }

  function cardStatus(job, text) {
    job.card.querySelector(".card-status").textContent = text;
  }

  function showError(job, sentence) {
    cardStatus(job, "Not classified");
    job.card.classList.add("refused");
    job.card.querySelector(".answers").replaceChildren(el("p", { class: "error", role: "alert", text: sentence }));
  }

  // One head's answer: the label, each class's probability, the threshold, whether it is calibrated.
  function answer(record) {
    const head = state.heads.get(record.head) || {};
    const positive = record.threshold !== null && head.positive ? head.positive : null;
    const rows = Object.entries(record.probabilities).map(([name, p]) => {
      const fill = el("span", { class: "bar-fill" });
      fill.style.width = `${(p * 100).toFixed(1)}%`; // CSSOM, which the CSP allows (a style attribute it would not)
      const bar = el("span", { class: "bar" }, fill);
      if (name === positive) { // where the binary head's decision flips, drawn on the positive class's bar
        const mark = el("span", { class: "bar-threshold" });
        mark.style.left = `${(record.threshold * 100).toFixed(1)}%`;
        bar.append(mark);
      }
      return el("tr", { class: name === record.label ? "decided" : null, "data-class": name },
        el("th", { scope: "row", text: name }),
        el("td", { class: "bar-cell", "aria-hidden": "true" }, bar),
        el("td", { class: "num", text: fixed(p) }));
    });
    const abstained = record.probability === null;
    const dataset = head.dataset && head.dataset !== record.head ? el("span", { class: "muted", text: ` · ${head.dataset}` }) : null;
    const site = record.site ? el("span", { class: "site-tag", text: ` · site ${record.site}` }) : null;
    return el("section", { class: "answer", "data-head": record.head },
      el("h4", {}, el("span", { text: record.head }), dataset, site),
      el("p", { class: "decision" },
        el("span", { class: "label", "data-head": record.head, text: record.label }),
        abstained ? el("span", { class: "muted", text: "(abstained)" })
          : el("span", { class: "label-p", text: `p = ${fixed(record.probability)}` })),
      el("table", { class: "probs" },
        el("caption", { class: "visually-hidden", text: `Probability of each class from head ${record.head}` }),
        el("tbody", {}, ...rows)),
      positive ? el("p", { class: "rule" },
        el("span", { text: `Decides ${positive} at p(${positive}) ≥ ${fixed(record.threshold)}` }),
        head.threshold_target && !record.site ? el("span", { class: "muted", text: ` (chosen for ${head.threshold_target})` }) : null) : null,
      el("p", { class: head.calibrated ? "calibration muted" : "calibration uncalibrated" },
        head.calibrated ? `Calibrated (temperature ${head.temperature.toFixed(2)}).`
          : "Not calibrated for these weights: read its probabilities and threshold as rough."));
  }

  function showAnswers(job, records) {
    const answers = job.card.querySelector(".answers");
    const unfamiliar = records.some((record) => record.in_distribution === false);
    answers.replaceChildren(...present([
      unfamiliar ? el("p", { class: "warning", "data-ood-score": records[0].ood_score },
        el("strong", { text: "This image does not look like the images the model was trained on. " }),
        "Its answers are unreliable; do not rely on them.") : null,
      ...records.map(answer)]));
    cardStatus(job, unfamiliar ? "Unlike the training images" : "Classified");
  }

  // The attention map of `head` over the image, fetched once per head and kept while the card lives.
  async function showOverlay(job, head, run) {
    const box = job.card.querySelector(".overlay-box");
    const img = box.querySelector("img.overlay");
    const caption = box.querySelector(".overlay-caption");
    box.hidden = false;
    box.querySelector(".error")?.remove();
    job.wanted = head; // a slower answer for a head no longer chosen must not replace this one
    let found = job.overlays.get(head);
    if (!found) {
      caption.textContent = `Computing where head ${head} looked…`;
      img.classList.add("pending");
      const form = new FormData();
      form.append("image", job.file, job.file.name);
      form.append("head", head);
      if (job.site) form.append("site", job.site); // the site that answered, not whatever is chosen now
      try {
        const response = await patiently(() => call("v1/attention", { method: "POST", body: form }),
          (seconds) => { caption.textContent = `The server is busy; asking again in ${seconds} s…`; });
        const explains = decodeURIComponent(response.headers.get("X-Mvit-Class") || "its decision");
        found = { url: objectUrl(await response.blob()), explains };
        job.overlays.set(head, found);
      } catch (error) {
        if (run !== state.run || job.wanted !== head) return;
        caption.textContent = "";
        img.classList.remove("pending");
        box.append(el("p", { class: "error", role: "alert", text: `No attention map: ${explain(error)}` }));
        return;
      }
    }
    if (run !== state.run || job.wanted !== head) return;
    img.src = found.url;
    img.alt = `Attention map of head ${head} over ${job.file.name}: where the model looked to explain the class ${found.explains}.`;
    img.dataset.head = head;
    img.dataset.class = found.explains;
    img.classList.remove("pending");
    caption.textContent = `Where head ${head} looked to explain ${found.explains}.`;
  }

  async function classifyOne(job, heads, abstain, run) {
    const limit = state.limits && state.limits.max_upload_bytes;
    if (limit && job.file.size > limit) { // refused here rather than after uploading it all
      showError(job, `${job.file.name} is ${mib(job.file.size)} MiB, over this server's limit of ${mib(limit)} MiB.`);
      return false;
    }
    const form = new FormData();
    form.append("images", job.file, job.file.name);
    heads.forEach((head) => form.append("head", head));
    if (abstain) form.append("abstain", "true");
    job.site = $("site").value;
    if (job.site) form.append("site", job.site);
    cardStatus(job, "Classifying…");
    let records;
    try {
      records = await patiently(async () => (await call("v1/predict", { method: "POST", body: form })).json(),
        (seconds) => cardStatus(job, `The server is busy; trying again in ${seconds} s…`));
    } catch (error) {
      if (run === state.run) showError(job, explain(error));
      return false;
    }
    if (run !== state.run) return false;
    showAnswers(job, records);
    job.select.addEventListener("change", () => showOverlay(job, job.select.value, run));
    await showOverlay(job, heads[0], run);
    return true;
  }

  // `work` over `items`, at most `size` at a time; its results in the items' order.
  async function pooled(items, size, work) {
    const results = [];
    let next = 0;
    const worker = async () => {
      while (next < items.length) {
        const index = next++;
        results[index] = await work(items[index]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(size, items.length) }, worker));
    return results;
  }

  async function classify(event) {
    event.preventDefault();
    if (!state.heads.size && !(await loadHeads())) {
      say("The heads could not be loaded, so nothing was sent.");
      return;
    }
    const heads = chosenHeads();
    if (!state.files.length) return say("Choose one or more images first.");
    if (!heads.length) return say("Choose at least one head.");
    const run = ++state.run;
    clearResults();
    $("results-empty").hidden = true;
    const jobs = state.files.map((file, index) => makeCard(file, index, heads));
    say(`Classifying ${plural(jobs.length, "image")}…`);
    const done = await pooled(jobs, PARALLEL, (job) => classifyOne(job, heads, $("abstain").checked, run));
    if (run !== state.run) return;
    const refused = done.filter((ok) => !ok).length;
    say(`Done: ${plural(jobs.length - refused, "image")} classified${refused ? `, ${refused} not` : ""}.`);
  }

  // ---- start -------------------------------------------------------------------------------------

  async function start() {
    wireChoosing();
    $("classify-form").addEventListener("submit", classify);
    const token = $("token");
    token.value = sessionStorage.getItem(TOKEN_KEY) || "";
    token.addEventListener("input", () => {
      const value = token.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    });
    // Load the heads once the token is entered, unless the person went straight on to Classify (which
    // loads them itself): the heads appearing under a half-done click would move the button away.
    token.addEventListener("change", () => setTimeout(() => {
      if (document.activeElement !== $("classify")) loadHeads();
    }, 0));
    let health;
    try {
      health = await (await call("healthz")).json();
    } catch (error) {
      $("heads-status").textContent = explain(error);
      $("heads-status").classList.add("error");
      return;
    }
    $("token-row").hidden = !health.token_required;
    if (health.token_required && !token.value) {
      $("heads-status").textContent = "Enter the access token to load the model's heads.";
      return;
    }
    await loadHeads();
  }

  start();
})();
