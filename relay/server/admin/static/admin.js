// The relay's live view. Polls /api/status every two seconds (fetch can
// carry the admin cookie or header, which EventSource cannot), asking only
// for the page of backends on screen, so the page stays fast with 10,000
// backends. Everything from the server is written with textContent: backend
// names and paths come from strangers.
"use strict";

(function () {
  var INTERVAL = 2000;
  // Rows of a backend's recent requests shown until "more" is clicked.
  var SHORT_LIST = 15;
  var state = {
    offset: 0,
    limit: 50,
    sort: "name",
    order: "asc",
    filter: "",
    selected: null,
    timer: null,
    showAll: false,
    again: false,
    inFlightRequest: false,
  };
  var SVG = "http://www.w3.org/2000/svg";
  // Lets a test tell an update from a reload.
  document.body.dataset.pageId = String(Math.random()).slice(2);

  function $(id) { return document.getElementById(id); }

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m" + Math.floor(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
  }

  function ago(now, t) { return t === null || t === undefined ? "–" : seconds(Math.max(0, now - t)) + " ago"; }

  function clock(t) {
    // Server times are its clock's seconds: wall-clock seconds in production.
    var d = new Date(t * 1000);
    return isNaN(d.getTime()) ? String(t) : d.toLocaleTimeString();
  }

  function sparkline(values, cls, title) {
    var w = 120, h = 22;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark " + cls);
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    var t = document.createElementNS(SVG, "title");
    t.textContent = title;
    svg.appendChild(t);
    var max = 0;
    values.forEach(function (v) { if (v !== null && v > max) max = v; });
    var step = values.length > 1 ? w / (values.length - 1) : w;
    var points = [];
    values.forEach(function (v, i) {
      if (v === null) {
        if (points.length) { line(svg, points); points = []; }
        return;
      }
      var y = max > 0 ? h - 2 - (v / max) * (h - 4) : h - 2;
      points.push((i * step).toFixed(1) + "," + y.toFixed(1));
    });
    if (points.length) line(svg, points);
    return svg;
  }

  function line(svg, points) {
    if (points.length === 1) {
      // A lone bucket: a short dash, so that it shows.
      var xy = points[0].split(",");
      points = [(Number(xy[0]) - 2).toFixed(1) + "," + xy[1], (Number(xy[0]) + 2).toFixed(1) + "," + xy[1]];
    }
    var p = document.createElementNS(SVG, "polyline");
    p.setAttribute("points", points.join(" "));
    svg.appendChild(p);
  }

  function errorsCell(errors, minute) {
    var td = el("td", null, "errors-cell");
    var any = false;
    Object.keys(errors).forEach(function (kind) {
      if (!errors[kind]) return;
      any = true;
      td.appendChild(el("span", kind + ": " + errors[kind], "bad"));
    });
    if (!any) td.appendChild(el("span", "0", "muted"));
    td.title = "since the backend appeared; " + minute + " in the last minute";
    return td;
  }

  function renderTotals(data) {
    var s = data.server, t = data.totals;
    $("server").textContent = "v" + s.version + " · " + s.interpreter + " · up " + seconds(s.uptime) +
      " · RSS " + bytes(s.rss_bytes) + " · " + (s.open_fds === null ? "?" : s.open_fds) + " fds" +
      " · dead connections " + s.dead_connections.timeout + " timed out, " + s.dead_connections.reset + " reset" +
      (s.draining ? " · DRAINING" : "");
    var box = $("totals");
    box.textContent = "";
    [["backends", t.backends], ["connected", t.connected], ["idle", t.idle], ["gone", t.gone],
     ["in flight", t.in_flight], ["open polls", t.open_polls],
     ["unknown-backend requests", t.unknown_backend_requests]].forEach(function (pair) {
      var d = el("div", null, "total");
      d.appendChild(el("b", pair[1]));
      d.appendChild(el("span", pair[0], "muted"));
      box.appendChild(d);
    });
    var flags = $("flags").tBodies[0];
    flags.textContent = "";
    Object.keys(s.flags).forEach(function (name) {
      var tr = el("tr");
      tr.appendChild(el("td", "--" + name));
      tr.appendChild(el("td", s.flags[name] === null ? "" : s.flags[name]));
      flags.appendChild(tr);
    });
  }

  function renderBackends(data) {
    var page = data.backends, now = data.server.now;
    var body = $("backends").tBodies[0];
    var rows = document.createDocumentFragment();
    page.items.forEach(function (b) {
      var tr = el("tr", null, "state-" + b.state + (b.name === state.selected ? " selected" : ""));
      tr.dataset.backend = b.name;
      tr.dataset.state = b.state;
      var status = el("td");
      status.appendChild(el("span", null, "dot"));
      status.appendChild(document.createTextNode(b.state + (b.forgotten ? " (forgotten)" : "")));
      tr.appendChild(status);
      tr.appendChild(el("td", b.name, "name"));
      tr.appendChild(el("td", b.relay_clients.map(function (c) { return c.peer; }).join(", ") || "–"));
      tr.appendChild(el("td", b.open_polls, "num"));
      tr.appendChild(el("td", b.in_flight, "num"));
      tr.appendChild(el("td", b.last_minute.requests, "num"));
      tr.appendChild(el("td", bytes(b.last_minute.bytes), "num"));
      tr.appendChild(el("td", seconds(b.last_minute.p50), "num"));
      tr.appendChild(el("td", seconds(b.last_minute.p99), "num"));
      tr.appendChild(errorsCell(b.errors, b.last_minute.errors));
      var rate = el("td");
      rate.appendChild(sparkline(b.series.rate, "rate", "requests/s per " + page.bucket_seconds + " s"));
      tr.appendChild(rate);
      var p99 = el("td");
      p99.appendChild(sparkline(b.series.p99, "p99", "p99 latency per " + page.bucket_seconds + " s"));
      tr.appendChild(p99);
      tr.appendChild(el("td", ago(now, b.last_poll), "num"));
      rows.appendChild(tr);
    });
    body.textContent = "";
    body.appendChild(rows);
    $("backend-count").textContent = page.total + (state.filter ? " matching" : "");
    var last = Math.min(page.total, page.offset + page.items.length);
    $("page").textContent = page.total ? (page.offset + 1) + "–" + last + " of " + page.total : "none";
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.total;
    Array.prototype.forEach.call(document.querySelectorAll("#backends th[data-sort]"), function (th) {
      var on = th.dataset.sort === state.sort;
      th.className = (th.className.replace(/\b(sorted|asc|desc)\b/g, "").trim() +
        (on ? " sorted " + state.order : "")).trim();
    });
  }

  function requestRow(r) {
    var tr = el("tr", null, r.kind === "ok" || r.kind === "cancelled" ? "" : "error");
    tr.dataset.status = r.status;
    tr.dataset.kind = r.kind;
    tr.appendChild(el("td", clock(r.time)));
    tr.appendChild(el("td", r.kind, "kind"));
    tr.appendChild(el("td", r.status || "–", "num"));
    tr.appendChild(el("td", r.method));
    var path = el("td", r.path, "path");
    path.title = r.path;
    if (r.trace_id) {
      // A sampled request: its trace id, to look it up in the tracing back-end.
      path.title += "\n\ntrace " + r.trace_id;
      path.appendChild(el("span", " trace " + r.trace_id, "trace"));
    }
    if (r.request_headers) {
      path.title += "\n\nrequest:\n" + r.request_headers.map(function (h) { return h[0] + ": " + h[1]; }).join("\n") +
        "\n\nresponse:\n" + r.response_headers.map(function (h) { return h[0] + ": " + h[1]; }).join("\n");
    }
    tr.appendChild(path);
    tr.appendChild(el("td", seconds(r.duration), "num"));
    tr.appendChild(el("td", bytes(r.bytes_in), "num"));
    tr.appendChild(el("td", bytes(r.bytes_out), "num"));
    return tr;
  }

  function renderDetail(data) {
    var panel = $("detail");
    var d = data.detail;
    if (!state.selected || !d) { panel.hidden = true; return; }
    panel.hidden = false;
    var now = data.server.now;
    $("detail-name").textContent = d.name;
    var summary = $("detail-summary");
    summary.textContent = "";
    [["state", d.state + (d.forgotten ? " (forgotten " + ago(now, d.forgotten_at) + ")" : "")],
     ["first poll", ago(now, d.first_poll)], ["last poll", ago(now, d.last_poll)],
     ["relay-clients", d.relay_clients.map(function (c) { return c.peer + " (" + ago(now, c.last_poll) + ")"; }).join(", ") || "–"],
     ["requests", d.totals.requests], ["in", bytes(d.totals.bytes_in)], ["out", bytes(d.totals.bytes_out)],
     ["cancelled", d.totals.cancelled],
     ["connections", "reconnects: " + d.connections.reconnects + ", dead: " + d.connections.dead +
       ", requeued: " + d.connections.requeued + ", failed: " + d.connections.failed],
     ["errors", Object.keys(d.errors).map(function (k) { return k + ": " + d.errors[k]; }).join(", ")]
    ].forEach(function (pair) {
      var span = el("span");
      span.appendChild(el("span", pair[0] + " ", "muted"));
      span.appendChild(el("b", pair[1]));
      summary.appendChild(span);
    });
    [["recent", d.recent], ["recent-errors", d.recent_errors]].forEach(function (pair) {
      var body = $(pair[0]).tBodies[0];
      body.textContent = "";
      var shown = state.showAll ? pair[1] : pair[1].slice(0, SHORT_LIST);
      shown.forEach(function (r) { body.appendChild(requestRow(r)); });
      if (shown.length < pair[1].length) {
        var more = el("tr", null, "more");
        var cell = el("td", null, "muted");
        cell.colSpan = 8;
        var button = el("button", (pair[1].length - shown.length) + " more");
        button.type = "button";
        button.addEventListener("click", function () { state.showAll = true; refresh(); });
        cell.appendChild(button);
        more.appendChild(cell);
        body.appendChild(more);
      }
      if (!pair[1].length) {
        var tr = el("tr");
        var td = el("td", "none", "muted");
        td.colSpan = 8;
        tr.appendChild(td);
        body.appendChild(tr);
      }
    });
  }

  function renderInFlight(data) {
    var f = data.in_flight;
    var body = $("inflight").tBodies[0];
    body.textContent = "";
    f.items.forEach(function (r) {
      var tr = el("tr", null, "state-" + r.state);
      tr.dataset.id = r.id;
      tr.dataset.state = r.state;
      tr.appendChild(el("td", r.id.slice(r.backend.length + 1, r.backend.length + 9), "id"));
      tr.appendChild(el("td", r.backend));
      tr.appendChild(el("td", r.method));
      tr.appendChild(el("td", r.path, "path"));
      tr.appendChild(el("td", seconds(r.age), "num"));
      tr.appendChild(el("td", bytes(r.bytes_in), "num bytes-in"));
      tr.appendChild(el("td", bytes(r.bytes_out), "num bytes-out"));
      tr.appendChild(el("td", r.state.replace(/_/g, " ")));
      body.appendChild(tr);
    });
    $("inflight-count").textContent = f.total > f.items.length ? f.items.length + " of " + f.total : String(f.total);
  }

  function renderUnknown(data) {
    var body = $("unknown").tBodies[0];
    body.textContent = "";
    data.unknown_backends.slice(0, 20).forEach(function (u) {
      var tr = el("tr");
      tr.appendChild(el("td", clock(u.time)));
      tr.appendChild(el("td", u.backend));
      tr.appendChild(el("td", u.method));
      tr.appendChild(el("td", u.path, "path"));
      body.appendChild(tr);
    });
    $("unknown-count").textContent = String(data.totals.unknown_backend_requests);
  }

  function query() {
    var q = "offset=" + state.offset + "&limit=" + state.limit + "&sort=" + state.sort +
      "&order=" + state.order + "&recent=0&in_flight=100";
    if (state.filter) q += "&q=" + encodeURIComponent(state.filter);
    if (state.selected) q += "&backend=" + encodeURIComponent(state.selected);
    return q;
  }

  function banner(text) {
    var b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  function update() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.inFlightRequest) {
      // A click while a poll is out: ask again as soon as it is back.
      state.again = true;
      return;
    }
    state.inFlightRequest = true;
    state.again = false;
    fetch("/api/status?" + query(), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) throw new Error("Not authorized: open this page as /?token=YOUR_TOKEN once.");
        if (!response.ok) throw new Error("The server answered " + response.status + ".");
        return response.json();
      })
      .then(function (data) {
        banner(null);
        renderTotals(data);
        renderBackends(data);
        renderDetail(data);
        renderInFlight(data);
        renderUnknown(data);
        document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
        $("live").className = "live fresh";
        $("live").title = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) {
        banner(e.message || String(e));
        $("live").className = "live";
      })
      .then(function () {
        state.inFlightRequest = false;
        state.timer = setTimeout(update, state.again ? 0 : INTERVAL);
      });
  }

  function refresh() { update(); }

  $("backends").tHead.addEventListener("click", function (e) {
    var th = e.target.closest("th[data-sort]");
    if (!th) return;
    var key = th.dataset.sort;
    if (state.sort === key) state.order = state.order === "asc" ? "desc" : "asc";
    else { state.sort = key; state.order = key === "name" || key === "state" ? "asc" : "desc"; }
    state.offset = 0;
    refresh();
  });
  $("backends").tBodies[0].addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (!tr || !tr.dataset.backend) return;
    state.selected = tr.dataset.backend === state.selected ? null : tr.dataset.backend;
    state.showAll = false;
    refresh();
  });
  $("detail-close").addEventListener("click", function () { state.selected = null; refresh(); });
  var typing = null;
  $("filter").addEventListener("input", function (e) {
    clearTimeout(typing);
    typing = setTimeout(function () { state.filter = e.target.value; state.offset = 0; refresh(); }, 200);
  });
  $("prev").addEventListener("click", function () { state.offset = Math.max(0, state.offset - state.limit); refresh(); });
  $("next").addEventListener("click", function () { state.offset += state.limit; refresh(); });
  $("page-size").addEventListener("change", function (e) {
    state.limit = Number(e.target.value);
    state.offset = 0;
    refresh();
  });
  var params = new URLSearchParams(location.search);
  if (params.get("backend")) state.selected = params.get("backend");
  update();
})();
