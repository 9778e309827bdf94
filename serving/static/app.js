// Upload page: post the chosen photo to /predict and show the answer in place.
// Without JavaScript the form posts to "/" and the server renders the same answer.
(function () {
  "use strict";
  var form = document.getElementById("upload");
  var input = document.getElementById("file");
  var preview = document.getElementById("preview");
  var result = document.getElementById("result");
  var button = document.getElementById("submit");
  if (!form || !window.fetch || !window.FormData) { return; }

  function pct(x) { return (x * 100).toFixed(1) + "%"; }
  function pretty(label) { return label.split("___").join(" - ").split("_").join(" "); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  input.addEventListener("change", function () {
    var f = input.files && input.files[0];
    if (f && f.type.indexOf("image/") === 0 && window.URL) {
      preview.src = URL.createObjectURL(f);
      preview.hidden = false;
    }
  });

  function showError(message) {
    result.textContent = "";
    result.appendChild(el("p", { "class": "error", id: "error" }, message));
  }

  function showPrediction(body) {
    var p = body.predictions[0];
    result.textContent = "";
    result.appendChild(el("h2", { id: "label", "data-label": p.label }, pretty(p.label)));
    var conf = el("p", { id: "confidence" }, "Confidence " + pct(p.confidence) + " ");
    if (p.abstain_reason === "out_of_distribution") {
      conf.appendChild(el("strong", { "class": "warn" },
        "(not answered: this does not look like the leaf photos the model was trained on)"));
    } else if (p.abstained) {
      conf.appendChild(el("strong", { "class": "warn" }, "(uncertain: below the model's confidence threshold)"));
    }
    result.appendChild(conf);
    var table = el("table", { id: "topk" });
    var head = el("tr");
    head.appendChild(el("th", {}, "class"));
    head.appendChild(el("th", {}, "confidence"));
    table.appendChild(head);
    p.top_k.forEach(function (t) {
      var row = el("tr");
      row.appendChild(el("td", {}, t.label));
      row.appendChild(el("td", {}, pct(t.confidence)));
      table.appendChild(row);
    });
    result.appendChild(table);
    result.appendChild(el("p", { "class": "timing" }, body.inference_time_ms + " ms inference"));
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!input.files || !input.files.length) { showError("Choose a photo first."); return; }
    var data = new FormData();
    data.append("file", input.files[0]);
    button.disabled = true;
    result.textContent = "Checking...";
    fetch("/predict", { method: "POST", body: data })
      .then(function (resp) {
        return resp.json().then(function (body) { return { ok: resp.ok, body: body }; },
          function () { return { ok: false, body: { error: "HTTP " + resp.status } }; });
      })
      .then(function (r) { if (r.ok) { showPrediction(r.body); } else { showError(r.body.error || "request failed"); } })
      .catch(function (err) { showError("Request failed: " + err); })
      .then(function () { button.disabled = false; });
  });
}());
