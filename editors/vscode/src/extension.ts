// diffusion-lsp for VS Code: start `diffusion-lsp serve`, pass the `diffusionLsp.*` settings
// through, show the server's status. Ghost text comes from vscode-languageclient's built-in
// inline completion support (registered by default since version 10); the intelligence stays in
// the server.

import { execFile } from "node:child_process";

import * as vscode from "vscode";
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  type LanguageClientOptions,
  RevealOutputChannelOn,
  type ServerOptions,
  State,
} from "vscode-languageclient/node";

import { NextEdits } from "./nextEdit";
import { isPreview, PREVIEW } from "./preview";
import { PreviewView } from "./previewView";
import { type DoctorReport, doctorReport, type Report, statsReport } from "./reports";
import { doctorCommand, nodeLookup, resolveServer, SECTION, serverSettings, type Tree } from "./settings";
import { clickCommand, type Status, statusView } from "./status";

const STATUS = "diffusion/status";
const DOCTOR_TIMEOUT_MS = 60_000;
/** Settings whose change needs a new server process. */
const RESTART_KEYS = ["serverPath", "pythonPath"];

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let item: vscode.StatusBarItem;
let previews: PreviewView;

function section(): Tree {
  return vscode.workspace.getConfiguration(SECTION) as unknown as Tree;
}

function showStatus(status: Status): void {
  const view = statusView(status);
  item.text = view.text;
  item.tooltip = view.tooltip;
  item.command = clickCommand(status);
  item.backgroundColor =
    view.severity === undefined ? undefined : new vscode.ThemeColor(`statusBarItem.${view.severity}Background`);
}

async function fail(message: string, ...actions: string[]): Promise<void> {
  output.error(message);
  showStatus({ state: "stopped", message });
  const choice = await vscode.window.showErrorMessage(`diffusion-lsp: ${message}`, ...actions);
  if (choice === "Open Settings") {
    await vscode.commands.executeCommand("workbench.action.openSettings", SECTION);
  } else if (choice === "Show Output") {
    output.show();
  }
}

async function start(): Promise<void> {
  const folders = (vscode.workspace.workspaceFolders ?? []).map((folder) => folder.uri.fsPath);
  const server = resolveServer(section(), nodeLookup(folders));
  if (typeof server === "string") {
    await fail(server, "Open Settings");
    return;
  }
  output.info(`starting ${server.command} ${server.args.join(" ")} (from ${server.source})`);
  const serverOptions: ServerOptions = {
    command: server.command,
    args: server.args, // stdio; a `transport` would add a --stdio flag the server does not take
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: serverSettings(section()),
    outputChannel: output,
    revealOutputChannelOn: RevealOutputChannelOn.Never,
    // The client sends the section on start and on every change; the middleware sends the
    // server's part of it only (the server rejects keys it does not know).
    synchronize: { configurationSection: SECTION },
    middleware: {
      ...previews.middleware,
      workspace: {
        didChangeConfiguration: async () => {
          await client?.sendNotification(DidChangeConfigurationNotification.type, {
            settings: { [SECTION]: serverSettings(section()) },
          });
        },
      },
    },
  };
  const started = new LanguageClient(SECTION, "diffusion-lsp", serverOptions, clientOptions);
  client = started;
  started.onNotification(STATUS, (status: Status) => showStatus(status));
  started.onNotification(PREVIEW, (params: unknown) => {
    if (isPreview(params)) {
      previews.show(params);
    }
  });
  started.onDidChangeState((event) => {
    if (event.newState === State.Stopped && client === started) {
      showStatus({ state: "stopped", message: "the server stopped" });
    }
  });
  showStatus({ state: "starting" });
  try {
    await started.start();
  } catch (error) {
    await fail(
      `the server (${server.command} ${server.args.join(" ")}, from ${server.source}) failed to ` +
        `start: ${error instanceof Error ? error.message : String(error)}. Its output says why; ` +
        "check that diffusion-lsp is installed in that environment.",
      "Show Output",
      "Open Settings",
    );
  }
}

