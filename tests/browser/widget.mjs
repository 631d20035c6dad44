// Renders the account insights widget in Debian's Chromium: on its own in a 290 px high
// viewport, framed by an allowed CRM page, and refused by a page not in frame-ancestors.
// Usage: node widget.mjs WIDGET_URL SCREENSHOT_PATH   (run by tests/insights_widget.rs)
import { chromium } from "playwright-core";

const [widgetUrl, screenshot] = process.argv.slice(2);
const fail = (msg) => { throw new Error(msg); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The CRM pages below are served by request interception, so Chromium takes them for
  // public sites framing a loopback server; its local network checks would refuse that.
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"],
});
try {
  // 1. The widget on its own, in a frame-sized viewport.
  const page = await browser.newPage({ viewport: { width: 420, height: 290 } });
  const problems = [];
  // Failed loads are judged by URL below (a top-level page asks for /favicon.ico, which a
  // framed widget never does); every other console error or warning is a problem.
  page.on("console", (m) => {
    if ((m.type() === "error" || m.type() === "warning") && !m.text().startsWith("Failed to load resource")) {
      problems.push(m.text());
    }
  });
  page.on("response", (r) => {
    if (r.status() >= 400 && !r.url().endsWith("/favicon.ico")) problems.push(`${r.status()} ${r.url()}`);
  });
  page.on("pageerror", (e) => problems.push(e.message));
  const resp = await page.goto(widgetUrl);
  if (resp.status() !== 200) fail(`widget answered ${resp.status()}`);
  await page.locator(".widget").waitFor();
  const size = await page.evaluate(() => ({
    scroll: document.documentElement.scrollHeight,
    widget: document.querySelector(".widget").getBoundingClientRect().height,
    footerBottom: document.querySelector("footer").getBoundingClientRect().bottom,
  }));
  if (size.scroll > 290 || size.widget > 290 || size.footerBottom > 290) {
    fail(`widget does not fit 290 px: ${JSON.stringify(size)}`);
  }
  // The stylesheet applied: the health badge is red (Poor) and the online dot green.
  const health = page.locator(".health");
  if ((await health.innerText()) !== "Poor") fail(`health badge: ${await health.innerText()}`);
  const colours = await page.evaluate(() => ({
    health: getComputedStyle(document.querySelector(".health")).backgroundColor,
    dot: getComputedStyle(document.querySelector(".dot")).backgroundColor,
  }));
  if (colours.health !== "rgb(186, 5, 23)") fail(`health colour ${colours.health}`);
  if (colours.dot !== "rgb(46, 132, 74)") fail(`online dot colour ${colours.dot}`);
  const text = await page.locator(".widget").textContent();
  for (const want of ["Account 2", "Engagement", "52", "▼ 1", "Active users 14d", "12",
                      "Licence use", "30%", "Daily", "Enterprise", "vip", "cohort-2",
                      "Updated", "Open in Totango"]) {
    if (!text.includes(want)) fail(`widget lacks ${JSON.stringify(want)}:\n${text}`);
  }
  const link = await page.locator("footer a").getAttribute("href");
  if (link !== "https://app.totango.com/#!/customerDetails?customer=acct-2") fail(`link ${link}`);
  await page.screenshot({ path: screenshot });
  if (problems.length) fail("console: " + problems.join("; "));

  // 2. Framed by an allowed CRM page (frame-ancestors lists http://crm.test in the test).
  const host = (origin) => async (route) => route.fulfill({
    contentType: "text/html",
    body: `<!doctype html><title>CRM</title><iframe id="w" src="${widgetUrl}" ` +
          `style="width:400px;height:290px;border:0"></iframe>`,
  });
  const crm = await browser.newPage();
  const crmProblems = [];
  crm.on("console", (m) => { if (m.type() === "error") crmProblems.push(m.text()); });
  crm.on("requestfailed", (r) => crmProblems.push(`failed ${r.url()}: ${r.failure().errorText}`));
  await crm.route("http://crm.test/**", host("http://crm.test"));
  await crm.goto("http://crm.test/account");
  const frame = crm.frameLocator("#w");
  await frame.locator(".health").filter({ hasText: "Poor" }).waitFor({ timeout: 10000 })
    .catch(async (e) => {
      const frames = await Promise.all(crm.frames().map(async (f) => `${f.url()}: ${(await f.content()).slice(0, 300)}`));
      fail(`framed widget not shown (${e.message}); console: ${crmProblems.join("; ")}; frames: ${frames.join(" | ")}`);
    });
  if (crmProblems.length) fail("framed console: " + crmProblems.join("; "));

  // 3. A page that is not allowed to frame it gets nothing.
  const evil = await browser.newPage();
  const evilErrors = [];
  evil.on("console", (m) => { if (m.type() === "error") evilErrors.push(m.text()); });
  await evil.route("http://evil.test/**", host("http://evil.test"));
  await evil.goto("http://evil.test/");
  await evil.waitForTimeout(1000);
  const child = evil.frames().find((f) => f !== evil.mainFrame());
  const shown = child ? await child.locator(".widget").count().catch(() => 0) : 0;
  if (shown !== 0) fail("the widget rendered inside a page not in frame-ancestors");
  if (!evilErrors.some((e) => e.includes("frame-ancestors"))) {
    fail("no frame-ancestors refusal reported: " + evilErrors.join("; "));
  }
  console.log("widget page: ok");
} finally {
  await browser.close();
}
