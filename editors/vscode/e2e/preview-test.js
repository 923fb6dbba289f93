// The live preview in code-server leaves nothing behind (issue 29): type at the end of FILE and,
// while the hole denoises (masked places, U+2591, drawn after the cursor), press Escape: the
// preview must be gone at once and stay gone; again, and move the cursor to another line: no
// stale line of ghost-styled text; once more, let it finish: no frame without the preview
// between its first step and its last (each step replaces the one before in place).
// Usage: PORT=18081 WS=/path/to/folder FILE=fibonacci.py SHOT=out.png node preview-test.js
const { DEADLINE_MS, log, openFile, run, t0 } = require("./common");

const FILE = process.env.FILE || "fibonacci.py";
const SHOT = process.env.SHOT || "vscode-preview.png";

// In the page: every animation frame, whether a preview (an ::after holding U+2591) is drawn,
// and every ::after text on screen (a stale preview line shows there).
const watch = () => {
  window.__frames = [];
  const afters = () => {
    const out = [];
    for (const el of document.querySelectorAll(".view-lines .view-line span")) {
      const content = getComputedStyle(el, "::after").content;
      if (content && content !== "none" && content !== "normal" && content !== '""') out.push(content);
    }
    return out;
  };
  window.__afters = afters;
  const frame = () => {
    const shown = afters();
    window.__frames.push({ t: performance.now(), masked: shown.some((c) => c.includes("\u2591")),
                           any: shown.length > 0,
                           ghost: document.querySelectorAll(".ghost-text-decoration, .ghost-text").length > 0 });
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
};

run(SHOT, "previews never stale, never blank", async (page, result) => {
  const lines = await openFile(page, FILE);
  await lines.click();
  await page.evaluate(watch);
  const masked = () => page.evaluate(() => window.__afters().some((c) => c.includes("\u2591")));
  const anyAfter = () => page.evaluate(() => window.__afters());
  // Type, retyping while the extension activates and the model loads, until a preview shows.
  const startPreview = async (typed) => {
    await page.keyboard.type(typed, { delay: 20 });
    for (let i = 0; Date.now() - t0 < DEADLINE_MS; i++) {
      const until = Date.now() + 2500;
      while (Date.now() < until) {
        if (await masked()) return true;
        await page.waitForTimeout(5);
      }
      await page.keyboard.type("x");
      await page.keyboard.press("Backspace");
    }
    return false;
  };
  await page.keyboard.press("Control+End");

  // 1. Escape while the hole denoises
  if (!(await startPreview("    return "))) throw new Error("no preview drawn");
  await page.keyboard.press("Escape");
  await page.waitForTimeout(150);
  result.afterEscape = await anyAfter();
  await page.waitForTimeout(1500);
  result.afterEscapeLater = await anyAfter();
  log("after Escape:", JSON.stringify(result.afterEscape), "later:", JSON.stringify(result.afterEscapeLater));

  // 2. a cursor move to another line while it denoises
  if (!(await startPreview("x"))) throw new Error("no second preview");
  await page.keyboard.press("ArrowUp");
  await page.waitForTimeout(150);
  result.afterMove = await anyAfter();
  await page.waitForTimeout(1500);
  result.afterMoveLater = await anyAfter();
  log("after the move:", JSON.stringify(result.afterMove), "later:", JSON.stringify(result.afterMoveLater));

  // 3. a hole left to finish: the preview, step after step, then the ghost text; no blank frame
  await page.keyboard.press("ArrowDown");
  await page.keyboard.press("End");
  await page.evaluate(() => { window.__frames = []; });
  if (!(await startPreview("y"))) throw new Error("no third preview");
  await page.locator(".ghost-text-decoration, .ghost-text").first().waitFor({ timeout: 20000 });
  await page.screenshot({ path: SHOT });
  const frames = await page.evaluate(() => window.__frames);
  const first = frames.findIndex((f) => f.masked);
  const last = frames.map((f) => f.masked).lastIndexOf(true);
  result.previewFrames = last - first + 1;
  const during = frames.slice(first, last + 1);
  result.blankFrames = during.filter((f) => !f.any && !f.ghost).length;
  // run-length picture of those frames: M masked preview, A other ::after, G ghost text, . none
  let picture = "";
  let prev = "";
  let count = 0;
  for (const f of during) {
    const c = f.masked ? "M" : f.any ? "A" : f.ghost ? "G" : ".";
    if (c === prev) { count += 1; continue; }
    if (prev) picture += prev + count + " ";
    prev = c;
    count = 1;
  }
  result.frames = picture + prev + count;
  log("preview frames:", result.previewFrames, "blank frames among them:", result.blankFrames, result.frames);
  result.ok = result.afterEscape.length === 0 && result.afterEscapeLater.length === 0
    && result.afterMove.length === 0 && result.afterMoveLater.length === 0
    && result.previewFrames > 0 && result.blankFrames === 0;
}).catch((error) => { console.error(error); process.exit(2); });
