// The upload page: preview, drag and drop, one POST to /api/predict?explain=1, the answer.
"use strict";

// What a status means when the server (or a proxy) answers without a JSON error.
const STATUS_MESSAGES = {
  400: "The image could not be read.",
  413: "The file is too large.",
  415: "This file type is not supported.",
};

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("file");
  const dropZone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const button = document.getElementById("submit");
  const status = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const result = document.getElementById("result");
  const maxBytes = Number(form.dataset.maxBytes);
  let previewUrl = null;

  // Server errors are lower-case phrases ("the uploaded file is empty"): shown as sentences.
  function sentence(text) {
    const capitalised = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(capitalised) ? capitalised : `${capitalised}.`;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    result.hidden = true;
  }

  function clearMessages() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    status.textContent = "";
  }

  function showPreview(file) {
    clearMessages();
    result.hidden = true;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
  }

  // A file the browser cannot display (e.g. TIFF) has no preview; it can still be checked.
  preview.addEventListener("error", () => { preview.hidden = true; });

  // What the shown probability means: calibrated to a melanoma share, or the raw network output.
  function probabilityMeaning(model) {
    if (model.calibrated) {
      const share = (model.melanoma_share * 100).toFixed(0);
      return `Calibrated: about the chance of melanoma among lesions like the validation images, of which ${share}% were melanomas.`;
    }
    return "Not calibrated: this model's output is a score, not a chance of melanoma.";
  }

  function showResult(answer) {
    const percent = (answer.probability * 100).toFixed(1);
    // reliable: true, false, or null when this model cannot tell (no out-of-distribution score).
    const judgeable = answer.reliable !== false;
    document.getElementById("result-label").textContent = judgeable ? answer.label : "Cannot judge this image";
    result.dataset.label = !judgeable ? "cannot-judge" : answer.label === "Melanoma" ? "melanoma" : "non-melanoma";
    document.getElementById("cannot-judge").hidden = judgeable;
    document.getElementById("probability-meaning").textContent = probabilityMeaning(answer.model);
    document.getElementById("probability").textContent = `${percent}%`;
    document.getElementById("bar-fill").style.width = `${percent}%`;
    document.getElementById("bar-threshold").style.left = `${answer.threshold * 100}%`;
    document.getElementById("threshold").textContent = `${(answer.threshold * 100).toFixed(1)}%`;
    const warnings = document.getElementById("warnings");
    const notes = answer.reliable === null ? [...answer.warnings, ...answer.reasons] : answer.warnings;
    warnings.replaceChildren(...notes.map((text) => {
      const item = document.createElement("li");
      item.textContent = sentence(text);
      return item;
    }));
    document.getElementById("heatmap").src = answer.heatmap;
    result.hidden = false;
    status.textContent = `Answered in ${Math.round(answer.timing_ms.total)} ms.`;
  }

  async function readAnswer(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      return { error: STATUS_MESSAGES[response.status] || `The server answered ${response.status}.` };
    }
  }

  input.addEventListener("change", () => {
    if (input.files.length) showPreview(input.files[0]);
  });

  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    if (!event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files;
    showPreview(input.files[0]);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessages();
    const file = input.files[0];
    if (!file) return showError("Choose an image first.");
    if (file.size > maxBytes) {
      return showError(`The file is too large: the limit is ${form.dataset.maxMb} MB.`);
    }
    const body = new FormData();
    body.append("file", file);
    button.disabled = true;
    status.textContent = "Checking the image…";
    try {
      const response = await fetch(form.action, { method: "POST", body });
      const answer = await readAnswer(response);
      if (response.ok) {
        showResult(answer);
      } else {
        status.textContent = "";
        showError(sentence(answer.error || "the check failed"));
      }
    } catch {
      status.textContent = "";
      showError("The server could not be reached. Is app.py still running?");
    } finally {
      button.disabled = false;
    }
  });
});