async function stop(): Promise<void> {
  const running = client;
  client = undefined;
  if (running !== undefined && running.state !== State.Stopped) {
    try {
      await running.stop(5000);
    } catch (error) {
      output.warn(`stopping the server: ${String(error)}`);
    }
  }
}

async function restart(): Promise<void> {
  await stop();
  await start();
}

/** Set `enable` where it is set (workspace or user settings), so the change takes effect. */
async function setEnabled(enable: boolean | undefined): Promise<void> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const value = enable ?? !config.get<boolean>("enable", true);
  const where = config.inspect<boolean>("enable");
  const target =
    where?.workspaceFolderValue !== undefined
      ? vscode.ConfigurationTarget.WorkspaceFolder
      : where?.workspaceValue !== undefined
        ? vscode.ConfigurationTarget.Workspace
        : vscode.ConfigurationTarget.Global;
  await config.update("enable", value, target);
}

/** `diffusion-lsp doctor` of the server's installation, run directly (the server is not up). */
function runDoctor(): Promise<DoctorReport> {
  const folders = (vscode.workspace.workspaceFolders ?? []).map((folder) => folder.uri.fsPath);
  const server = resolveServer(section(), nodeLookup(folders));
  if (typeof server === "string") {
    return Promise.reject(new Error(server));
  }
  const doctor = doctorCommand(server);
  return new Promise((resolve, reject) => {
    execFile(doctor.command, doctor.args, { timeout: DOCTOR_TIMEOUT_MS }, (error, stdout, stderr) => {
      if (error) {
        reject(new Error(`${doctor.command} ${doctor.args.join(" ")}: ${stderr || error.message}`));
        return;
      }
      try {
        resolve(JSON.parse(stdout) as DoctorReport);
      } catch (parseError) {
        reject(parseError instanceof Error ? parseError : new Error(String(parseError)));
      }
    });
  });
}

function show(report: Report): void {
  output[report.level](report.text);
  output.show();
}

/** The statistics command: the server's `diffusion/stats` only. */
async function showStats(): Promise<void> {
  show(await statsReport(running()));
}

/** The doctor command: what `diffusion-lsp doctor` says, from the server or the installation. */
async function showDoctor(): Promise<void> {
  const shown = await doctorReport(running(), runDoctor);
  if (shown.report?.recommendation) {
    item.tooltip = `${item.tooltip ?? ""}\nrecommended here: ${shown.report.recommendation.model}`;
  }
  show(shown);
}

function running(): LanguageClient | undefined {
  return client !== undefined && client.isRunning() ? client : undefined;
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel("diffusion-lsp", { log: true });
  item = vscode.window.createStatusBarItem("diffusionLsp.status", vscode.StatusBarAlignment.Right, 100);
  item.name = "diffusion-lsp";
  item.show();
  previews = new PreviewView();
  const command = (name: string, run: () => unknown) =>
    context.subscriptions.push(vscode.commands.registerCommand(name, run));
  command("diffusionLsp.toggle", () => setEnabled(undefined));
  command("diffusionLsp.enable", () => setEnabled(true));
  command("diffusionLsp.disable", () => setEnabled(false));
  command("diffusionLsp.restart", restart);
  command("diffusionLsp.showOutput", () => output.show());
  command("diffusionLsp.showStats", showStats);
  command("diffusionLsp.doctor", showDoctor);
  command("diffusionLsp.previewsShown", () => previews.shown);
  command("diffusionLsp.preview.dismiss", () => previews.dismiss());
  const nextEdits = new NextEdits(
    () => client,
    () => section().enable !== false && (section().nextEdit as Tree | undefined)?.enable !== false,
  );
  context.subscriptions.push(nextEdits);
  command("diffusionLsp.nextEdit.jumpOrAccept", () => nextEdits.jumpOrAccept());
  command("diffusionLsp.nextEdit.dismiss", () => nextEdits.dismiss());
  context.subscriptions.push(
    output,
    item,
    previews,
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (RESTART_KEYS.some((key) => event.affectsConfiguration(`${SECTION}.${key}`))) {
        await restart();
      }
    }),
  );
  await start();
}

export async function deactivate(): Promise<void> {
  await stop();
}
