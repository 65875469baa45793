/*! tagrelay.js: first-party events for a tagrelay server. No dependencies, ES2017.
 *
 * <script async src="https://t.example.com/tagrelay.js" data-auto-page-view></script>
 *
 *   tagrelay.track("purchase", {value: 134, currency: "EUR", transaction_id: "T-1024",
 *                               user_data: {email_address: "a@example.com"}})
 *     .then((eventId) => ...);
 *   const eventID = tagrelay.eventId();          // same id for the Meta pixel and the server:
 *   fbq("track", "Lead", {}, {eventID});
 *   tagrelay.track("generate_lead", {event_id: eventID});
 *
 * Orders (backend purchases): a purchase's event id is derived from its transaction id, the
 * same one the shop's order webhook gets, so pixel, page and webhook count once:
 *   fbq("track", "Purchase", {value: 134, currency: "EUR"},
 *       {eventID: tagrelay.orderEventId("T-1024")});   // "purchase-T-1024"
 *   tagrelay.track("purchase", {transaction_id: "T-1024", ...});  // same id, implied
 * Checkouts whose platform passes no token back (Stripe Checkout, Payment Links): hand the
 * platform the visitor token, which records this visit for the order's webhook:
 *   link.href += "?client_reference_id=" + tagrelay.checkout({value: 20, currency: "EUR"});
 * (`tagrelay.checkout` tracks begin_checkout; `tagrelay.visitor()` returns the token alone, and
 * every event tracked after it carries the token.)
 *
 * Attributes on the script tag:
 *   data-endpoint="https://t.example.com/t"  origin + path prefix of the server (default: the
 *                                           script's own origin and prefix)
 *   data-auto-page-view                     send page_view once loaded (value "false" = off)
 * Calls made before the script loads: window.tagrelayQueue = [["page_view", {...}], ...].
 *
 * page_location always carries the full URL, so the server sees `fbclid` and builds `_fbc`.
 */
(() => {
  "use strict";
  // The server substitutes its configured paths at these markers.
  const DATA_PATH = /*@data_path*/"/data";
  const SCRIPT_PATH = /*@script_path*/"/tagrelay.js";

  if (window.tagrelay && window.tagrelay.endpoint) return; // loaded twice

  const script = document.currentScript;
  const attr = (name) => (script ? script.getAttribute(name) : null);

  const base = (() => {
    const configured = attr("data-endpoint");
    if (configured) return configured.replace(/\/+$/, "");
    if (script && script.src) {
      const u = new URL(script.src, location.href);
      let path = u.pathname;
      path = path.endsWith(SCRIPT_PATH)
        ? path.slice(0, path.length - SCRIPT_PATH.length)
        : path.replace(/\/[^/]*$/, "");
      return u.origin + path;
    }
    return location.origin;
  })();
  const endpoint = base + DATA_PATH;

  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

  // Minted here, not by the server, so the id exists even when the hit goes out by beacon
  // and no response is ever read.
  const eventId = () => {
    const c = window.crypto;
    if (c && typeof c.randomUUID === "function") return c.randomUUID();
    if (c && typeof c.getRandomValues === "function") {
      return hex(c.getRandomValues(new Uint8Array(16)));
    }
    let s = "";
    for (let i = 0; i < 32; i++) s += Math.floor(Math.random() * 16).toString(16);
    return s;
  };

  const context = () => {
    const s = window.screen;
    return {
      page_location: location.href,
      page_referrer: document.referrer || undefined,
      page_title: document.title || undefined,
      language: navigator.language || undefined,
      screen_resolution: s ? s.width + "x" + s.height : undefined,
    };
  };

  const beacon = (body) => {
    try {
      return typeof navigator.sendBeacon === "function" && navigator.sendBeacon(endpoint, body);
    } catch (e) {
      return false;
    }
  };

  // The server derives the same id for the order's webhook (and for a purchase sent without one).
  const orderEventId = (transactionId) => "purchase-" + String(transactionId).trim();

  // A token for this visit that a checkout platform hands back with the order (Stripe's
  // client_reference_id, a cart attribute); kept for the tab's session.
  const VISITOR_KEY = "tagrelay_visitor";
  let visitorToken = null;
  const storage = () => {
    try {
      return window.sessionStorage;
    } catch (e) {
      return null;
    }
  };
  const known = () => {
    if (visitorToken) return visitorToken;
    const s = storage();
    visitorToken = (s && s.getItem(VISITOR_KEY)) || null;
    return visitorToken;
  };
  const visitor = () => {
    if (known()) return visitorToken;
    visitorToken = "tv-" + eventId().replace(/-/g, "");
    const s = storage();
    try {
      if (s) s.setItem(VISITOR_KEY, visitorToken);
    } catch (e) {
      // Storage full or off: the token lives as long as the page.
    }
    return visitorToken;
  };

  const track = (name, params) => {
    if (typeof name !== "string" || name === "") {
      return Promise.reject(new TypeError("tagrelay.track: an event name is required"));
    }
    const p = params || {};
    const id =
      p.event_id ||
      (name === "purchase" && p.transaction_id != null && String(p.transaction_id).trim() !== ""
        ? orderEventId(p.transaction_id)
        : eventId());
    const extra = { event_name: name, event_id: id };
    if (known() && p[VISITOR_KEY] == null) extra[VISITOR_KEY] = visitorToken;
    const body = JSON.stringify(Object.assign(context(), p, extra));
    const viaBeacon = () =>
      beacon(body) ? id : Promise.reject(new Error("tagrelay: could not send " + name));

    if (typeof fetch !== "function") return Promise.resolve().then(viaBeacon);
    // text/plain keeps this a "simple" request: no CORS preflight round trip.
    const send = (retried) =>
      fetch(endpoint, {
        method: "POST",
        keepalive: true,
        credentials: "include",
        headers: { "content-type": "text/plain" },
        body,
      }).then(
        (res) => {
          // 503 = the server is shedding load; it says when to come back. Retry once.
          if (res.status === 503 && !retried) {
            const secs = Math.min(parseInt(res.headers.get("retry-after"), 10) || 1, 30);
            return new Promise((r) => setTimeout(r, secs * 1000)).then(() => send(true));
          }
          if (!res.ok) {
            return res.text().then((t) => {
              throw new Error("tagrelay: " + res.status + " " + t.trim());
            });
          }
          if (res.status === 204) return id;
          return res.json().then(
            (j) => (j && j.events && j.events[0] && j.events[0].event_id) || id,
            () => id
          );
        },
        // Network failure, or keepalive's 64 KiB in-flight budget is spent (page unloading).
        viaBeacon
      );
    return send(false);
  };

  const quietly = (args) => {
    track.apply(null, args).catch(() => {});
  };

  // Tracks begin_checkout carrying a visitor token and returns the token at once, for the
  // checkout platform to hand back with the order.
  const checkout = (params) => {
    const token = visitor();
    quietly(["begin_checkout", params || {}]);
    return token;
  };

  window.tagrelay = { track, eventId, endpoint, orderEventId, visitor, checkout, version: "1" };

  const queued = window.tagrelayQueue;
  window.tagrelayQueue = { push: (args) => quietly(args) };
  if (Array.isArray(queued)) queued.forEach(quietly);

  const auto = attr("data-auto-page-view");
  if (auto !== null && auto !== "false") quietly(["page_view"]);
})();
