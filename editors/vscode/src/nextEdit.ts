// Next edit suggestions in VS Code with stable API only: after each change to the active
// document (debounced), ask the server for `textDocument/copilotInlineEdit` and show the first
// edit with decorations: the text it deletes struck through on a red background, the text it
// inserts after it on a green one (an edit of several lines as its lines, one decoration per
// line: src/nextEditLayout.ts), and "Tab" when the edit is away from the cursor's line. A save
// changes no text and keeps the edit shown. Tab is bound (the context key) before the edit is
// drawn, and applies only the edit drawn, on the text it was drawn for. Tab
// jumps to an edit away from the cursor and applies it once the cursor is on its line; Escape
// dismisses it. The server hears of each: didShowInlineEdit when shown, the edit's command
// (workspace/executeCommand) when applied, diffusion/didDismiss when dismissed.

import * as vscode from "vscode";
import type { LanguageClient } from "vscode-languageclient/node";

import { changesText, editLines, HINT } from "./nextEditLayout";
import { decorationText } from "./preview";

const METHOD = "textDocument/copilotInlineEdit";
const SHOWN_CONTEXT = "diffusionLsp.nextEditShown";
const DEBOUNCE_MS = 75;

interface Position {
  line: number;
  character: number;
}
interface Command {
  title: string;
  command: string;
  arguments?: unknown[];
}
export interface InlineEdit {
  range: { start: Position; end: Position };
  text: string;
  textDocument: { uri: string; version: number };
  command?: Command;
}


export class NextEdits implements vscode.Disposable {
  private shown: { edit: InlineEdit; editor: vscode.TextEditor; range: vscode.Range } | undefined;
  private timer: NodeJS.Timeout | undefined;
  private pending: vscode.CancellationTokenSource | undefined;
  private readonly deleted = vscode.window.createTextEditorDecorationType({
    backgroundColor: new vscode.ThemeColor("diffEditor.removedTextBackground"),
    textDecoration: "line-through",
  });
  private readonly inserted = vscode.window.createTextEditorDecorationType({});
  private readonly disposables: vscode.Disposable[];

  constructor(
    private readonly client: () => LanguageClient | undefined,
    private readonly enabled: () => boolean,
  ) {
    this.disposables = [
      this.deleted,
      this.inserted,
      // a save (auto-save included) fires a change with no changes: the edit shown stays
      vscode.workspace.onDidChangeTextDocument((event) => changesText(event) && this.changed(event.document)),
      vscode.window.onDidChangeActiveTextEditor(() => this.dismiss()),
    ];
  }

  /** The edit shown now (tests, the status). */
  current(): InlineEdit | undefined {
    return this.shown?.edit;
  }

