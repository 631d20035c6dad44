// Drives the operator page's history charts, Totango's health banner and an
// account page in Debian's Chromium, after the load tests/app/browser/operator_dashboard.rs
// sent (delivered messages, a dead one, then Totango silent). Screenshots go to SHOT_DIR.
// Usage: node dashboard.mjs BASE_URL LOGIN_LINK SHOT_DIR
import { chromium } from "playwright-core";

const [base, link, shots] = process.argv.slice(2);
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const landed = await page.goto(link);
  if (landed.status() !== 200) fail(`login link answered ${landed.status()}`);

  // The banner says Totango is unreachable, since when, and what waits for it.
  const health = page.locator('#totango-health[data-state="unreachable"]');
  await health.waitFor({ timeout: 20000 });
  const banner = await page.locator("#totango-health").innerText();
  if (!/unreachable since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC/.test(banner)) fail(`banner: ${banner}`);
  if (!/last error: /.test(banner)) fail(`banner names no error: ${banner}`);
  if (!/\d+ message\(s\) wait for it/.test(banner)) fail(`banner says nothing of the waiting messages: ${banner}`);

  // Each chart drew a canvas with points of the load.
  for (const id of ["chart-throughput", "chart-queue", "chart-totango"]) {
    await page.waitForFunction((id) => Number(document.getElementById(id).dataset.points) > 0, id, { timeout: 20000 });
    if (await page.locator(`#${id} canvas`).count() < 1) fail(`#${id} has no canvas`);
  }
  // The throughput chart holds the deliveries: uPlot's legend names its series.
  const legend = await page.locator("#chart-throughput").innerText();
  for (const want of ["accepted", "delivered"]) if (!legend.includes(want)) fail(`throughput chart legend lacks ${want}: ${legend}`);
  await page.screenshot({ path: `${shots}/operator-dashboard.png`, fullPage: true });

  // The day range draws too.
  await page.locator("#history-range").selectOption("day");
  await page.waitForFunction(() => document.getElementById("chart-throughput").dataset.range === "day"
    && Number(document.getElementById("chart-throughput").dataset.points) > 0, null, { timeout: 10000 });

  // From an account id in the message list to its page.
  const accountLink = page.locator('#rows a.entity[href="/accounts/acme"]').first();
  await accountLink.waitFor({ timeout: 10000 });
  await Promise.all([page.waitForURL(base + "/accounts/acme"), accountLink.click()]);
  await page.locator('#attribute-rows tr[data-name="sdr_odn"]').waitFor({ timeout: 10000 });
  const name = await page.locator('#attribute-rows tr[data-name="sdr_odn"]').innerText();
  if (!name.includes("Acme Inc")) fail(`account name attribute: ${name}`);
  const attributes = await page.locator("#attribute-rows").innerText();
  if (!attributes.includes("Enterprise")) fail(`the plan is not among the attributes:\n${attributes}`);
  const total = await page.locator("#activity-total").innerText();
  if (!/\b3\b/.test(total)) fail(`activity total: ${total}`);
  const failures = await page.locator("#failure-rows").innerText();
  if (!/\bdead\b/.test(failures)) fail(`the dead message is not among the failures:\n${failures}`);
  await page.screenshot({ path: `${shots}/account-page.png`, fullPage: true });

  if (errors.length) fail("page errors (CSP violations show here): " + errors.join("; "));
  console.log("dashboard: ok");
} finally {
  await browser.close();
}
