// How a next edit is laid out on screen, as plain logic (unit-tested; src/nextEdit.ts draws it).
// Decorations cannot break lines, so an edit of several lines is drawn as the lines will read,
// one decoration after each line it rewrites (the extra ones after the lines below it), never
// as one long line running past the editor's edge; the Tab hint leads its first line.

import { decorationText } from "./preview";

export const HINT = "\u21e5 Tab  ";

/** One decoration of a next edit: `text` drawn after the end of document line `line`. */
export interface EditLine {
  line: number;
  text: string;
}

/** The lines an edit of `start`..`end` (0-based lines) to `text` leaves, each to be drawn after
 * a document line: `before` is the start line's text before the edit, `after` the end line's
 * text after it; `lineCount` the document's lines. `away`: the hint leads the first line. */
export function editLines(text: string, start: number, before: string, after: string,
                          lineCount: number, away: boolean, tabSize = 4): EditLine[] {
  const lines = text.split(/\r?\n/);
  lines[0] = before + lines[0];
  lines[lines.length - 1] += after;
  return lines.map((line, i) => ({
    line: Math.min(start + i, Math.max(lineCount - 1, 0)),
    text: (i === 0 && away ? HINT : "   ") + decorationText(line, tabSize),
  }));
}

/** Whether a document change event changed its text (a save fires one with no changes). */
export function changesText(event: { contentChanges: readonly unknown[] }): boolean {
  return event.contentChanges.length > 0;
}
