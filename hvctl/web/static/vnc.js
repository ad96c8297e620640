// The guest's screen: noVNC (vendored, pinned: tools/web_vendor.py) on a websocket that
// spends a one-time ticket (hvctl/web/vnc.py says why). app.js's Screen button, shown for
// guests with graphics = "vnc", calls HVCTL.openScreen(guest); a click before this module
// ran is left in HVCTL.screenWanted. noVNC (some 60 modules) is imported at the first
// screen opened, not with every page.
const NOVNC = "/static/vendor/novnc-1.7.0/core/rfb.js";

const H = window.HVCTL;
const $ = (id) => document.getElementById(id);
let rfb = null;
let opening = 0;  // the newest openScreen(); an older one still waiting for its ticket gives up

function say(text, error = false) {
  $("screen-status").textContent = text;
  $("screen-status").className = error ? "error" : "muted";
}

async function openScreen(guest) {
  closeScreen();
  const mine = ++opening;
  $("screen-card").hidden = false;
  $("screen-title").textContent = `Screen of ${guest}`;
  say("asking for a ticket...");
  const resp = await fetch(`/api/v1/guests/${encodeURIComponent(guest)}/vnc`,
    {method: "POST", headers: {"X-CSRF-Token": H.csrf}});
  const data = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  if (mine !== opening) return;
  if (!resp.ok) { say(`screen of ${guest}: ${data.error}`, true); return; }
  const {default: RFB} = await import(NOVNC);
  if (mine !== opening) return;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const r = new RFB($("screen"), `${proto}://${location.host}${data.url}`, {shared: true});
  rfb = r;
  r.scaleViewport = true;  // the whole screen in the card, whatever the guest's resolution
  r.focusOnClick = true;
  r.addEventListener("connect", () => {
    if (rfb !== r) return;
    say(`connected: keys go to ${guest} while the screen has the focus (click it)`);
    r.focus();
  });
  r.addEventListener("disconnect", (ev) => {
    if (rfb !== r) return;
    say(ev.detail.clean ? "disconnected" : `connection to ${guest}'s screen lost`, !ev.detail.clean);
  });
  r.addEventListener("securityfailure", (ev) => rfb === r && say(`refused: ${ev.detail.reason || ev.detail.status}`, true));
}

function closeScreen() {
  opening++;
  if (rfb) { const r = rfb; rfb = null; r.disconnect(); }
  $("screen").replaceChildren();
  $("screen-card").hidden = true;
}

if ($("screen-card")) {
  H.openScreen = openScreen;
  if (H.screenWanted) openScreen(H.screenWanted);
  $("screen-close").addEventListener("click", closeScreen);
  $("screen-cad").addEventListener("click", () => { if (rfb) { rfb.sendCtrlAltDel(); rfb.focus(); } });
}
