// What the statistics and doctor commands show: each asks the server one thing. No `vscode`
// import.

export const STATS = "diffusion/stats";
export const DOCTOR = "diffusion/doctor";

/** What the commands need of the language client: one request, no params. */
export interface Requester {
  sendRequest<T>(method: string): Promise<T>;
}

/** `diffusion-lsp doctor --json`'s report, or the server's `diffusion/doctor` answer. */
export interface DoctorReport {
  text?: string;
  recommendation?: { model: string; expect: string };
}

/** A line (or a block) for the output channel, at its level. */
export interface Report {
  level: "info" | "warn" | "error";
  text: string;
}

function reason(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** The statistics command: the running server's `diffusion/stats` (latency percentiles, cache
 * hits, cancellations), and nothing else; the doctor is its own command. */
export async function statsReport(running: Requester | undefined): Promise<Report> {
  if (!running) {
    return { level: "warn", text: "the server is not running: no statistics" };
  }
  try {
    const stats = await running.sendRequest<unknown>(STATS);
    return { level: "info", text: `stats: ${JSON.stringify(stats, null, 2)}` };
  } catch (error) {
    return { level: "error", text: `stats: ${reason(error)}` };
  }
}

/** The doctor command: what `diffusion-lsp doctor` says (machine, models, remote, PATH, the
 * recommendation): from the running server, else from `runDoctor` (the same installation's
 * `doctor --json`, run directly). The report too, for the status bar's tooltip. */
export async function doctorReport(
  running: Requester | undefined,
  runDoctor: () => Promise<DoctorReport>,
): Promise<Report & { report?: DoctorReport }> {
  try {
    const report = running ? await running.sendRequest<DoctorReport>(DOCTOR) : await runDoctor();
    return { level: "info", text: `doctor:\n${report.text ?? JSON.stringify(report, null, 2)}`, report };
  } catch (error) {
    return { level: "error", text: `doctor: ${reason(error)}` };
  }
}
