// The live preview on screen (src/preview.ts says what it is): the chunks of the hole as one
// decoration type, set in one call per step, so a step replaces the one before in place (no
// blank frame between them). The completion request that a preview belongs to is watched
// through the language client's middleware: when it ends in any way the drawing goes, and
// Escape while the hole denoises cancels the request and takes the drawing at once.

import * as vscode from "vscode";
import type { Middleware } from "vscode-languageclient/node";

import { type Preview, PreviewGate, previewChunks } from "./preview";

const SHOWN_CONTEXT = "diffusionLsp.previewShown";

export class PreviewView implements vscode.Disposable {
  private readonly gate = new PreviewGate();
  private readonly style = vscode.window.createTextEditorDecorationType({});
  private drawn: { editor: vscode.TextEditor; at: vscode.Position } | undefined;
  private request: vscode.CancellationTokenSource | undefined;
  private readonly disposables: vscode.Disposable[];
  /** Previews drawn so far (tests read it through the `diffusionLsp.previewsShown` command). */
  shown = 0;

  constructor() {
    this.disposables = [
      this.style,
      vscode.window.onDidChangeTextEditorSelection((event) => {
        if (this.drawn?.editor === event.textEditor && !event.selections[0]?.active.isEqual(this.drawn.at)) {
          this.clear(); // the cursor left the hole: its preview is stale
        }
      }),
    ];
  }

  /** Middleware for `textDocument/inlineCompletion`: the request runs under a token that
   * Escape can cancel, and its end clears its preview. */
  readonly middleware: Pick<Middleware, "provideInlineCompletionItems"> = {
    provideInlineCompletionItems: async (document, position, context, token, next) => {
      this.request?.cancel();
      this.clear();
      const source = new vscode.CancellationTokenSource();
      this.request = source;
      const cancelled = token.onCancellationRequested(() => source.cancel());
      const id = this.gate.begin(document.uri.toString(), position.line, position.character);
      try {
        return await next(document, position, context, source.token);
      } finally {
        cancelled.dispose();
        if (this.gate.end(id)) {
          this.clear();
        }
        if (this.request === source) {
          this.request = undefined;
        }
        source.dispose();
      }
    },
  };

  /** Draw a `diffusion/preview` in the editor showing its document, if its request runs. */
  show(preview: Preview): void {
    if (!this.gate.admits(preview)) {
      if (preview.done) {
        this.clear();
      }
      return;
    }
    const editor = vscode.window.activeTextEditor;
    const at = new vscode.Position(preview.position.line, preview.position.character);
    if (editor === undefined || editor.document.uri.toString() !== preview.textDocument.uri
        || (preview.textDocument.version !== null && editor.document.version !== preview.textDocument.version)
        || !editor.selection.active.isEqual(at)) {
      this.clear();
      return;
    }
    const tabSize = typeof editor.options.tabSize === "number" ? editor.options.tabSize : 4;
    const range = new vscode.Range(at, at);
    // One zero-width decoration per character, all at the cursor, drawn in order after it.
    // VS Code makes a CSS rule of each distinct decoration: per character, a step reuses
    // nearly all of the rules of the step before, and the screen never shows a step half-drawn.
    const options = previewChunks(preview.text, tabSize).flatMap((chunk) => Array.from(chunk.text, (char) => ({
      range,
      renderOptions: {
        after: chunk.masked
          ? { contentText: char, color: new vscode.ThemeColor("editorGhostText.foreground"),
              textDecoration: "none; opacity: 0.35" }
          : { contentText: char, color: new vscode.ThemeColor("editorGhostText.foreground"),
              fontStyle: "italic" },
      },
    })));
    if (this.drawn === undefined) {
      void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, true);
    }
    editor.setDecorations(this.style, options);
    this.drawn = { editor, at };
    this.shown += 1;
  }

  /** Escape while the hole denoises: cancel its request and take its drawing. */
  dismiss(): void {
    this.request?.cancel();
    this.clear();
  }

  clear(): void {
    if (this.drawn !== undefined) {
      this.drawn.editor.setDecorations(this.style, []);
      this.drawn = undefined;
      void vscode.commands.executeCommand("setContext", SHOWN_CONTEXT, false);
    }
  }

  dispose(): void {
    this.request?.cancel();
    this.clear();
    for (const disposable of this.disposables) {
      disposable.dispose();
    }
  }
}
