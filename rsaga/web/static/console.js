// Live refresh: every few seconds, fetch this page's <main> again and swap it in, unless the
// operator is typing in a form or has a <details> open. No framework, no CDN: it must work offline.
(function () {
  "use strict";
  function busy(main) {
    var active = document.activeElement;
    return (active && main.contains(active) && /INPUT|SELECT|TEXTAREA/.test(active.tagName)) ||
      main.querySelector("details[open]") !== null;
  }
  function schedule() {
    var main = document.querySelector("main[data-refresh]");
    if (!main) return;
    var seconds = parseFloat(main.getAttribute("data-refresh")) || 5;
    setTimeout(function () {
      if (document.hidden || busy(main)) { schedule(); return; }
      fetch(window.location.href, { headers: { "X-Rsaga-Fragment": "1" }, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
          if (next) { main.replaceWith(next); }
        })
        .catch(function () { /* keep the last good page; try again next tick */ })
        .then(schedule);
    }, seconds * 1000);
  }
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
  document.addEventListener("DOMContentLoaded", schedule);
})();
