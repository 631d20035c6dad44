// Drives the operator page in Debian's Chromium: filter by outcome, open a dead
// message, check the Segment input beside the Totango request and answer, replay it.
// Usage: node operator.mjs BASE_URL SCREENSHOT_PATH   (run by tests/operator_page.rs)
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/");

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
  if (errors.length) fail("page errors: " + errors.join("; "));
  console.log("operator page: ok");
} finally {
  await browser.close();
}
