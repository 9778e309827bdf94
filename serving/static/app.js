// Upload page: photos from the camera, the picker or a drop are shrunk in the browser
// (longest side data-max-side px, JPEG) and posted together to "predict" - a relative
// URL, so the page works behind an ingress path prefix. Without JavaScript the form
// posts to "./" and the server renders the same answers.
(function () {
  "use strict";
  var form = document.getElementById("upload");
  if (!form || !window.fetch || !window.FormData || !window.Promise) { return; }
  document.documentElement.classList.add("js");
  var pickers = Array.prototype.slice.call(form.querySelectorAll("input.picker"));
  var drop = document.getElementById("drop");
  var chosenList = document.getElementById("chosen");
  var result = document.getElementById("result");
  var button = document.getElementById("submit");
  var clear = document.getElementById("clear");
  var maxImages = parseInt(form.getAttribute("data-max-images"), 10) || 32;
  var maxSide = parseInt(form.getAttribute("data-max-side"), 10) || 1024;
  var JPEG_QUALITY = 0.9;
  var chosen = [];  // File objects, in the order they were added

  Array.prototype.forEach.call(document.querySelectorAll(".js-only"), function (node) { node.hidden = false; });

  function pct(x) { return (x * 100).toFixed(1) + "%"; }
  function pretty(label) { return label.split("___").join(" - ").split("_").join(" "); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  // ------------------------------------------------------------------ choosing photos

  function showChosen() {
    chosenList.textContent = "";
    chosen.forEach(function (file) {
      var item = el("li", { "class": "thumb" });
      if (window.URL && file.type.indexOf("image/") === 0) {
        item.appendChild(el("img", { src: URL.createObjectURL(file), alt: file.name }));
      }
      item.appendChild(el("span", {}, file.name));
      chosenList.appendChild(item);
    });
    button.textContent = chosen.length > 1 ? "Check " + chosen.length + " leaves" : "Check leaf";
  }

  function add(files) {
    Array.prototype.forEach.call(files || [], function (f) { chosen.push(f); });
    showChosen();
  }

  pickers.forEach(function (input) {
    input.addEventListener("change", function () {
      add(input.files);
      input.value = "";  // the list above holds them; the same photo may be added again
    });
  });
  clear.addEventListener("click", function () { chosen = []; showChosen(); result.textContent = ""; });

  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (event) { event.preventDefault(); drop.classList.add("over"); });
  });
  drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    drop.classList.remove("over");
    add(event.dataTransfer && event.dataTransfer.files);
  });

  // ------------------------------------------------------------------ shrinking

  function jpegName(name) { return (name || "photo").replace(/\.[^./]*$/, "") + ".jpg"; }

  // Resolves to a JPEG File whose longest side is maxSide, or to the file itself when it
  // is already small enough or the browser cannot decode it (the server then says why).
  function shrink(file) {
    if (!window.createImageBitmap || file.type.indexOf("image/") !== 0) { return Promise.resolve(file); }
    return createImageBitmap(file, { imageOrientation: "from-image" }).then(function (bitmap) {
      var longest = Math.max(bitmap.width, bitmap.height);
      if (longest <= maxSide) { bitmap.close(); return file; }
      var scale = maxSide / longest;
      var canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(bitmap.width * scale));
      canvas.height = Math.max(1, Math.round(bitmap.height * scale));
      var ctx = canvas.getContext("2d");
      ctx.fillStyle = "#fff";  // transparency over white, as the server composites it
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      bitmap.close();
      return new Promise(function (resolve) {
        canvas.toBlob(function (blob) {
          resolve(blob ? new File([blob], jpegName(file.name), { type: "image/jpeg" }) : file);
        }, "image/jpeg", JPEG_QUALITY);
      });
    }, function () { return file; });
  }

  // ------------------------------------------------------------------ answers

  function showError(message) {
    result.textContent = "";
    result.appendChild(el("p", { "class": "error", id: "error" }, message));
  }

  function card(p, file) {
    var node = el("article", { "class": "card" + (p.abstained ? " abstained" : ""), "data-label": p.label });
    if (file && window.URL) { node.appendChild(el("img", { "class": "photo", src: URL.createObjectURL(file), alt: "" })); }
    if (p.filename) { node.appendChild(el("p", { "class": "filename" }, p.filename)); }
    node.appendChild(el("h2", { "class": "label" }, pretty(p.label)));
    var conf = el("p", { "class": "confidence" }, "Confidence " + pct(p.confidence) + " ");
    if (p.abstain_reason === "out_of_distribution") {
      conf.appendChild(el("strong", { "class": "warn" },
        "(not answered: this does not look like the leaf photos the model was trained on)"));
    } else if (p.abstained) {
      conf.appendChild(el("strong", { "class": "warn" }, "(uncertain: below the model's confidence threshold)"));
    }
    node.appendChild(conf);
    var table = el("table", { "class": "topk" });
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
    node.appendChild(table);
    return node;
  }

  function showPredictions(body, files) {
    result.textContent = "";
    body.predictions.forEach(function (p, i) { result.appendChild(card(p, files[i])); });
    result.appendChild(el("p", { "class": "timing" }, body.inference_time_ms + " ms inference"));
  }

  function post(files) {
    var data = new FormData();
    files.forEach(function (f) { data.append("file", f, f.name); });
    return fetch("predict", { method: "POST", body: data }).then(function (resp) {
      return resp.json().then(function (body) { return { ok: resp.ok, body: body }; },
        function () { return { ok: false, body: { error: "HTTP " + resp.status } }; });
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!chosen.length) { showError("Take or choose a photo first."); return; }
    if (chosen.length > maxImages) { showError("At most " + maxImages + " photos at a time."); return; }
    var originals = chosen.slice();
    button.disabled = true;
    result.textContent = "Checking...";
    Promise.all(originals.map(shrink))
      .then(post)
      .then(function (r) {
        if (r.ok) { showPredictions(r.body, originals); } else { showError(r.body.error || "request failed"); }
      })
      .catch(function (err) { showError("Request failed: " + err); })
      .then(function () { button.disabled = false; });
  });
}());
