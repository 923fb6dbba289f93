// Live denoising in VS Code: the server's `diffusion/preview` notifications drawn at the cursor
// while a hole denoises. Committed text is drawn as ghost text, every still-masked token (one
// U+2591 LIGHT SHADE in the preview's text) dim; the last preview (`done: true`) clears the
// drawing and the completion's own ghost text takes its place. Decorations cannot hold line
// breaks: lines after the first are drawn after a `⏎`. A preview is drawn only while its
// request runs (PreviewGate): one that ended any other way (cancelled by Escape or a cursor
// move, answered from the server's cache) takes its drawing with it. Spaces are kept
// (no-break spaces: CSS collapses runs of them). (The drawing itself is src/previewView.ts, one
// decoration per character; this file is plain logic, unit-tested.)

export const PREVIEW = "diffusion/preview";
export const PLACEHOLDER = "\u2591";
export const LINE_BREAK = " \u23ce ";

export interface Preview {
  textDocument: { uri: string; version: number | null };
  position: { line: number; character: number };
  step: number;
  steps: number;
  text: string;
  done: boolean;
}

export interface Chunk {
  text: string;
  masked: boolean;
}

/** `text` as an `after` decoration must hold it to show it as typed: CSS collapses runs of
 * spaces, so spaces become no-break spaces, and a tab `tabSize` of them. */
export function decorationText(text: string, tabSize = 4): string {
  return text.replace(/\t/g, " ".repeat(tabSize)).replace(/ /g, "\u00a0");
}

/** The preview's text as runs of committed text and runs of masked places, lines joined,
 * spaces kept (decorationText). */
export function previewChunks(text: string, tabSize = 4): Chunk[] {
  const chunks: Chunk[] = [];
  const flat = decorationText(text.split("\n").join(LINE_BREAK), tabSize);
  for (const char of flat) {
    const masked = char === PLACEHOLDER;
    const last = chunks[chunks.length - 1];
    if (last !== undefined && last.masked === masked) {
      last.text += char;
    } else {
      chunks.push({ text: char, masked });
    }
  }
  return chunks;
}

/** Whether `value` looks like a preview notification's params. */
export function isPreview(value: unknown): value is Preview {
  const p = value as Preview;
  return (
    typeof p === "object" && p !== null && typeof p.textDocument?.uri === "string" &&
    typeof p.position?.line === "number" && typeof p.position?.character === "number" &&
    typeof p.text === "string" && typeof p.done === "boolean"
  );
}

/** Which completion request's previews may be drawn: the one running now, at its position.
 * `begin` when a request starts (a newer one supersedes it), `end` when it is answered,
 * cancelled or fails; true from `end` means its drawing must go. */
export class PreviewGate {
  private running: { id: number; uri: string; line: number; character: number } | undefined;
  private ids = 0;

  begin(uri: string, line: number, character: number): number {
    this.ids += 1;
    this.running = { id: this.ids, uri, line, character };
    return this.ids;
  }

  end(id: number): boolean {
    if (this.running?.id !== id) {
      return false;
    }
    this.running = undefined;
    return true;
  }

  /** Whether `preview` belongs to the running request (and is not its last, `done`). */
  admits(preview: Preview): boolean {
    const running = this.running;
    return running !== undefined && !preview.done && running.uri === preview.textDocument.uri &&
      running.line === preview.position.line && running.character === preview.position.character;
  }
}
