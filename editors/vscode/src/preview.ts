// Live denoising in VS Code: the server's `diffusion/preview` notifications drawn at the cursor
// while a hole denoises. Committed text is drawn as ghost text, every still-masked token (one
// U+2591 LIGHT SHADE in the preview's text) dim; the last preview (`done: true`) clears the
// drawing and the completion's own ghost text takes its place. Decorations cannot hold line
// breaks: lines after the first are drawn after a `⏎`.

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

/** The preview's text as runs of committed text and runs of masked places, lines joined. */
export function previewChunks(text: string): Chunk[] {
  const chunks: Chunk[] = [];
  const flat = text.split("\n").join(LINE_BREAK);
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
