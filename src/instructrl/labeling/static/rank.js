// Ranking: drag a card, or focus it and press ArrowUp/ArrowDown (or k/j).
// The hidden "order" field always holds the completion numbers, best first.
(function () {
  "use strict";
  var list = document.getElementById("ranking");
  var order = document.getElementById("order");
  if (!list || !order) return;
  var dragged = null;

  function cards() { return Array.prototype.slice.call(list.querySelectorAll("li.card")); }
  function sync() {
    var cs = cards();
    order.value = cs.map(function (c) { return c.dataset.idx; }).join(",");
    cs.forEach(function (c, i) { c.querySelector(".pos").textContent = (i + 1) + "."; });
  }
  function move(card, delta) {
    var cs = cards(), i = cs.indexOf(card), j = i + delta;
    if (j < 0 || j >= cs.length) return;
    if (delta < 0) list.insertBefore(card, cs[j]); else list.insertBefore(card, cs[j].nextSibling);
    card.focus();
    sync();
  }
  cards().forEach(function (card) {
    card.addEventListener("dragstart", function (e) {
      dragged = card; card.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move"; e.dataTransfer.setData("text/plain", card.dataset.idx);
    });
    card.addEventListener("dragend", function () { card.classList.remove("dragging"); dragged = null; sync(); });
    card.addEventListener("dragover", function (e) {
      if (!dragged || dragged === card) return;
      e.preventDefault();
      var r = card.getBoundingClientRect();
      var after = e.clientY > r.top + r.height / 2;
      list.insertBefore(dragged, after ? card.nextSibling : card);
    });
    card.addEventListener("drop", function (e) { e.preventDefault(); sync(); });
    card.addEventListener("keydown", function (e) {
      if (e.key === "ArrowUp" || e.key === "k") { e.preventDefault(); move(card, -1); }
      else if (e.key === "ArrowDown" || e.key === "j") { e.preventDefault(); move(card, +1); }
    });
  });
  sync();
})();
