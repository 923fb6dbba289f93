// Next edits in code-server, driven by Chromium: open shapes.py, rename the parameter `width` to
// `w` in the signature, wait for the suggested edit's decorations (the deleted text struck
// through, "Tab" after it), screenshot, Tab jumps to it, Tab applies it; the next suggestion is
// dismissed with Escape (then Tab is a plain Tab again).
// Usage: PORT=18081 WS=/path/to/folder FILE=shapes.py SHOT=out.png node nes-test.js
const { DEADLINE_MS, decorations, editorText, log, plain, renameWidth, run, t0, waitFor } = require("./common");

const FILE = process.env.FILE || "shapes.py";
const SHOT = process.env.SHOT || "vscode-nes.png";

run(SHOT, "next edit shown, jumped to, applied, dismissed", async (page, result) => {
  const text = () => editorText(page);
  await renameWidth(page, FILE);

  const first = await waitFor(page, async () => {
    const seen = await page.evaluate(decorations);
    return seen.struck.length && seen.after.some((c) => c.includes("Tab")) ? seen : null;
  }, DEADLINE_MS - (Date.now() - t0));
  result.first = first;
  log("first suggestion:", JSON.stringify(first));
  await page.screenshot({ path: SHOT });
  if (!first) throw new Error("no next edit shown");

  await page.keyboard.press("Tab"); // jump
  await page.waitForTimeout(300);
  result.jumped = plain(await page.locator(".statusbar-item", { hasText: /Ln \d+/ }).first().innerText());
  log("after the first Tab:", result.jumped);
  await page.keyboard.press("Tab"); // apply
  result.applied = await waitFor(page, async () => {
    const now = await text();
    return now.includes("The area of a w by height") ? now : null;
  }, 5000);
  log("after the second Tab:", JSON.stringify(result.applied));

  const second = await waitFor(page, async () => {
    const seen = await page.evaluate(decorations);
    return seen.struck.length ? seen : null;
  }, 20000);
  result.second = second;
  await page.keyboard.press("Escape"); // dismiss
  result.dismissed = await waitFor(page, async () => {
    const seen = await page.evaluate(decorations);
    return seen.struck.length === 0 ? true : null;
  }, 5000);
  result.final = await text();
  result.ok = Boolean(first && /Ln 2/.test(result.jumped) && result.applied && second
    && result.dismissed && result.final.includes("return width * height"));
}).catch((error) => { console.error(error); process.exit(2); });
