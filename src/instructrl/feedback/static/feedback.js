// The task page: autosaved drafts, Likert + flags, ranking by drag and drop or keyboard, A/B choice.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("task-data").textContent);
  const errorBox = document.getElementById("error");
  let dirty = false; // unsaved text in a demonstration

  async function api(path, body, method) {
    let response;
    try {
      response = await fetch(path, {
        method: method || "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
    } catch (err) { // offline, or the server is down; or it stored the answer and its reply was lost
      throw new Error("Could not reach the server. Nothing is lost: your answers are still on this page; submit again in a moment.");
    }
    const reply = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(reply.detail || response.statusText), { status: response.status });
    return reply;
  }
  function showError(message) { errorBox.textContent = message; }
  function goNext() { window.location.href = `/projects/${data.project_id}/next?kind=${data.kind}`; }
  // a retry of an answer or a skip that was stored though its reply was lost gets a 409: the work is in, go on
  async function alreadyStored(err, state) {
    if (err.status !== 409) return false;
    const response = await fetch(`/api/assignments/${data.id}`, { credentials: "same-origin" }).catch(() => null);
    return !!response && response.ok && (await response.json()).state === state;
  }
  let submitting = false; // a double click sends one answer
  async function submit(body) {
    if (submitting) return;
    submitting = true;
    showError("");
    try {
      await api(`/api/assignments/${data.id}/submit`, body);
      dirty = false;
      goNext();
    } catch (err) {
      submitting = false;
      if (await alreadyStored(err, "submitted")) { dirty = false; goNext(); return; }
      showError(err.message);
    }
  }

  window.addEventListener("beforeunload", (event) => {
    if (dirty) { event.preventDefault(); event.returnValue = ""; }
  });

  document.getElementById("skip").addEventListener("click", async () => {
    const reason = document.getElementById("skip-reason").value.trim();
    if (!reason) { showError("Say why you skip this task."); return; }
    try { await api(`/api/assignments/${data.id}/skip`, { reason }); dirty = false; goNext(); }
    catch (err) {
      if (await alreadyStored(err, "skipped")) { dirty = false; goNext(); return; }
      showError(err.message);
    }
  });

  // ---- write: the draft is saved a moment after each change
  if (data.kind === "write") {
    const box = document.getElementById("answer");
    const status = document.getElementById("draft-status");
    let timer = null;
    async function saveDraft() {
      const text = box.value;
      try {
        await api(`/api/assignments/${data.id}/draft`, { text }, "PUT");
        if (box.value === text) { dirty = false; status.textContent = "Draft saved"; }
      } catch (err) { showError(err.message); }
    }
    box.addEventListener("input", () => {
      dirty = true; status.textContent = "Unsaved changes";
      clearTimeout(timer); timer = setTimeout(saveDraft, 1500);
    });
    document.getElementById("submit").addEventListener("click", () => {
      if (!box.value.trim()) { showError("Write an answer first."); return; }
      clearTimeout(timer);
      submit({ text: box.value });
    });
  }

  // ---- rank: scores and flags first, then the ranking
  if (data.kind === "rank") {
    const list = document.getElementById("ranking");
    const rankingSection = document.getElementById("ranking-section");
    const likertOf = (p) => document.querySelector(`input[name="likert-${p}"]:checked`);
    function refreshScoring() {
      const all = [...Array(data.k).keys()].every((p) => likertOf(p));
      if (all) rankingSection.hidden = false;
    }
    document.querySelectorAll("#scoring input[type=radio]").forEach((el) => el.addEventListener("change", refreshScoring));
    document.querySelectorAll(".response").forEach((card) => card.addEventListener("keydown", (event) => {
      if (event.target !== card || !/^[1-7]$/.test(event.key)) return;
      document.getElementById(`likert-${card.dataset.pos}-${event.key}`).checked = true;
      refreshScoring();
    }));

    function refreshRanking() {
      let place = 0;
      [...list.children].forEach((item, i) => {
        const tie = item.querySelector(".tie");
        if (i === 0) tie.checked = false;
        tie.disabled = i === 0;
        if (i > 0 && !tie.checked) place += 1;
        item.classList.toggle("tied", tie.checked);
        item.querySelector(".place").textContent = `${place + 1}.`;
      });
    }
    function ranks() {
      const out = new Array(data.k);
      let place = 0;
      [...list.children].forEach((item, i) => {
        if (i > 0 && !item.querySelector(".tie").checked) place += 1;
        out[Number(item.dataset.pos)] = place;
      });
      return out;
    }
    list.querySelectorAll(".tie").forEach((el) => el.addEventListener("change", refreshRanking));

    // drag and drop: drop above or below the middle of the item under the pointer
    let dragged = null;
    list.addEventListener("dragstart", (event) => {
      dragged = event.target.closest(".rank-item");
      dragged.classList.add("dragging");
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", dragged.dataset.pos);
    });
    list.addEventListener("dragend", () => { if (dragged) dragged.classList.remove("dragging"); dragged = null; refreshRanking(); });
    list.addEventListener("dragover", (event) => { event.preventDefault(); });
    list.addEventListener("drop", (event) => {
      event.preventDefault();
      const target = event.target.closest(".rank-item");
      if (!dragged || !target || target === dragged) return;
      const box = target.getBoundingClientRect();
      list.insertBefore(dragged, event.clientY < box.top + box.height / 2 ? target : target.nextSibling);
      refreshRanking();
    });

    // keyboard: arrows move the focused response, T ties it with the one above
    list.addEventListener("keydown", (event) => {
      const item = event.target.closest(".rank-item");
      if (!item || event.target !== item) return;
      if (event.key === "ArrowUp" && item.previousElementSibling) {
        list.insertBefore(item, item.previousElementSibling);
      } else if (event.key === "ArrowDown" && item.nextElementSibling) {
        list.insertBefore(item.nextElementSibling, item);
      } else if ((event.key === "t" || event.key === "T" || event.key === "=") && item.previousElementSibling) {
        const tie = item.querySelector(".tie"); tie.checked = !tie.checked;
      } else { return; }
      event.preventDefault();
      refreshRanking();
      item.focus();
    });
    refreshRanking();

    document.getElementById("submit").addEventListener("click", () => {
      const likert = [], flags = [];
      for (let p = 0; p < data.k; p++) {
        const chosen = likertOf(p);
        if (!chosen) { showError(`Score response ${String.fromCharCode(65 + p)} first.`); return; }
        likert.push(Number(chosen.value));
        flags.push([...document.querySelectorAll(`.flag[data-pos="${p}"]:checked`)].map((el) => el.value));
      }
      submit({ likert, flags, ranks: ranks(), none_acceptable: document.getElementById("none-acceptable").checked });
    });
  }

  // ---- compare: a click, or a key that picks a button and Enter to press it
  if (data.kind === "compare") {
    document.querySelectorAll(".choice").forEach((button) => button.addEventListener("click", () => submit({ choice: button.dataset.choice })));
    document.addEventListener("keydown", (event) => {
      if (event.target.tagName === "INPUT") return;
      const choice = { ArrowLeft: "left", ArrowRight: "right", "=": "tie" }[event.key];
      // only focus: a stray key must not submit, and a submission cannot be undone
      if (choice) { event.preventDefault(); document.getElementById(`choose-${choice}`).focus(); }
    });
  }
})();
