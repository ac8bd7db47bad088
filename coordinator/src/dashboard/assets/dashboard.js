// Capstan dashboard: the live parts. Pages work without this file; it only
// keeps them current (Server-Sent Events) and ticks running durations.
"use strict";

function fmt(ms) {
  ms = Math.max(0, ms);
  if (ms < 1000) return ms + "ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + "s";
  if (ms < 3600000) {
    const s = Math.floor((ms % 60000) / 1000);
    return Math.floor(ms / 60000) + "m" + (s < 10 ? "0" : "") + s + "s";
  }
  const m = Math.floor((ms % 3600000) / 60000);
  return Math.floor(ms / 3600000) + "h" + (m < 10 ? "0" : "") + m + "m";
}

function tick() {
  const now = Date.now();
  document.querySelectorAll("[data-since]").forEach((el) => {
    el.textContent = fmt(now - Number(el.dataset.since));
  });
}

// Every element with data-live="URL" is replaced by the HTML the server sends.
function live(el) {
  const es = new EventSource(el.dataset.live);
  es.addEventListener("html", (e) => {
    el.innerHTML = e.data;
    tick();
  });
  es.addEventListener("end", () => es.close());
  es.addEventListener("failed", (e) => stopped(el, es, e.data));
  // A refused reconnect (a follower's 503, a logged-out session) closes
  // the source for good: say so rather than look live.
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) stopped(el, es, "the server refused to go on; reload the page");
  };
}

function stopped(el, es, why) {
  es.close();
  el.insertAdjacentHTML("afterbegin", '<p class="error"></p>');
  el.firstChild.textContent = "Live updates stopped: " + why;
}

// The log page: lines are appended as the step prints them; the view
// follows the end unless the reader scrolled up.
function follow(log) {
  const es = new EventSource(log.dataset.follow);
  const note = document.getElementById("following");
  es.addEventListener("lines", (e) => {
    const atEnd = window.innerHeight + window.scrollY >= document.body.offsetHeight - 40;
    log.insertAdjacentHTML("beforeend", e.data);
    if (atEnd) window.scrollTo(0, document.body.scrollHeight);
  });
  es.addEventListener("attempt", (e) => {
    es.close();
    const url = new URL(window.location.href);
    url.searchParams.set("attempt", e.data);
    window.location.replace(url.toString());
  });
  es.addEventListener("end", () => {
    es.close();
    if (note) note.textContent = "The attempt ended; this is its whole log.";
  });
  es.addEventListener("failed", (e) => {
    es.close();
    if (note) note.textContent = "Following stopped: " + e.data;
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED && note) {
      note.textContent = "Following stopped: the server refused to go on; reload the page";
    }
  };
}

// The line a #L120 link names, marked (and kept marked as lines arrive).
function markTarget() {
  document.querySelectorAll("#log .l.target").forEach((el) => el.classList.remove("target"));
  if (!window.location.hash.startsWith("#L")) return;
  const line = document.getElementById(window.location.hash.slice(1));
  if (line) {
    line.classList.add("target");
    line.scrollIntoView({ block: "center" });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(live);
  const log = document.getElementById("log");
  if (log && log.dataset.follow) follow(log);
  markTarget();
  window.addEventListener("hashchange", markTarget);
  tick();
  setInterval(tick, 1000);
});
