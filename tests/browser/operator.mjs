// Drives the operator page in Debian's Chromium: filter by outcome, open a dead
// message, check the Segment input beside the Totango request and answer, replay it
// and find the replay in the audit trail.
// Signs in with the login link (a one-time code), checks that the page runs under
// its strict CSP (no inline script or style) and cannot be framed; then that the
// link is used up, that the sign-in form (token in a POST body) works, and that
// signing out ends the session on the server.
// Usage: node operator.mjs BASE_URL SCREENSHOT_PATH ADMIN_TOKEN LOGIN_LINK   (run by tests/operator_page.rs)
import { chromium } from "playwright-core";

const [base, screenshot, token, link] = process.argv.slice(2);
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));

  // Without signing in: the sign-in form, no data.
  const anonymous = await page.goto(base + "/");
  if (anonymous.status() !== 401) fail(`unauthenticated page answered ${anonymous.status()}`);
  if (await page.locator("#rows").count() !== 0) fail("the page shell was served without a credential");

  // From here on, any console error (a CSP violation among them) fails the test.
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  // The login link sets the session cookie and lands on the page.
  if (link.includes(token)) fail("the login link carries the token");
  const landed = await page.goto(link);
  if (landed.status() !== 200) fail(`login link answered ${landed.status()}`);
  if (page.url() !== base + "/") fail(`login link left its code in the address bar: ${page.url()}`);
  const headers = landed.headers();
  if (!/frame-ancestors 'none'/.test(headers["content-security-policy"] || "")) fail("no frame-ancestors in CSP");
  if ((headers["x-frame-options"] || "").toUpperCase() !== "DENY") fail("no X-Frame-Options: DENY");

  // Counts by outcome, from /api/stats.
  const deadCard = page.locator('.card[data-outcome="dead"]');
  await deadCard.locator("b").filter({ hasText: "1" }).waitFor({ timeout: 10000 });
  const delivered = await page.locator('.card[data-outcome="delivered"] b').innerText();
  if (delivered !== "1") fail(`delivered card shows ${delivered}, expected 1`);

  // All three messages are listed, newest first.
  await page.locator("#rows tr").nth(2).waitFor();
  const outcomes = await page.locator("#rows td:nth-child(6)").allInnerTexts();
  if (outcomes.join(",") !== "rejected,dead,delivered") fail(`outcomes column: ${outcomes}`);

  // Filtering by the dead card leaves the dead message only.
  await deadCard.click();
  await page.waitForFunction(() => document.querySelectorAll("#rows tr").length === 1
    && document.querySelector("#rows td:nth-child(6)").innerText === "dead");
  if (await page.locator("#replay-all").isHidden()) fail("bulk replay button hidden on the dead filter");

  // The detail shows input, request and answer side by side.
  await page.locator("#rows tr").first().click();
  await page.locator("#detail h2").filter({ hasText: "Message" }).waitFor();
  const detail = await page.locator("#detail").innerText();
  for (const want of ['"event": "Broken Feature"', "sdr_a", "Broken Feature", "HTTP 400", "rejected_by_totango", "totango says no"]) {
    if (!detail.includes(want)) fail(`detail lacks ${JSON.stringify(want)}:\n${detail}`);
  }
  await page.screenshot({ path: screenshot, fullPage: true });

  // Replay it; the fake Totango now accepts, so it ends delivered.
  await page.locator("#replay").click();
  await page.locator("#notice").filter({ hasText: "Replayed message" }).waitFor();
  await page.locator("#f-outcome").selectOption("");
  await page.locator("#filters button[type=submit]").click();
  await page.waitForFunction(async () => {
    const s = await (await fetch("/api/stats")).json();
    return s.outcomes.delivered === 2 && s.outcomes.dead === 0;
  }, null, { timeout: 15000, polling: 200 });
  await page.locator("#newest").click();
  await page.locator('.card[data-outcome="delivered"] b').filter({ hasText: "2" }).waitFor({ timeout: 10000 });
  // The sign-in and the replay are in the audit trail, with the session that made them.
  await page.locator("#audit-newest").click();
  const replayRow = page.locator("#audit-rows tr", { hasText: "replay" }).first();
  await replayRow.waitFor({ timeout: 10000 });
  const replayText = await replayRow.innerText();
  if (!/session:[0-9a-f]{12}/.test(replayText) || !replayText.includes('"id"')) fail(`audit row for the replay: ${replayText}`);
  if (await page.locator("#audit-rows tr", { hasText: "login" }).count() < 1) fail("the sign-in is not in the audit trail");
  // Framing is refused: another page embedding it gets nothing.
  const framed = await browser.newPage();
  const frameErrors = [];
  framed.on("console", (m) => frameErrors.push(m.text()));
  await framed.setContent(`<iframe id="f" src="${base}/"></iframe>`);
  await framed.waitForTimeout(500);
  const inner = framed.frames().find((f) => f !== framed.mainFrame());
  const framedRows = inner ? await inner.locator("#rows").count().catch(() => 0) : 0;
  if (framedRows !== 0) fail("the operator page rendered inside a frame");
  if (errors.length) fail("page errors (CSP violations show here): " + errors.join("; "));

  // The link was good once: in a fresh browser it opens the sign-in form only.
  const other = await browser.newContext();
  const second = await other.newPage();
  const reused = await second.goto(link);
  if (reused.status() !== 401) fail(`a used login link answered ${reused.status()}`);
  if (await second.locator("#rows").count() !== 0) fail("a used login link opened the page");
  // The sign-in form posts the token and lands on the page.
  await second.locator('input[name="token"]').fill(token);
  const [posted] = await Promise.all([
    second.waitForResponse((r) => r.url() === base + "/login" && r.request().method() === "POST"),
    second.locator('button[type="submit"]').click(),
  ]);
  if (posted.status() !== 303) fail(`the sign-in form answered ${posted.status()}: ${await posted.text().catch(() => "")}`);
  await second.waitForURL(base + "/");
  await second.locator("#rows tr").first().waitFor({ timeout: 10000 });
  if (second.url().includes(token)) fail("the token reached the address bar");
  // Signing out ends the session on the server: the old cookie opens nothing.
  const [cookie] = (await other.cookies()).filter((c) => c.name === "td_session");
  if (!cookie) fail("no session cookie after signing in");
  await Promise.all([
    second.waitForResponse((r) => r.url() === base + "/logout"),
    second.locator('form[action="/logout"] button').click(),
  ]);
  await second.waitForLoadState();
  const after = await fetch(base + "/api/stats", { headers: { cookie: `td_session=${cookie.value}` } });
  if (after.status !== 401) fail(`a signed-out session answered ${after.status}`);
  await other.close();
  console.log("operator page: ok");
} finally {
  await browser.close();
}
