"""The page of ``safa serve``: a Gradio app with a Generate tab and an Evaluate tab.

Reads top to bottom as the page does: the inputs (the advanced options folded away with their
defaults shown), Generate / Cancel, the results (player or image, the annotated spectrogram,
the layout line, the timings, the file), the session's earlier results; then ``safa evaluate``.

Every request goes through Gradio's queue, one at a time for the model (the queue and a
request's place in it are shown on the page). A request runs on a worker thread
(:class:`safa.serve.jobs.Job`); its handler is a generator that polls the job a few times a
second, so that Cancel, a closed tab or a client's ``job.cancel()`` close the generator, which
cancels the job: the library call stops at its next step (or decoded piece) and nothing is
written. Bad input is shown next to its field (the validator) and, for API clients, as the
request's error; a request that cannot fit in memory is refused before any work, with the
estimate and what fits instead.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

# Before gradio is imported: no usage statistics leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .jobs import (DECODE_CHOICES, FIELDS, Cancelled, FieldError, Job, Studio, history_row,  # noqa: E402
                   method_defaults, whole_number)

__all__ = ["build_app", "launch", "POLL_SECONDS", "EVALUATE_DEFAULT_METHODS"]

# How often a running request's handler reports progress (and notices a cancel).
POLL_SECONDS = 0.25
# What the Evaluate tab compares unless asked otherwise (the two the demo compares).
EVALUATE_DEFAULT_METHODS = ("safa", "multidiffusion")
HISTORY_HEADERS = ["time", "prompt", "length", "method", "steps", "seed", "file"]
# System fonts: the page needs nothing from outside the machine.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
CSS = "#status {min-height: 2.5em} #eval-table textarea {font-family: ui-monospace, monospace; font-size: 12px}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _follow(job: Job, progress: gr.Progress) -> Iterator[str]:
    """While ``job`` runs: update the progress bar and yield a status line every :data:`POLL_SECONDS`.
    Closed early (Cancel, a closed tab, a client's cancel), it cancels the job."""
    try:
        while not job.wait(POLL_SECONDS):
            p = job.progress
            if p.total:
                progress((p.done, p.total), desc=p.phase, unit=p.unit)
                yield f"{p.phase}: {p.done:g} / {p.total:g} {p.unit}"
            else:
                progress(None, desc=p.phase)
                yield f"{p.phase} ..."
    finally:
        if not job.wait(0):
            job.cancel()


def _raise_job_error(job: Job) -> None:
    """A failed job's error as the message the page (or the client) shows."""
    error = job.error
    if error is None:
        return
    if isinstance(error, Cancelled):
        raise gr.Error(f"Cancelled ({error}); nothing was written.")
    if isinstance(error, MemoryError):  # safa.memory.InsufficientMemoryError: refused before any work
        raise gr.Error(f"Refused, it would not fit in memory: {_one_line(error)}", title="Not enough memory")
    if isinstance(error, ValueError):
        raise gr.Error(_one_line(error))
    raise gr.Error(f"{type(error).__name__}: {_one_line(error)}")


class _Page:
    """The components of the page and their handlers (built by :func:`build_app`)."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.audio = studio.kind == "audio"

    # -- inputs --------------------------------------------------------------------------
    def inputs(self) -> None:
        from ..methods import METHODS
        studio = self.studio
        known = f"the built-in model knows: {', '.join(studio.prompt_names)}" if studio.prompt_names else None
        self.prompt = gr.Textbox(label="Prompt", value=(studio.prompt_names or [""])[0], info=known, elem_id="prompt")
        with gr.Row():
            self.length = gr.Number(label="Length (seconds)" if self.audio else "Width (pixels)",
                                    value=30 if self.audio else 2048, elem_id="length")
            self.loop = gr.Checkbox(label="Seamless loop" if self.audio else "360° panorama", value=False,
                                    elem_id="loop")
        with gr.Row():
            self.method = gr.Dropdown(label="Method", choices=list(METHODS), value="safa", elem_id="method")
            self.method_params = gr.Textbox(label="Method parameters", value=method_defaults("safa"),
                                            info="name=value, separated by ':' (the defaults of the method)",
                                            elem_id="method-params")
        with gr.Row():
            self.steps = gr.Number(label="Steps", value=25, precision=0, elem_id="steps")
            self.seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
        with gr.Accordion("Advanced options", open=False):
            guidance = studio.default("guidance_scale", 1.0)
            self.guidance_scale = gr.Number(label="Guidance scale", value=guidance,
                                            info=f"classifier-free guidance, off at <= 1 (the model's default: "
                                                 f"{guidance:g})", elem_id="guidance-scale")
            self.negative_prompt = gr.Textbox(label="Negative prompt", value="",
                                              info="empty: the pipeline's own", elem_id="negative-prompt")
            self.overlap = gr.Number(label="Overlap rate", value=0.2, info="0.2, the paper's; at most 0.5 for the "
                                     "swap methods, below 1 for the averaging ones", elem_id="overlap")
            self.view_batch_size = gr.Number(label="Windows per model call", value=0, precision=0,
                                             info="0: all of them, at most 16 (bounds the model's memory)",
                                             elem_id="view-batch-size")
            self.decode = gr.Dropdown(label="Decoding", choices=list(DECODE_CHOICES), value="auto",
                                      info="auto: whole up to 4 windows, in tiles beyond", elem_id="decode")
            self.height = gr.Number(label="Height (pixels)", value=0, precision=0, visible=not self.audio,
                                    info="0: the model's native window height", elem_id="height")
        with gr.Row():
            self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")

    def fields(self) -> List[Any]:
        """The input components in the order of :data:`safa.serve.jobs.FIELDS`."""
        return [getattr(self, name) for name in FIELDS]

    # -- results -------------------------------------------------------------------------
    def results(self) -> None:
        self.status = gr.Markdown("Ready.", label="Status", elem_id="status")
        if self.audio:
            self.player = gr.Audio(label="Result", type="filepath", interactive=False, elem_id="result-audio")
        else:
            self.player = gr.Image(label="Result", type="filepath", interactive=False, elem_id="result-image")
        self.spectrogram = gr.Image(label="Spectrogram: the views above it, their overlaps shaded", show_label=False,
                                    type="filepath", interactive=False, visible=self.audio, elem_id="spectrogram")
        self.layout = gr.Textbox(label="Layout", interactive=False, elem_id="layout")
        self.timings = gr.Textbox(label="Timings", interactive=False, elem_id="timings")
        self.download = gr.File(label="Download", interactive=False, elem_id="download")

    def history(self) -> None:
        self.history_state = gr.State([])
        with gr.Accordion("Results of this session", open=True):
            self.history_table = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, label="Results",
                                              elem_id="history")
            self.history_files = gr.File(label="Files", file_count="multiple", interactive=False,
                                         elem_id="history-files")

    def outputs(self) -> List[Any]:
        return [self.status, self.player, self.spectrogram, self.layout, self.timings, self.download,
                self.history_state, self.history_table, self.history_files]

    # -- handlers ------------------------------------------------------------------------
    def validate(self, *values: Any) -> List[Dict[str, Any]]:
        """Before the queue: each field valid, or its message next to it."""
        try:
            self.studio.parse(dict(zip(FIELDS, values)))
        except FieldError as exc:
            return [gr.validate(name != exc.field, str(exc)) for name in FIELDS] + [gr.validate(True, "")]
        return [gr.validate(True, "") for _ in range(len(FIELDS) + 1)]

    def generate(self, *values: Any, progress: gr.Progress = gr.Progress()) -> Iterator[Dict[Any, Any]]:
        """Run one request: progress while it runs, then the results (a generator: see the module docstring)."""
        *values, history = values
        try:
            request = self.studio.parse(dict(zip(FIELDS, values)))
        except FieldError as exc:
            raise gr.Error(str(exc), title=f"Check {exc.field.replace('_', ' ')}")
        layout_line = self.studio.jd.describe_layout(self.studio.layout(request))
        job = Job(lambda job: self.studio.generate(request, job)).start()
        yield {self.layout: layout_line, self.status: "Waiting for the model ..."}
        for line in _follow(job, progress):
            yield {self.status: line}
        _raise_job_error(job)
        result = job.result
        history = list(history) + [dict(row=history_row(result), files=[result.output_path]
                                        + ([result.spectrogram_path] if result.spectrogram_path else []))]
        yield {self.status: f"Done: {os.path.basename(result.output_path)}", self.player: result.output_path,
               self.spectrogram: result.spectrogram_path, self.layout: result.layout, self.timings: result.summary,
               self.download: result.output_path, self.history_state: history,
               self.history_table: [list(h["row"]) for h in history],
               self.history_files: [f for h in history for f in h["files"]]}

    def method_changed(self, name: str) -> str:
        return method_defaults(name) if name else ""


def _evaluate_tab(studio: Studio, concurrency_id: str) -> None:
    """``safa evaluate`` on the page: pick methods, run, see the table and the plot."""
    from ..methods import METHODS
    gr.Markdown("Exact seam statistics on the built-in texture model (its denoiser is exact, so the true "
                "distribution of every window is known), as `safa evaluate` computes them; the columns are "
                "explained under `safa evaluate --help`.")
    with gr.Row():
        methods = gr.CheckboxGroup(label="Methods", choices=list(METHODS), value=list(EVALUATE_DEFAULT_METHODS),
                                   elem_id="eval-methods")
    with gr.Row():
        samples = gr.Number(label="Samples per method", value=2, precision=0, elem_id="eval-samples")
        seconds = gr.Number(label="Seconds per sample", value=24, elem_id="eval-seconds")
        steps = gr.Number(label="Steps", value=10, precision=0, elem_id="eval-steps")
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="eval-seed")
        loop = gr.Checkbox(label="Loop layout", value=False, elem_id="eval-loop")
    with gr.Row():
        run = gr.Button("Run the evaluation", variant="primary", elem_id="eval-button")
        cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
    status = gr.Markdown("", label="Status", elem_id="eval-status")
    table = gr.Textbox(label="Table", lines=14, interactive=False, elem_id="eval-table")
    plot = gr.Plot(label="Overlaps against interiors", elem_id="eval-plot")

    def evaluate(chosen: Sequence[str], n: Any, length: Any, steps_: Any, seed_: Any, loop_: bool,
                 progress: gr.Progress = gr.Progress()) -> Iterator[Dict[Any, Any]]:
        if not chosen:
            raise gr.Error("Pick at least one method.", title="Check methods")
        job = Job(lambda job: _run_evaluation(studio, job, list(chosen), n, length, steps_, seed_, loop_)).start()
        for line in _follow(job, progress):
            yield {status: line}
        _raise_job_error(job)
        text, figure = job.result
        yield {status: "Done.", table: text, plot: figure}

    event = run.click(evaluate, [methods, samples, seconds, steps, seed, loop], [status, table, plot],
                      api_name="evaluate", concurrency_id=concurrency_id, concurrency_limit=1)
    cancel.click(lambda: "Cancelled: the evaluation stops after the method it is running.", None, status,
                 cancels=[event], queue=False, api_name="cancel_evaluate")


def _run_evaluation(studio: Studio, job: Job, methods: List[str], samples: Any, seconds: Any, steps: Any,
                    seed: Any, loop: bool) -> Any:
    """:func:`safa.evaluate.evaluate` on the job's thread, one model request at a time."""
    from ..evaluate import evaluate, evaluation_figure, format_table
    samples, steps = whole_number("samples", samples, 2, 64), whole_number("steps", steps, 1, 1000)
    seed = whole_number("seed", seed, 0, 2 ** 63 - 1)
    total = len(methods) + 1  # the reference rows, then one row per method
    done = [0]

    def log(message: str) -> None:
        done[0] += 1
        job.report(message.split(":")[0], min(done[0], total), total, "rows")

    job.report("waiting for the model")
    with studio.lock:
        job.report("reference rows", 0, total, "rows")
        result = evaluate(methods, samples=samples, seconds=float(seconds), steps=steps, loop=bool(loop),
                          seed=seed, log=log)
    return format_table(result), evaluation_figure(result)


def build_app(studio: Studio) -> gr.Blocks:
    """The page for ``studio``'s model (nothing is started: see :func:`launch`)."""
    page = _Page(studio)
    concurrency_id = "model"  # generate and evaluate share the machine: one request at a time
    with gr.Blocks(title="safa", analytics_enabled=False) as app:
        gr.Markdown(f"## safa: long-form {'audio' if page.audio else 'panoramas'} by joint diffusion\n"
                    f"Model: `{studio.model_name}`. Requests run one at a time; your place in the queue is shown "
                    f"while you wait.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    page.inputs()
                with gr.Column(scale=3):
                    page.results()
            page.history()
        with gr.Tab("Evaluate"):
            _evaluate_tab(studio, concurrency_id)
        page.method.change(page.method_changed, page.method, page.method_params, queue=False, api_name=False)
        event = page.generate_button.click(page.generate, page.fields() + [page.history_state], page.outputs(),
                                           validator=page.validate, api_name="generate",
                                           concurrency_id=concurrency_id, concurrency_limit=1)
        page.cancel_button.click(lambda: "Cancelled: the request stops at its next step; nothing is written.",
                                 None, page.status, cancels=[event], queue=False, api_name="cancel")
    return app


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, max_queue: Optional[int] = 16,
           quiet: bool = False) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    app = build_app(studio)
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, allowed_paths=[os.path.abspath(studio.results_dir)],
               show_error=True, share=False, inbrowser=False, quiet=quiet, theme=THEME, css=CSS,
               footer_links=["api", "settings"], ssr_mode=False, mcp_server=False)
