// Generation progress on the project page: poll the JSON endpoint while a job runs.
(function () {
  "use strict";
  var st = document.getElementById("gen-status");
  if (!st) return;
  function tick() {
    fetch(st.dataset.url, { headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (j) {
        st.textContent = j.status;
        var bar = document.getElementById("gen-progress");
        bar.max = j.total || 1; bar.value = j.done;
        document.getElementById("gen-count").textContent = j.done + "/" + j.total;
        document.getElementById("gen-error").textContent = j.error || "";
        if (j.status === "running") setTimeout(tick, 1000);
        else if (j.status === "done" && st.dataset.wasRunning) location.reload();
        if (j.status === "running") st.dataset.wasRunning = "1";
      });
  }
  tick();
})();
