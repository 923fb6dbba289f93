// What the code-server scripts (ghost-test.js, nes-test.js) share: the clock and log, Chromium
// launched as this machine allows, the workspace's FILE opened from the Explorer, and the
// ending (a screenshot on failure, the RESULT line, the exit code).
const { chromium } = require("playwright-core");

const PORT = process.env.PORT || 18081;
const WS = process.env.WS;
const DEADLINE_MS = Number(process.env.DEADLINE_MS || 90000);

const t0 = Date.now();
const log = (...args) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...args);
const plain = (text) => text.replace(/\u00a0/g, " ");

async function launch() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 560 } });
  return { browser, page };
}

// Open `file` from the Explorer; returns the editor's lines once they are there.
async function openFile(page, file) {
  await page.goto(`http://127.0.0.1:${PORT}/?folder=${encodeURIComponent(WS)}`,
                  { waitUntil: "domcontentloaded" });
  await page.waitForSelector(".explorer-folders-view .monaco-list-row", { timeout: 60000 });
  await page.locator(".explorer-folders-view .monaco-list-row", { hasText: file }).first().click();
  const lines = page.locator(".editor-instance .monaco-editor .view-lines");
  await lines.waitFor({ timeout: 20000 });
  log("editor open");
  return lines;
}

// Run `scenario(page, result)`; on an error keep it and a screenshot in `shot`; print the
// RESULT line and exit 0 when `result.ok`.
async function run(shot, passed, scenario) {
  const { browser, page } = await launch();
  const result = { ok: false };
  try {
    await scenario(page, result);
  } catch (error) {
    result.error = String(error);
    await page.screenshot({ path: shot }).catch(() => {});
  } finally {
    await browser.close();
  }
  console.log("RESULT " + JSON.stringify(result));
  log(result.ok ? `PASS ${passed}` : "FAIL");
  process.exit(result.ok ? 0 : 1);
}

// What the page shows of a next edit: struck-through text, and the `after` decorations (VS Code
// renders them as CSS ::after content), each with its line's top and its right edge, and the
// editor's right edge (run in the page).
const decorations = () => {
  const struck = [];
  const after = [];
  const placed = [];
  for (const element of document.querySelectorAll(".view-lines span")) {
    if (getComputedStyle(element).textDecorationLine.includes("line-through")) {
      struck.push(element.textContent);
    }
    const content = getComputedStyle(element, "::after").content;
    if (content && content !== "none" && content !== "normal") {
      after.push(content);
      const line = element.closest(".view-line");
      placed.push({ content, top: line ? line.getBoundingClientRect().top : null,
                    right: element.getBoundingClientRect().right });
    }
  }
  const editor = document.querySelector(".editor-instance .monaco-editor .overflow-guard");
  return { struck, after, placed, editorRight: editor ? editor.getBoundingClientRect().right : null };
};

// `check()` until it returns something truthy (polling every 100 ms), or null after `ms`.
async function waitFor(page, check, ms) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const value = await check();
    if (value) return value;
    await page.waitForTimeout(100);
  }
  return null;
}

// The editor's text (what the view lines show, decorations aside).
async function editorText(page) {
  return plain(await page.locator(".view-line").allInnerTexts().then((all) => all.join("\n")));
}

// Open `file` (shapes.py), wait for the server (the status bar item says "ready" once it
// answers), and rename the parameter `width` to `w` in the signature: next edits follow.
async function renameWidth(page, file) {
  const lines = await openFile(page, file);
  await lines.click();
  const status = page.locator(".statusbar-item", { hasText: "Diffusion" });
  await waitFor(page, async () => /sparkle/.test(await status.first().innerHTML().catch(() => "")), 60000);
  await page.keyboard.press("Control+Home");
  for (let i = 0; i < 9; i++) await page.keyboard.press("ArrowRight");
  await page.keyboard.press("Shift+Control+ArrowRight"); // select `width`
  await page.keyboard.type("w");
  log("renamed:", JSON.stringify((await editorText(page)).split("\n")[0]));
}

module.exports = { DEADLINE_MS, decorations, editorText, log, openFile, plain, renameWidth, run, t0, waitFor };
