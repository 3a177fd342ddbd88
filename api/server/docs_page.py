"""GET /docs: a self-contained HTML page that fetches /openapi.json and shows every route, its
parameters, request body and responses with their schemas (API workers).

Offline by design: no CDN, font, image or script from elsewhere; a Content-Security-Policy lets
the page load nothing but its own inline code and /openapi.json from this server.
"""

from __future__ import annotations

from fornax.api.server.http import Request, Response

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fornax API</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1f21;background:#fafafa}
header{padding:14px 24px;background:#20232a;color:#fff}header h1{margin:0;font-size:20px}
main{max-width:1100px;margin:0 auto;padding:12px 24px}
h2{margin:26px 0 8px;font-size:17px;text-transform:capitalize;border-bottom:1px solid #ddd}
details{background:#fff;border:1px solid #ddd;border-radius:6px;margin:6px 0}
summary{cursor:pointer;padding:8px 10px;list-style:none}
summary::-webkit-details-marker{display:none}
.m{display:inline-block;min-width:58px;text-align:center;border-radius:4px;color:#fff;
font:bold 12px monospace;padding:2px 6px;margin-right:8px}
.get{background:#2f80ed}.post{background:#27ae60}.delete{background:#eb5757}.put{background:#f2994a}
.p{font-family:monospace;font-weight:600}.s{color:#555;margin-left:10px}
.lock{color:#b00;font-size:12px;margin-left:6px}.body{padding:4px 14px 12px}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #e3e3e3;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}
pre{background:#f6f8fa;padding:8px;overflow:auto;margin:4px 0;font-size:12px}
.t{color:#7a3e9d}.req{color:#b00}a{color:#2f80ed}#err{color:#b00}
</style></head><body>
<header><h1>fornax API</h1><div id="info"></div></header>
<main><p id="err"></p><div id="ops"></div><h2>schemas</h2><div id="schemas"></div></main>
<script>
"use strict";
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;","'":"&#39;"}[c]));
const anchor = name => "schema-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
function refName(ref) { return ref.split("/").pop(); }
function type(s) {
  if (!s || typeof s !== "object") return "any";
  if (s.$ref) { const n = refName(s.$ref);
    return '<a href="#' + anchor(n) + '">' + esc(n) + "</a>"; }
  for (const k of ["anyOf", "oneOf", "allOf"]) if (s[k]) return s[k].map(type).join(" | ");
  if ("const" in s) return esc(JSON.stringify(s.const));
  if (s.enum) return s.enum.map(v => esc(JSON.stringify(v))).join(" | ");
  if (s.type === "array") return "array of " + type(s.items);
  let t = Array.isArray(s.type) ? s.type.join(" | ") : (s.type || "object");
  const bounds = [];
  for (const k of ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
                   "maxLength", "minItems", "maxItems", "pattern"])
    if (k in s) bounds.push(k + " " + s[k]);
  return esc(t) + (bounds.length ? ' <span class="s">(' + esc(bounds.join(", ")) + ")</span>" : "");
}
function fields(s) {
  if (!s || !s.properties) return "<div>" + type(s) + "</div>";
  const req = new Set(s.required || []);
  let h = "<table><tr><th>field</th><th>type</th><th>about</th></tr>";
  for (const [k, v] of Object.entries(s.properties))
    h += "<tr><td class=p>" + esc(k) + (req.has(k) ? ' <span class=req>*</span>' : "") +
      "</td><td class=t>" + type(v) + "</td><td>" + esc(v.description || "") + "</td></tr>";
  return h + "</table>";
}
function op(path, method, o) {
  let h = '<details><summary><span class="m ' + method + '">' + method.toUpperCase() +
    '</span><span class="p">' + esc(path) + '</span><span class="s">' + esc(o.summary || "") +
    "</span>" + (o.security && o.security.length === 0 ? "" : '<span class="lock">key</span>') +
    '</summary><div class="body">';
  if (o.parameters) {
    h += "<b>parameters</b><table><tr><th>name</th><th>in</th><th>type</th><th>about</th></tr>";
    for (const p of o.parameters) h += "<tr><td class=p>" + esc(p.name) + "</td><td>" +
      esc(p.in) + "</td><td class=t>" + type(p.schema) + "</td><td>" +
      esc(p.description || "") + "</td></tr>";
    h += "</table>";
  }
  if (o.requestBody) for (const [media, m] of Object.entries(o.requestBody.content)) {
    h += "<b>body</b> (" + esc(media) + "): " + type(m.schema);
    if (m.examples) for (const ex of Object.values(m.examples))
      h += "<pre>" + esc(JSON.stringify(ex.value, null, 2)) + "</pre>";
  }
  h += "<b>responses</b><table><tr><th>status</th><th>content</th><th>about</th></tr>";
  for (const [code, r] of Object.entries(o.responses || {})) {
    const c = Object.entries(r.content || {}).map(([media, m]) => esc(media) + ": " +
      type(m.schema) + (m["x-fornax-event"] ? "<br>each event: " + type(m["x-fornax-event"]) :
      "")).join("<br>");
    h += "<tr><td>" + esc(code) + "</td><td class=t>" + c + "</td><td>" +
      esc(r.description || "") + "</td></tr>";
  }
  return h + "</table></div></details>";
}
function render(doc) {
  document.getElementById("info").textContent = doc.info.title + " " + doc.info.version +
    " \\u00b7 OpenAPI " + doc.openapi + (doc.security ? " \\u00b7 API key required" : "");
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths))
    for (const [method, o] of Object.entries(item))
      (byTag[(o.tags || ["other"])[0]] ||= []).push(op(path, method, o));
  document.getElementById("ops").innerHTML = Object.entries(byTag).map(([tag, ops]) =>
    "<h2>" + esc(tag) + "</h2>" + ops.join("")).join("");
  const schemas = doc.components.schemas;
  document.getElementById("schemas").innerHTML = Object.keys(schemas).sort().map(n =>
    '<details id="' + anchor(n) + '"><summary><span class="p">' + esc(n) + "</span>" +
    '<span class="s">' + esc(schemas[n].description || schemas[n].title || "") +
    '</span></summary><div class="body">' + fields(schemas[n]) + "</div></details>").join("");
  if (location.hash) { const el = document.getElementById(location.hash.slice(1));
    if (el) { el.open = true; el.scrollIntoView(); } }
}
addEventListener("hashchange", () => { const el = document.getElementById(location.hash.slice(1));
  if (el) el.open = true; });
fetch("openapi.json")
  .then(r => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
  .then(render).catch(e => { document.getElementById("err").textContent =
    "could not load /openapi.json: " + e.message; });
</script></body></html>
"""


async def docs(req: Request) -> Response:
    return Response(PAGE.encode(), 200, content_type="text/html; charset=utf-8",
                    headers={"content-security-policy": CSP, "cache-control": "no-cache"})
