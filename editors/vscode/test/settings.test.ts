// Unit tests of what the extension sends the server and how it finds it (node --test).
// tests/test_vscode_settings.py checks package.json's settings against the server's own tree.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import {
  doctorCommand,
  EXTENSION_ONLY,
  flatten,
  type Lookup,
  nest,
  resolveServer,
  SECTION,
  serverSettings,
} from "../src/settings";
import { changesText, editLines, HINT } from "../src/nextEditLayout";
import { decorationText, isPreview, LINE_BREAK, type Preview, PreviewGate, previewChunks } from "../src/preview";
import { DOCTOR, doctorReport, type Requester, STATS, statsReport } from "../src/reports";
import { clickCommand, statusView } from "../src/status";

const root = path.join(__dirname, "..", "..");
const manifest = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
const properties: { [key: string]: { default: unknown } } = manifest.contributes.configuration.properties;

/** The section as VS Code's getConfiguration(SECTION) shows it: nested, with methods. */
function configuration(overrides: { [key: string]: unknown } = {}) {
  const flat: { [key: string]: unknown } = {};
  for (const [name, property] of Object.entries(properties)) {
    flat[name.slice(SECTION.length + 1)] = property.default;
  }
  return { ...nest({ ...flat, ...overrides }), get: () => undefined, update: async () => undefined };
}

test("every setting lives under the diffusionLsp section", () => {
  for (const name of Object.keys(properties)) {
    assert.ok(name.startsWith(`${SECTION}.`), name);
  }
});

test("the server gets its settings as one nested tree, with the package.json defaults", () => {
  const tree = serverSettings(configuration());
  assert.equal((tree.completion as { maxTokens: number }).maxTokens, 64);
  assert.equal((tree.model as { path: unknown }).path, null);
  assert.equal(tree.enable, true);
  const flat = flatten(tree);
  const expected = Object.keys(properties)
    .map((name) => name.slice(SECTION.length + 1))
    .filter((name) => !EXTENSION_ONLY.some((own) => name === own || name.startsWith(`${own}.`)));
  assert.deepEqual(Object.keys(flat).sort(), expected.sort());
});

test("the extension's own settings and the configuration's methods never reach the server", () => {
  const tree = serverSettings(configuration({ serverPath: "/x/diffusion-lsp", pythonPath: "/x/python" }));
  for (const own of EXTENSION_ONLY) {
    assert.ok(!(own in tree), own);
  }
  assert.ok(!("get" in tree) && !("update" in tree));
  assert.doesNotThrow(() => JSON.stringify(tree));
});

test("a changed setting is sent at its place in the tree", () => {
  const tree = serverSettings(configuration({ "completion.maxTokens": 16, enable: false, "completion.stop": ["\n\n"] }));
  assert.deepEqual(
    { maxTokens: (tree.completion as Tree).maxTokens, stop: (tree.completion as Tree).stop, enable: tree.enable },
    { maxTokens: 16, stop: ["\n\n"], enable: false },
  );
});

type Tree = { [key: string]: unknown };

function lookup(executables: string[], PATH = "/usr/bin:/opt/bin", folders: string[] = []): Lookup {
  return { executable: (file) => executables.includes(file), env: { PATH }, platform: "linux", workspaceFolders: folders };
}

test("the server is found: serverPath, then pythonPath, then the workspace .venv, then PATH", () => {
  const all = ["/s/diffusion-lsp", "/py/python", "/ws/.venv/bin/diffusion-lsp", "/opt/bin/diffusion-lsp"];
  assert.deepEqual(resolveServer({ serverPath: "/s/diffusion-lsp" }, lookup(all, undefined, ["/ws"])), {
    command: "/s/diffusion-lsp",
    args: ["serve"],
    source: "diffusionLsp.serverPath",
  });
  assert.deepEqual(resolveServer({ pythonPath: "/py/python" }, lookup(all, undefined, ["/ws"])), {
    command: "/py/python",
    args: ["-m", "diffusion_lsp", "serve"],
    source: "diffusionLsp.pythonPath",
  });
  assert.equal((resolveServer({}, lookup(all, undefined, ["/ws"])) as { command: string }).command, "/ws/.venv/bin/diffusion-lsp");
  assert.equal((resolveServer({}, lookup(all)) as { command: string }).command, "/opt/bin/diffusion-lsp");
});

