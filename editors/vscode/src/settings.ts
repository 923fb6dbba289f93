// The extension's settings, `diffusionLsp.*`, map one to one onto the server's settings tree:
// `diffusionLsp.completion.maxTokens` is the server's `completion.maxTokens`. A few settings are
// the extension's own (where the server is) and never reach the server. No `vscode` import here,
// so this file is unit-tested in plain Node.

import * as fs from "node:fs";
import * as path from "node:path";

export const SECTION = "diffusionLsp";

/** Settings the extension reads itself; the server would reject them as unknown. */
export const EXTENSION_ONLY = ["serverPath", "pythonPath", "trace"] as const;

export type Tree = { [key: string]: unknown };

/**
 * The server's settings tree from the section as `workspace.getConfiguration(SECTION)` reads
 * it: nested objects (VS Code splits dotted keys), minus the extension's own settings and the
 * configuration object's methods.
 */
export function serverSettings(section: Tree): Tree {
  const tree: Tree = {};
  for (const [key, value] of Object.entries(section)) {
    if (typeof value === "function" || (EXTENSION_ONLY as readonly string[]).includes(key)) {
      continue;
    }
    tree[key] = plain(value);
  }
  return tree;
}

function plain(value: unknown): unknown {
  if (Array.isArray(value)) {
    return value.map(plain);
  }
  if (value !== null && typeof value === "object") {
    const out: Tree = {};
    for (const [key, inner] of Object.entries(value as Tree)) {
      if (typeof inner !== "function") {
        out[key] = plain(inner);
      }
    }
    return out;
  }
  return value;
}

/** Flat `a.b.c` keys of a tree, for comparing it with package.json's settings. */
export function flatten(tree: Tree, prefix = ""): Tree {
  const flat: Tree = {};
  for (const [key, value] of Object.entries(tree)) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      Object.assign(flat, flatten(value as Tree, name));
    } else {
      flat[name] = value;
    }
  }
  return flat;
}

/** The nested tree of flat `a.b.c` keys (the inverse of `flatten`). */
export function nest(flat: Tree): Tree {
  const tree: Tree = {};
  for (const [name, value] of Object.entries(flat)) {
    const parts = name.split(".");
    let node = tree;
    for (const part of parts.slice(0, -1)) {
      node = (node[part] ??= {}) as Tree;
    }
    node[parts[parts.length - 1]] = value;
  }
  return tree;
}

export interface ServerCommand {
  command: string;
  args: string[];
  /** Where it came from, for messages: "diffusionLsp.serverPath", "workspace .venv", ... */
  source: string;
}

/** The same installation's `doctor` command: `serve` replaced by `doctor --json`. */
export function doctorCommand(server: ServerCommand): { command: string; args: string[] } {
  const at = server.args.lastIndexOf("serve");
  const before = at >= 0 ? server.args.slice(0, at) : server.args;
  return { command: server.command, args: [...before, "doctor", "--json"] };
}

export interface Lookup {
  /** Whether a file exists and is executable. */
  executable(file: string): boolean;
  env: { [key: string]: string | undefined };
  platform: string;
  workspaceFolders: string[];
}

export const nodeLookup = (workspaceFolders: string[]): Lookup => ({
  executable(file: string): boolean {
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return fs.statSync(file).isFile();
    } catch {
      return false;
    }
  },
  env: process.env,
  platform: process.platform,
  workspaceFolders,
});

/** The server executable's name inside a Python environment's scripts folder. */
function scriptIn(env: string, platform: string, name: string): string {
  return platform === "win32" ? path.join(env, "Scripts", `${name}.exe`) : path.join(env, "bin", name);
}

/** The first `name` on PATH, or undefined. */
export function onPath(name: string, lookup: Lookup): string | undefined {
  const sep = lookup.platform === "win32" ? ";" : ":";
  const exts = lookup.platform === "win32" ? [".exe", ".cmd", ""] : [""];
  for (const dir of (lookup.env.PATH ?? "").split(sep)) {
    for (const ext of exts) {
      const candidate = path.join(dir, name + ext);
      if (dir && lookup.executable(candidate)) {
        return candidate;
      }
    }
  }
  return undefined;
}

/**
 * How to start the server: `serverPath`, else `pythonPath -m diffusion_lsp serve`, else the
 * workspace's `.venv`, else `diffusion-lsp` on PATH. A string is the reason none was found,
 * phrased with the fix.
 */
export function resolveServer(section: Tree, lookup: Lookup): ServerCommand | string {
  const serverPath = String(section.serverPath ?? "").trim();
  const pythonPath = String(section.pythonPath ?? "").trim();
  if (serverPath) {
    return lookup.executable(serverPath)
      ? { command: serverPath, args: ["serve"], source: `${SECTION}.serverPath` }
      : `${SECTION}.serverPath is "${serverPath}", which is not an executable file. ` +
          "Point it at diffusion-lsp inside the Python environment where it is installed " +
          "(e.g. /path/to/diffusion-lsp/.venv/bin/diffusion-lsp), or clear it.";
  }
  if (pythonPath) {
    return lookup.executable(pythonPath)
      ? { command: pythonPath, args: ["-m", "diffusion_lsp", "serve"], source: `${SECTION}.pythonPath` }
      : `${SECTION}.pythonPath is "${pythonPath}", which is not an executable file. ` +
          "Point it at the python of the environment where diffusion-lsp is installed, or clear it.";
  }
  for (const folder of lookup.workspaceFolders) {
    const candidate = scriptIn(path.join(folder, ".venv"), lookup.platform, "diffusion-lsp");
    if (lookup.executable(candidate)) {
      return { command: candidate, args: ["serve"], source: "the workspace's .venv" };
    }
  }
  const found = onPath("diffusion-lsp", lookup);
  if (found) {
    return { command: found, args: ["serve"], source: "PATH" };
  }
  return (
    "the diffusion-lsp server was not found (not on PATH, no .venv/bin/diffusion-lsp in the " +
    "workspace). Install it — in a clone of diffusion-lsp run scripts/run.sh, or " +
    "pip install -e /path/to/diffusion-lsp — then set diffusionLsp.serverPath to " +
    "/path/to/diffusion-lsp/.venv/bin/diffusion-lsp."
  );
}
