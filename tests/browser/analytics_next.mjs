// Loads Segment's analytics.js (@segment/analytics-next, from npm) on a page
// and calls identify, group, page and track against the server, the way a
// website sends from its visitors' browsers. Prints a JSON summary of what
// the browser saw of the server's answers.
// Usage: node analytics_next.mjs PAGE_URL API_HOST WRITE_KEY USER ACCOUNT EXPECT
//   API_HOST: host:port/v1 of the server (analytics-next's apiHost setting)
//   EXPECT: "delivered" (wait for the four calls' answers) or "blocked"
// Run by tests/browser_sources.rs.
import { chromium } from "playwright-core";

const [pageUrl, apiHost, writeKey, user, account, expect] = process.argv.slice(2);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage();
  const answers = [];
  const failures = [];
  const errors = [];
  const toServer = (url) => url.includes(`//${apiHost}/`);
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("response", (r) => {
    if (toServer(r.url())) answers.push({ method: r.request().method(), path: new URL(r.url()).pathname, status: r.status() });
  });
  page.on("requestfailed", (r) => {
    if (toServer(r.url())) failures.push({ path: new URL(r.url()).pathname, error: r.failure()?.errorText });
  });
  const loaded = await page.goto(pageUrl);
  if (loaded.status() !== 200) throw new Error(`page answered ${loaded.status()}`);

  await page.evaluate(
    async ({ writeKey, apiHost, user, account }) => {
      const { AnalyticsBrowser } = window.AnalyticsNext;
      // The settings analytics.js would fetch from Segment's CDN, given here:
      // the server as its API host, over plain HTTP in this test.
      const [analytics] = await AnalyticsBrowser.load({
        writeKey,
        cdnSettings: { integrations: { "Segment.io": { apiKey: writeKey, apiHost, protocol: "http" } } },
      });
      const options = { context: { groupId: account } };
      await analytics.identify(user, { email: `${user}@example.com`, name: "Ann" }, options);
      await analytics.group(account, { name: "Acme", plan: "Pro" });
      await analytics.page("Docs", "Index", {}, options);
      await analytics.track("Opened Report", { rows: 3 }, options);
    },
    { writeKey, apiHost, user, account },
  );

  // The four posts (after a preflight each, or one cached): wait for their
  // answers, or give a blocked page time to try.
  const deadline = Date.now() + 10000;
  const posts = () => answers.filter((a) => a.method === "POST");
  if (expect === "delivered") {
    while (posts().length < 4 && Date.now() < deadline) await page.waitForTimeout(50);
  } else {
    while (failures.length < 4 && Date.now() < deadline) await page.waitForTimeout(50);
  }
  console.log(JSON.stringify({ answers, failures, errors }));
} finally {
  await browser.close();
}