test("a missing server is explained with the fix", () => {
  const missing = resolveServer({}, lookup([]));
  assert.equal(typeof missing, "string");
  assert.match(missing as string, /not found/);
  assert.match(missing as string, /diffusionLsp\.serverPath/);
  const wrong = resolveServer({ serverPath: "/nope/diffusion-lsp" }, lookup([]));
  assert.match(wrong as string, /not an executable/);
});

test("the status bar shows loading, ready with the last latency, disabled and errors", () => {
  assert.match(statusView({ state: "loading", message: "loading the model" }).text, /sync~spin/);
  const ready = statusView({ state: "ready", model: "bundled", device: "cpu", lastLatencyMs: 41.6 });
  assert.equal(ready.text, "$(sparkle) Diffusion 42 ms");
  assert.match(ready.tooltip, /bundled on cpu/);
  assert.equal(statusView({ state: "ready", lastLatencyMs: null }).text, "$(sparkle) Diffusion");
  assert.match(statusView({ state: "disabled" }).text, /circle-slash/);
  assert.equal(statusView({ state: "error", message: "no model" }).severity, "error");
  assert.equal(clickCommand({ state: "ready" }), "diffusionLsp.toggle");
  assert.equal(clickCommand({ state: "disabled" }), "diffusionLsp.toggle");
  assert.equal(clickCommand({ state: "error" }), "diffusionLsp.showOutput");
});

test("the reference sampler settings reach the server under completion.sampler", () => {
  const tree = serverSettings(configuration({
    "completion.sampler.algorithm": "entropy", "completion.sampler.steps": 32, "completion.sampler.topP": 0.95,
  }));
  const sampler = (tree.completion as Tree).sampler as Tree;
  assert.deepEqual(
    { algorithm: sampler.algorithm, steps: sampler.steps, topP: sampler.topP, exact: sampler.exact },
    { algorithm: "entropy", steps: 32, topP: 0.95, exact: false },
  );
});

test("the status command runs the same installation's doctor when the server is not running", () => {
  assert.deepEqual(doctorCommand({ command: "/venv/bin/diffusion-lsp", args: ["serve"], source: "PATH" }), {
    command: "/venv/bin/diffusion-lsp",
    args: ["doctor", "--json"],
  });
  assert.deepEqual(
    doctorCommand({ command: "/usr/bin/python3", args: ["-m", "diffusion_lsp", "serve"], source: "pythonPath" }),
    { command: "/usr/bin/python3", args: ["-m", "diffusion_lsp", "doctor", "--json"] },
  );
});

test("a preview's text becomes runs of committed text and masked places", () => {
  assert.deepEqual(previewChunks("ab\u2591\u2591c\nd\u2591"), [
    { text: "ab", masked: false },
    { text: "\u2591\u2591", masked: true },
    { text: decorationText(`c${LINE_BREAK}d`), masked: false },
    { text: "\u2591", masked: true },
  ]);
  assert.ok(isPreview({ textDocument: { uri: "file:///a", version: 1 }, position: { line: 0, character: 1 },
                        step: 1, steps: 2, text: "", done: false }));
  assert.ok(!isPreview({ textDocument: { uri: 3 } }));
});

test("runs of spaces and tabs in a preview are kept (CSS would collapse them)", () => {
  assert.equal(decorationText("a  =\tb", 2), "a\u00a0\u00a0=\u00a0\u00a0b");
  assert.deepEqual(previewChunks("x    \u2591"), [
    { text: "x\u00a0\u00a0\u00a0\u00a0", masked: false },
    { text: "\u2591", masked: true },
  ]);
});