  private changed(document: vscode.TextDocument): void {
    const editor = vscode.window.activeTextEditor;
    if (editor === undefined || editor.document !== document) {
      return;
    }
    this.clear(); // the buffer moved on: a shown edit is stale
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
    }
    this.timer = setTimeout(() => void this.request(editor), DEBOUNCE_MS);
  }

  async request(editor: vscode.TextEditor): Promise<void> {
    const client = this.client();
    if (client === undefined || !client.isRunning() || !this.enabled()) {
      return;
    }
    this.pending?.cancel();
    const pending = new vscode.CancellationTokenSource();
    this.pending = pending;
    const document = editor.document;
    const version = document.version;
    let result: { edits?: InlineEdit[] } | null;
    try {
      result = await client.sendRequest(METHOD, {
        textDocument: { uri: document.uri.toString(), version },
        position: client.code2ProtocolConverter.asPosition(editor.selection.active),
      }, pending.token);
    } catch {
      return; // cancelled or refused: nothing to show
    }
    const edit = result?.edits?.[0];
    if (pending.token.isCancellationRequested || edit === undefined || document.version !== version
        || vscode.window.activeTextEditor !== editor) {
      return;
    }
    await this.show(editor, edit, client);
  }

  private async show(editor: vscode.TextEditor, edit: InlineEdit, client: LanguageClient): Promise<void> {
    const range = client.protocol2CodeConverter.asRange(edit.range);
    const away = editor.selection.active.line !== range.start.line;
    // Tab is ours before anything is drawn: a Tab never meets a drawn edit it does not apply
    await vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, true);
    if (editor.document.version !== edit.textDocument.version || vscode.window.activeTextEditor !== editor) {
      return this.clear(true);
    }
    const tabSize = typeof editor.options.tabSize === "number" ? editor.options.tabSize : 4;
    const style = (line: number, text: string, character?: number): vscode.DecorationOptions => {
      const at = new vscode.Position(line, character ?? editor.document.lineAt(line).text.length);
      return {
        range: new vscode.Range(at, at),
        renderOptions: {
          after: {
            contentText: text,
            color: new vscode.ThemeColor("editorGhostText.foreground"),
            backgroundColor: new vscode.ThemeColor("diffEditor.insertedTextBackground"),
          },
        },
      };
    };
    let inserted: vscode.DecorationOptions[];
    if (range.isSingleLine && !edit.text.includes("\n")) {
      // on one line: the new text right after the text it replaces
      inserted = [style(range.end.line, decorationText(edit.text, tabSize) + (away ? `   ${HINT}` : ""),
        range.end.character)];
    } else {
      // several lines: each line as it will read, after the line it replaces
      const document = editor.document;
      const before = document.lineAt(range.start.line).text.slice(0, range.start.character);
      const after = document.lineAt(range.end.line).text.slice(range.end.character);
      inserted = editLines(edit.text, range.start.line, before, after, document.lineCount, away, tabSize)
        .map((line) => style(line.line, line.text));
    }
    editor.setDecorations(this.deleted, range.isEmpty ? [] : [range]);
    editor.setDecorations(this.inserted, inserted);
    this.shown = { edit, editor, range };
    void client.sendNotification("textDocument/didShowInlineEdit", { item: { command: edit.command } });
  }

  private clear(force = false): void {
    if (this.shown !== undefined || force) {
      this.shown?.editor.setDecorations(this.deleted, []);
      this.shown?.editor.setDecorations(this.inserted, []);
      this.shown = undefined;
      void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, false);
    }
  }

  /** Tab: jump to the edit when it is away from the cursor's line, else apply it. */
  async jumpOrAccept(): Promise<void> {
    const shown = this.shown;
    if (shown === undefined) {
      await vscode.commands.executeCommand("tab");
      return;
    }
    const { editor, range } = shown;
    if (editor.selection.active.line !== range.start.line) {
      editor.selection = new vscode.Selection(range.start, range.start);
      editor.revealRange(range, vscode.TextEditorRevealType.InCenterIfOutsideViewport);
      return; // the next Tab applies it
    }
    await this.accept();
  }

  private async accept(): Promise<void> {
    const shown = this.shown;
    const client = this.client();
    if (shown === undefined || client === undefined) {
      return;
    }
    if (shown.editor.document.version !== shown.edit.textDocument.version) {
      this.clear(); // the text moved on since it was drawn: apply nothing rather than a stale edit
      return;
    }
    this.shown = undefined;
    shown.editor.setDecorations(this.deleted, []);
    shown.editor.setDecorations(this.inserted, []);
    void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, false);
    const applied = await shown.editor.edit((builder) => builder.replace(shown.range, shown.edit.text));
    const command = shown.edit.command;
    if (applied && command !== undefined) {
      await client.sendRequest("workspace/executeCommand", {
        command: command.command, arguments: command.arguments ?? [],
      }).catch(() => undefined);
    }
  }

  /** Escape: drop the shown edit (the server counts it as rejected). */
  dismiss(): void {
    const shown = this.shown;
    this.pending?.cancel();
    this.clear();
    if (shown !== undefined) {
      void this.client()?.sendNotification("diffusion/didDismiss", { item: { command: shown.edit.command } });
    }
  }

  dispose(): void {
    this.clear();
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
    }
    this.pending?.cancel();
    for (const disposable of this.disposables) {
      disposable.dispose();
    }
  }
}
