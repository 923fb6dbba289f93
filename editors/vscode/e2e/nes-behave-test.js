// Next edits in code-server with auto-save on (issue 29): rename `width` to `w` in shapes.py's
// signature; the suggested edit must stay shown through the saves that follow (a save changes
// no text), and Tab must do exactly what is shown: jump, then apply it. The next suggestion is
// several lines (a guard before the `return`): drawn as lines, each short, the Tab hint inside
// the editor; Tab, Tab applies it. With nothing shown, Tab is a plain Tab.
// Usage: PORT=18081 WS=/path/to/folder FILE=shapes.py SHOT=out.png node nes-behave-test.js
const fs = require("node:fs");
const path = require("node:path");

const { DEADLINE_MS, decorations, editorText, log, plain, renameWidth, run, t0, waitFor } = require("./common");

const FILE = process.env.FILE || "shapes.py";
const SHOT = process.env.SHOT || "vscode-nes-behave.png";
const SAVES_MS = Number(process.env.SAVES_MS || 2000); // several auto-save delays

run(SHOT, "next edits kept through saves, Tab does what is shown, several lines as lines",
    async (page, result) => {
  const text = () => editorText(page);
  const onDisk = () => fs.readFileSync(path.join(process.env.WS, FILE), "utf8");
  await renameWidth(page, FILE);

  const shownWithHint = async () => {
    const seen = await page.evaluate(decorations);
    return seen.after.some((c) => c.includes("Tab")) ? seen : null;
  };
  // whether the suggestion stayed on screen all through `ms` (sampled every 50 ms)
  const staysShown = async (ms) => {
    const until = Date.now() + ms;
    let kept = true;
    while (Date.now() < until) {
      kept = kept && Boolean(await shownWithHint());
      await page.waitForTimeout(50);
    }
    return kept;
  };
  const first = await waitFor(page, shownWithHint, DEADLINE_MS - (Date.now() - t0));
  if (!first) throw new Error("no next edit shown");
  log("first suggestion:", JSON.stringify(first.after));
  // auto-save writes the file a moment later, and again: the suggestion stays
  result.keptThroughSave = await staysShown(SAVES_MS);
  result.saved = onDisk().includes("def area(w, height)");
  log("saved:", result.saved, "still shown after the saves:", result.keptThroughSave);

  await page.keyboard.press("Tab"); // jump
  await page.waitForTimeout(300);
  result.jumped = plain(await page.locator(".statusbar-item", { hasText: /Ln \d+/ }).first().innerText());
  await page.keyboard.press("Tab"); // apply
  result.applied = await waitFor(page, async () => {
    const now = await text();
    return now.includes("The area of a w by height") ? now : null;
  }, 5000);
  log("jumped:", result.jumped, "applied:", Boolean(result.applied));

  // the guard: an edit of several lines
  const guard = await waitFor(page, async () => {
    const seen = await shownWithHint();
    return seen && seen.after.some((c) => c.includes("raise")) ? seen : null;
  }, 20000);
  if (!guard) throw new Error("no edit of several lines shown");
  await page.screenshot({ path: SHOT });
  const inserted = guard.placed.filter((p) => !p.content.includes("\u2591"));
  result.guardLines = new Set(inserted.map((p) => p.top)).size;
  result.longest = Math.max(...inserted.map((p) => p.content.length));
  const hint = inserted.find((p) => p.content.includes("Tab"));
  result.hintVisible = hint !== undefined && guard.editorRight !== null && hint.right <= guard.editorRight;
  log("several lines:", JSON.stringify(inserted.map((p) => p.content)), "hint visible:", result.hintVisible);
  result.guardKeptThroughSave = await staysShown(SAVES_MS);

  await page.keyboard.press("Tab"); // jump
  await page.waitForTimeout(300);
  await page.keyboard.press("Tab"); // apply
  result.final = await waitFor(page, async () => {
    const now = await text();
    return now.includes("raise ValueError") ? now : null;
  }, 5000);
  log("after the guard:", JSON.stringify(result.final));

  // nothing shown now: Tab is a plain Tab (indents the line's end)
  await waitFor(page, async () => ((await page.evaluate(decorations)).after.length === 0 ? true : null), 5000);
  const before = await text();
  await page.keyboard.press("Control+End");
  await page.keyboard.press("Tab");
  await page.waitForTimeout(300);
  const after = await text();
  result.plainTab = after.length > before.length && after.replace(/\s/g, "") === before.replace(/\s/g, "");
  log("plain Tab:", result.plainTab);
  result.ok = Boolean(result.saved && result.keptThroughSave && /Ln 2/.test(result.jumped) && result.applied
    && result.guardLines >= 3 && result.longest < 80 && result.hintVisible && result.guardKeptThroughSave
    && result.final && result.final.includes("return w * height") && result.plainTab);
}).catch((error) => { console.error(error); process.exit(2); });