test("a preview is drawn only while its request runs, at its position", () => {
  const preview = (line: number, character: number, done = false): Preview => ({
    textDocument: { uri: "file:///a.py", version: 3 }, position: { line, character },
    step: 1, steps: 4, text: "a\u2591", done,
  });
  const gate = new PreviewGate();
  assert.ok(!gate.admits(preview(1, 4)));  // no request
  const first = gate.begin("file:///a.py", 1, 4);
  assert.ok(gate.admits(preview(1, 4)));
  assert.ok(!gate.admits(preview(1, 5)));  // another position
  assert.ok(!gate.admits(preview(1, 4, true)));  // the last one clears
  const second = gate.begin("file:///a.py", 2, 0);  // supersedes the first
  assert.ok(!gate.admits(preview(1, 4)));  // a late preview of the first
  assert.equal(gate.end(first), false);  // the first ending does not clear the second's
  assert.equal(gate.end(second), true);  // answered, cancelled (Escape, a cursor move): clear
  assert.ok(!gate.admits(preview(2, 0)));  // one arriving after its request ended
});

test("a next edit of several lines is drawn as its lines, the Tab hint first", () => {
  const lines = editLines("if w < 0:\n        raise ValueError(w)\n    return w", 2, "    ", " * height", 6, true);
  assert.deepEqual(lines.map((l) => l.line), [2, 3, 4]);
  assert.ok(lines[0].text.startsWith(HINT));
  assert.equal(lines[0].text, HINT + decorationText("    if w < 0:"));
  assert.equal(lines[2].text, "   " + decorationText("    return w * height"));
  for (const line of lines) {
    assert.ok(!line.text.includes("\n") && line.text.length < 60, line.text);
  }
  // past the document's end they stay on its last line
  assert.deepEqual(editLines("a\nb\nc", 0, "", "", 2, false).map((l) => l.line), [0, 1, 1]);
});

test("a save (a change event with no changes) is not a text change", () => {
  assert.equal(changesText({ contentChanges: [] }), false);
  assert.equal(changesText({ contentChanges: [{ text: "x" }] }), true);
});

/** A language client that answers each method from `answers` and records what it was asked. */
function requester(answers: { [method: string]: unknown }): Requester & { asked: string[] } {
  const asked: string[] = [];
  return {
    asked,
    async sendRequest<T>(method: string): Promise<T> {
      asked.push(method);
      if (!(method in answers)) {
        throw new Error(`no ${method}`);
      }
      return answers[method] as T;
    },
  };
}

test("the statistics command asks the server for its statistics only, never the doctor", async () => {
  const server = requester({ [STATS]: { requests: 3 }, [DOCTOR]: { text: "machine ..." } });
  const shown = await statsReport(server);
  assert.deepEqual(server.asked, [STATS]);
  assert.equal(shown.level, "info");
  assert.ok(shown.text.includes('"requests": 3') && !shown.text.includes("machine"), shown.text);
  assert.deepEqual(await statsReport(undefined), {
    level: "warn",
    text: "the server is not running: no statistics",
  });
  assert.equal((await statsReport(requester({}))).level, "error");
});

test("the doctor command asks the running server, else runs the installation's doctor", async () => {
  const server = requester({ [STATS]: { requests: 3 }, [DOCTOR]: { text: "server ready" } });
  const fromServer = await doctorReport(server, async () => ({ text: "not this one" }));
  assert.deepEqual(server.asked, [DOCTOR]);
  assert.equal(fromServer.text, "doctor:\nserver ready");
  const installed = await doctorReport(undefined, async () => ({
    text: "python 3.11",
    recommendation: { model: "dream", expect: "1 s" },
  }));
  assert.equal(installed.text, "doctor:\npython 3.11");
  assert.equal(installed.report?.recommendation?.model, "dream");
  const failed = await doctorReport(undefined, async () => {
    throw new Error("diffusion-lsp: not found");
  });
  assert.deepEqual(failed, { level: "error", text: "doctor: diffusion-lsp: not found" });
});
