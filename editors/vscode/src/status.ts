// What the status bar item says for a `diffusion/status` notification. No `vscode` import.

/** The server's `diffusion/status` notification. */
export interface Status {
  state: "starting" | "loading" | "ready" | "error" | "disabled" | "stopped";
  message?: string;
  model?: string | null;
  device?: string | null;
  lastLatencyMs?: number | null;
}

export interface StatusView {
  text: string;
  tooltip: string;
  /** "error" or "warning" colours the item; undefined leaves it plain. */
  severity?: "error" | "warning";
}

const LABEL = "Diffusion";

export function statusView(status: Status): StatusView {
  const where = [status.model, status.device].filter(Boolean).join(" on ");
  const detail = [status.message, where].filter(Boolean).join("\n");
  const click = "\n\nClick to toggle completions.";
  switch (status.state) {
    case "ready": {
      const latency =
        typeof status.lastLatencyMs === "number" ? ` ${Math.round(status.lastLatencyMs)} ms` : "";
      return { text: `$(sparkle) ${LABEL}${latency}`, tooltip: `diffusion-lsp: ready\n${detail}${click}` };
    }
    case "loading":
    case "starting":
      return {
        text: `$(sync~spin) ${LABEL}`,
        tooltip: `diffusion-lsp: ${status.state === "loading" ? "loading the model" : "starting"}\n${detail}`,
      };
    case "disabled":
      return { text: `$(circle-slash) ${LABEL}`, tooltip: `diffusion-lsp: completions disabled${click}` };
    case "stopped":
      return {
        text: `$(debug-stop) ${LABEL}`,
        tooltip: `diffusion-lsp: the server is not running\n${detail}\n\nClick to show its output.`,
        severity: "warning",
      };
    default:
      return {
        text: `$(error) ${LABEL}`,
        tooltip: `diffusion-lsp: ${status.state}\n${detail}\n\nClick to show its output.`,
        severity: "error",
      };
  }
}

/** The command a click runs: toggle when the server works, otherwise show what went wrong. */
export function clickCommand(status: Status): string {
  return status.state === "error" || status.state === "stopped"
    ? "diffusionLsp.showOutput"
    : "diffusionLsp.toggle";
}
