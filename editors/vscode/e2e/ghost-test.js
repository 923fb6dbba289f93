// Drive code-server with Chromium: open FILE from the Explorer, type at its end, wait for ghost
// text (retyping while the extension activates and the model loads), screenshot it, accept it
// with Tab and check the line now holds it, and that the status bar shows a latency.
// Usage: PORT=18081 WS=/path/to/folder FILE=fibonacci.py SHOT=out.png node ghost-test.js
const { DEADLINE_MS, log, openFile, plain, run, t0 } = require("./common");

const FILE = process.env.FILE || "fibonacci.py";
const SHOT = process.env.SHOT || "vscode.png";
const TYPED = process.env.TYPED || "    return ";

run(SHOT, "ghost text shown and accepted", async (page, result) => {
  const lines = await openFile(page, FILE);
  await lines.click();
  // Live previews are drawn as decorations after the cursor (CSS ::after content): watch for
  // any holding a masked place (U+2591) while the completion is computed.
  await page.evaluate(() => {
    window.__previews = [];
    setInterval(() => {
      for (const el of document.querySelectorAll(".view-lines .view-line span")) {
        const content = getComputedStyle(el, "::after").content;
        if (content && content.includes("\u2591") && !window.__previews.includes(content)) {
          window.__previews.push(content);
        }
      }
    }, 15);
  });
  await page.keyboard.press("Control+End");
  await page.keyboard.type(TYPED, { delay: 30 });

  // Inline completions are asked for on typing: until the extension is active and the model
  // loaded they come back empty, so type a character and take it back until one shows.
  const ghost = page.locator(".ghost-text-decoration, .ghost-text");
  let shown = "";
  while (!shown && Date.now() - t0 < DEADLINE_MS) {
    try {
      await ghost.first().waitFor({ timeout: 2500 });
      shown = plain((await ghost.allInnerTexts()).join("\n"));
    } catch {
      await page.keyboard.type("x");
      await page.keyboard.press("Backspace");
    }
  }
  result.ghost = shown;
  result.previews = await page.evaluate(() => window.__previews);
  log("ghost text:", JSON.stringify(shown), "previews seen:", result.previews.length);
  if (!shown.trim()) {
    throw new Error("no ghost text");
  }
  // Let the status bar catch up with the completion's latency, then take the picture.
  const status = page.locator(".statusbar-item", { hasText: "Diffusion" });
  for (let i = 0; i < 20 && !/\d+ ms/.test(await status.first().innerText().catch(() => "")); i++) {
    await page.waitForTimeout(100);
  }
  result.status = plain(await status.first().innerText().catch(() => ""));
  log("status bar:", JSON.stringify(result.status));
  await page.screenshot({ path: SHOT });

  await page.keyboard.press("Tab");
  await page.waitForTimeout(300);
  const first = shown.split("\n")[0].trim();
  const current = plain(await page.locator(".view-line").allInnerTexts().then((all) => all.join("\n")));
  result.accepted = first.length > 0 && current.includes(TYPED.trim() + " " + first)
    || current.includes(TYPED.trim() + first) || current.includes(first);
  log("after Tab:", JSON.stringify(current.slice(-200)));

  // A click on the status bar item turns completions off (a settings change the extension
  // forwards; the server answers with a "disabled" status), a second click on again.
  const icon = async (name) => {
    await status.first().locator(`.codicon-${name}`).waitFor({ timeout: 15000 });
    return true;
  };
  await status.first().click();
  result.toggledOff = await icon("circle-slash").catch(() => false);
  await status.first().click();
  result.toggledOn = await icon("sparkle").catch(() => false);
  log("toggle off/on:", result.toggledOff, result.toggledOn);
  result.ok = result.accepted && /Diffusion/.test(result.status) && result.toggledOff
    && result.toggledOn;
}).catch((error) => { console.error(error); process.exit(2); });
