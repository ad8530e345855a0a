"""The ``pfedlora`` command line: ``run`` (and ``run --resume``) an experiment, ``report`` on runs,
``compare`` several methods, ``tune`` hyperparameters on a validation split, ``export`` a client's model,
``list`` what is available.

Library errors (:class:`~pfedlora.errors.PfedloraError`) become one line on stderr and exit status 2;
``-v`` logs at INFO level.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pfedlora.errors import ConfigError, DiskWriteError, PfedloraError
from pfedlora.stopping import RunStopped, Stopped, stop_on_signals

if TYPE_CHECKING:
    from pfedlora.compare import Variant
    from pfedlora.simulation import RoundRecord, Summary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Model-heterogeneous personalized federated learning with low-rank adapters (pFedLoRA).",
)
console = Console()
T = TypeVar("T")
err_console = Console(stderr=True)


def _fail(error: Exception, how_to_continue: str = "") -> typer.Exit:
    """Print ``error`` (and, for a run it stopped, ``how_to_continue``) as one line; exit status 2."""
    if isinstance(error, DiskWriteError) and error.stopped and how_to_continue:
        error = DiskWriteError(
            error.path, error.reason, f"{error.stopped}; once there is space, {how_to_continue}"
        )
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


Command = TypeVar("Command", bound=Callable[..., Any])


def _stoppable(how_to_continue: Callable[[Stopped], str]) -> Callable[[Command], Command]:
    """SIGINT (Ctrl-C) and SIGTERM stop the command with one line, where it stood and
    ``how_to_continue(stop)``, no traceback, and exit status 128 + the signal (130, 143)."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def stoppable(*args: Any, **kwargs: Any) -> Any:
            with stop_on_signals():
                try:
                    return command(*args, **kwargs)
                except Stopped as stop:
                    line = f"{stop.message}{how_to_continue(stop)}"
                    err_console.print(escape(line), style="bold yellow", highlight=False, soft_wrap=True)
                    raise typer.Exit(code=stop.exit_code) from None

        return stoppable  # type: ignore[return-value]

    return decorate


def _resume_command(stop: Stopped) -> str:
    if isinstance(stop, RunStopped) and stop.resumable:
        return f"; continue with `pfedlora run --resume {shlex.quote(stop.run_dir)}`"
    return ""


def _same_command(stop: Stopped) -> str:
    return f"; continue with the same command: `{shlex.join(['pfedlora', *sys.argv[1:]])}`"


def _round_progress(quiet: bool) -> Progress:
    """A progress bar over rounds showing the latest mean accuracy (or perplexity) and the ETA."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[figure]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


def _summary_cells(s: Summary) -> dict[str, str]:
    """The headline figures of one run summary, formatted for people."""
    target = s.get("target_round")
    reach = f"round {target}" if target else "not reached"
    by_arch = s.get("mean_accuracy_last_by_architecture") or {}
    per_arch = (
        {
            f"last mean acc, {arch}": "–" if acc is None else f"{100 * acc:.2f}%"
            for arch, acc in by_arch.items()
        }
        if len(by_arch) > 1
        else {}
    )
    perplexity = {}
    if "mean_perplexity_last" in s:  # language modeling: the accuracies are next-token top-1
        by_arch_ppl = s.get("mean_perplexity_last_by_architecture") or {}
        perplexity = {
            "best mean perplexity (round)": f"{s['mean_perplexity_best']:.3f} ({s['best_perplexity_round']})",
            "last mean perplexity": f"{s['mean_perplexity_last']:.3f}",
            "last median perplexity": f"{s['median_perplexity_last']:.3f}",
            **{
                f"last mean perplexity, {arch}": "–" if value is None else f"{value:.3f}"
                for arch, value in (by_arch_ppl.items() if len(by_arch_ppl) > 1 else ())
            },
        }
    return {
        "algorithm": s["algorithm"],
        "clients × fraction, rounds": f"{s['num_clients']} × {s['sample_fraction']:g}, {s['rounds']}",
        "clients scored": s.get("evaluation", "after-training"),
        **perplexity,
        "best mean acc (round)": f"{100 * s['mean_accuracy_best']:.2f}% ({s['best_round']})",
        "last mean acc": f"{100 * s['mean_accuracy_last']:.2f}%",
        **(per_arch if len(per_arch) > 1 else {}),
        "last-10% mean acc": f"{100 * s['mean_accuracy_last10pct']:.2f}%",
        "std over clients": f"{100 * s['std_accuracy_last']:.2f} pp",
        **(
            {f"target ppl {s['target_perplexity']:g}": reach}
            if "target_perplexity" in s
            else {f"target {100 * s['target_accuracy']:.0f}%": reach}
        ),
        "MB sent": f"{s['bytes_total'] / 1e6:.2f}",
        "train TFLOPs": f"{s['train_flops_total'] / 1e12:.2f}",
        **(
            {"server TFLOPs": f"{s['server_flops_total'] / 1e12:.4f}"}
            if s.get("server_flops_total", 0.0) > 0
            else {}
        ),
        "wall s": f"{s['wall_seconds']:.1f}",
        "samples/s": f"{s['train_samples_per_second']:.0f}",
    }


def _summary_table(rows: list[tuple[str, Summary]], title: str) -> Table:
    """One column per run when several are compared; one run reads best as a list of figures."""
    cells = [(label, _summary_cells(summary)) for label, summary in rows]
    table = Table(title=title)
    table.add_column("")
    for label, _ in cells:
        table.add_column(escape(label), justify="right", overflow="fold")
    for key in cells[0][1]:
        table.add_row(key, *(values.get(key, "") for _, values in cells))
    return table


WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-w",
        min=0,
        help="Worker processes training clients in parallel, one intra-op thread each (default: the usable "
        "cores on CPU, $PFEDLORA_WORKERS if set; 0: every client in this process, all threads). Results are "
        "the same for any number of workers from 1 up.",
        show_default=False,
    ),
]
LogOption = Annotated[
    list[str] | None,
    typer.Option(
        "--log",
        help="Also stream every round to this tracker (repeatable): tensorboard, into RUN_DIR/tensorboard "
        "(pip install 'pfedlora[tensorboard]'; then tensorboard --logdir runs/), or mlflow, to the tracking "
        "server MLFLOW_TRACKING_URI names (pip install 'pfedlora[mlflow]').",
    ),
]


@app.command()
@_stoppable(_resume_command)
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file; unset keys keep their defaults.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one key, e.g. --set train.lr=0.05 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results directory (default runs/<time>-<algo>-<data>)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Directory searched first for datasets (data.data_dir).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue this unfinished run directory from its last checkpoint (its own config).",
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds",
            min=1,
            help="With --resume: run to this many rounds instead (also extends a finished run); the metrics "
            "are those of a run this long from the start.",
            show_default=False,
        ),
    ] = None,
    previous_checkpoint: Annotated[
        bool,
        typer.Option(
            "--previous-checkpoint",
            help="With --resume: continue from the checkpoint before the last (when the last is damaged).",
        ),
    ] = False,
    workers: WorkersOption = None,
    log: LogOption = None,
) -> None:
    """Run one experiment (by default pFedLoRA on Fashion-MNIST) and write its results directory.

    The run is checkpointed every federation.checkpoint_every rounds; after a crash, --resume RUN_DIR
    continues it and ends with the same metrics as an uninterrupted run (--rounds N: as a run of N rounds).
    """
    from pfedlora.config import load_config, load_run_config
    from pfedlora.simulation import resume_run, run_experiment
    from pfedlora.simulation.results import CONFIG_FILE, default_run_dir
    from pfedlora.tracking import check_trackers, tracking

    try:
        check_trackers(log or [])
        if resume is not None:
            if config is not None or overrides or out is not None or data_dir is not None:
                raise ConfigError("--resume takes the run's own configuration: give no --config/--set/--out")
            cfg = load_run_config(resume / CONFIG_FILE) if (resume / CONFIG_FILE).is_file() else None
            if cfg is None:
                raise ConfigError(f"{str(resume)!r} is not a run directory (no {CONFIG_FILE})")
        else:
            if rounds is not None or previous_checkpoint:
                raise ConfigError("--rounds and --previous-checkpoint go with --resume RUN_DIR")
            extra = [f"data.data_dir={str(data_dir)!r}"] if data_dir is not None else []
            cfg = load_config(config, [*(overrides or ()), *extra])
    except PfedloraError as error:
        raise _fail(error) from None
    out_dir = resume if resume is not None else out if out is not None else default_run_dir(cfg)
    progress = _round_progress(quiet)
    with progress, contextlib.ExitStack() as stack:
        total = rounds if rounds is not None else cfg.federation.rounds
        task = progress.add_task(
            f"{cfg.algorithm} on {cfg.data.dataset}: setting up", total=total, figure="mean acc –"
        )

        def on_round(record: RoundRecord) -> None:
            trackers.log_round(record)
            _show_accuracy(progress, task, record)
            progress.update(task, advance=1, description=f"{cfg.algorithm} on {cfg.data.dataset}: round")

        try:
            trackers = stack.enter_context(tracking(log or [], Path(out_dir), cfg))
            if resume is not None:
                summary = resume_run(
                    resume,
                    on_round=on_round,
                    workers=workers,
                    rounds=rounds,
                    previous_checkpoint=previous_checkpoint,
                )
            else:
                summary = run_experiment(cfg, out_dir, on_round=on_round, workers=workers)
        except PfedloraError as error:
            progress.stop()
            raise _fail(error, f"continue with `pfedlora run --resume {shlex.quote(str(out_dir))}`") from None
    console.print(_summary_table([(str(out_dir), summary)], title=f"{cfg.algorithm} on {cfg.data.dataset}"))
    from pfedlora.plots import evaluation_note, plot_runs
    from pfedlora.simulation import read_run

    records, _ = read_run(out_dir)
    plots = plot_runs([(cfg.algorithm, records)], out_dir, evaluation_note([summary]))
    console.print(
        f"results written to [bold]{escape(str(out_dir))}[/] (plots: {', '.join(p.name for p in plots)})"
    )


def _show_accuracy(progress: Progress, task: TaskID, record: RoundRecord) -> None:
    """Put an evaluated round's mean perplexity (language modeling) or accuracy in the progress bar (other
    rounds keep the last one)."""
    if "mean_perplexity" in record:
        progress.update(task, figure=f"mean ppl {record['mean_perplexity']:.2f}")
    elif "mean_accuracy" in record:
        progress.update(task, figure=f"mean acc {100 * record['mean_accuracy']:.2f}%")


def _run_label(path: Path, all_paths: list[Path]) -> str:
    """The directory name, or the whole path where two runs share a name."""
    return path.name if sum(p.name == path.name for p in all_paths) == 1 else str(path)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="One or more run directories (finished, or still going).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write the plots (default: the run directory, or ./report)."
        ),
    ] = None,
) -> None:
    """Print the summary table of runs and write accuracy plots (PNG).

    A run still going (or stopped) is reported on the rounds it has logged, without getting in its way.
    Damaged metrics lines are skipped with a warning naming them; a run that cannot be read at all is
    left out with one line saying why (exit status 2 when no run can be read).
    """
    from pfedlora.plots import evaluation_note, plot_runs
    from pfedlora.simulation import read_run, read_unfinished_run
    from pfedlora.simulation.lock import live_writer
    from pfedlora.simulation.results import CONFIG_FILE, SUMMARY_FILE

    loaded = []
    for path in run_dirs:
        label = _run_label(path, run_dirs)
        try:
            if (path / CONFIG_FILE).is_file() and not (path / SUMMARY_FILE).is_file():
                records, summary = read_unfinished_run(path)
                writer = live_writer(path)
                state = f"in progress, written by {writer}" if writer else "unfinished: no process writes it"
                err_console.print(
                    escape(f"{label}: {state}; round {records[-1]['round']} of {summary['rounds']} so far"),
                    highlight=False,
                    soft_wrap=True,
                )
                loaded.append(
                    (f"{label} (round {records[-1]['round']} of {summary['rounds']})", records, summary)
                )
            else:
                loaded.append((label, *read_run(path)))
        except PfedloraError as error:
            if len(run_dirs) == 1:
                raise _fail(error) from None
            err_console.print(
                f"[bold yellow]skipped:[/] {escape(str(error))}", highlight=False, soft_wrap=True
            )
    if not loaded:
        raise _fail(ConfigError("none of the run directories can be read"))
    console.print(_summary_table([(label, summary) for label, _, summary in loaded], title="runs"))
    plot_dir = out if out is not None else (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    note = evaluation_note([summary for _, _, summary in loaded])
    for path in plot_runs([(label, records) for label, records, _ in loaded], plot_dir, note):
        console.print(f"plot written to [bold]{escape(str(path))}[/]")


AlgorithmsOption = Annotated[
    str, typer.Option("--algorithms", "-a", help="Comma-separated algorithm names (see `pfedlora list`).")
]
PlacementsOption = Annotated[
    str, typer.Option("--placements", "-p", help="Adapter placements to run pFedLoRA with (comma-separated).")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Shared TOML file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override, e.g. --set federation.rounds=20; --set standalone:train.local_epochs=2 scopes it "
        "to one variant (or algorithm).",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
JobsOption = Annotated[
    int,
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        help="Runs side by side, each in its own process; the usable cores are divided among them (each "
        "gets cores/jobs workers unless --workers says otherwise). Results are the same as one by one.",
    ),
]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _split(text)]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected whole numbers separated by commas, e.g. 0,1,2"
        ) from None


def _run_variants(
    quiet: bool,
    work: Callable[[Callable[[Variant, bool], None], Callable[[str, RoundRecord], None]], T],
) -> T:
    """Run ``work(on_start, on_round)`` with a progress bar for every variant it starts (several at once
    with --jobs)."""
    progress = _round_progress(quiet)
    with progress:
        tasks: dict[str, TaskID] = {}

        def on_start(variant: Variant, reused: bool) -> None:
            state = "finished earlier, reused" if reused else "running"
            rounds = variant.config.federation.rounds
            tasks[variant.label] = progress.add_task(
                f"{variant.label} ({state})",
                total=rounds,
                completed=rounds if reused else 0,
                figure="mean acc –",
            )

        def on_round(label: str, record: RoundRecord) -> None:
            _show_accuracy(progress, tasks[label], record)
            progress.update(tasks[label], advance=1)

        try:
            return work(on_start, on_round)
        except PfedloraError as error:
            progress.stop()
            raise _fail(error, "run the same command again: it continues where it stopped") from None


@app.command()
@_stoppable(_same_command)
def compare(
    algorithms: AlgorithmsOption = "pfedlora,standalone,lg-fedavg,fml,fedkd,fedgh,fedapen,fedproto",
    placements: PlacementsOption = "branch,layers",
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Comparison directory (reused to resume).")] = Path(
        "runs/compare"
    ),
    target: Annotated[
        float | None,
        typer.Option(
            help="Mean accuracy (a fraction), or for language modeling mean perplexity, to read rounds, MB "
            "and FLOPs to; default: each run's federation.target_accuracy (target_perplexity). Changing it "
            "reruns nothing."
        ),
    ] = None,
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds",
            help="Run every method with each of these seeds (e.g. 0,1,2) into DIR/<method>/seed-<s>; the "
            "table gives mean ± std across seeds and the plots bands. Default: the config's seed once.",
        ),
    ] = "",
    quiet: QuietOption = False,
    jobs: JobsOption = 1,
    workers: WorkersOption = None,
    log: LogOption = None,
) -> None:
    """Run several algorithms on the same data, partition and seed; write a table (Markdown, CSV) and plots.

    Variants whose run already finished in the comparison directory are reused, so rerunning resumes.
    """
    from pfedlora.compare import (
        check_target,
        per_client_rows,
        plan_variants,
        retarget,
        run_comparison,
        with_seeds,
        write_comparison,
    )
    from pfedlora.tracking import check_trackers

    try:
        check_trackers(log or [])
        variants = plan_variants(_split(algorithms), _split(placements), config, overrides or ())
        if seeds:
            variants = with_seeds(variants, _seeds(seeds))
        if target is not None:
            check_target(target, variants[0].config.data.task == "language-modeling")
    except PfedloraError as error:
        raise _fail(error) from None
    results = _run_variants(
        quiet,
        lambda on_start, on_round: run_comparison(
            variants, out, on_start, on_round, jobs, workers, log=log or ()
        ),
    )
    if target is not None:
        results = retarget(results, target)
    console.print(_summary_table([(label, summary) for label, _, summary in results], title="comparison"))
    methods, client_rows = per_client_rows(results)
    if client_rows:  # language models: each client's perplexity on its own text, method by method
        table = Table(title="last perplexity of each client on its own test text (lower is better)")
        for column in ("client", *methods):
            table.add_column(escape(column), justify="right")
        for row in client_rows:
            table.add_row(*row)
        console.print(table)
    for path in write_comparison(results, out):
        console.print(f"written: [bold]{escape(str(path))}[/]")


@app.command()
@_stoppable(_same_command)
def tune(
    axes: Annotated[
        list[str],
        typer.Option(
            "--axis",
            "-x",
            help="[label:]key=v1,v2,... searched in the order given, e.g. -x train.local_epochs=1,2,3.",
        ),
    ],
    algorithms: AlgorithmsOption = "pfedlora",
    placements: PlacementsOption = "branch",
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Search directory (reused to resume).")] = Path(
        "runs/tune"
    ),
    quiet: QuietOption = False,
    jobs: JobsOption = 1,
    workers: WorkersOption = None,
) -> None:
    """Coordinate search of hyperparameters on a validation split (never the test split), per variant.

    Writes trials.csv and best.toml, and prints the --set options that give `compare` the chosen values.
    """
    from pfedlora.tuning import Axis, best_overrides, coordinate_search, write_search

    try:
        parsed = [Axis.parse(text) for text in axes]
    except PfedloraError as error:
        raise _fail(error) from None
    trials, best = _run_variants(
        quiet,
        lambda on_start, on_round: coordinate_search(
            _split(algorithms),
            _split(placements),
            parsed,
            out,
            config,
            overrides or (),
            on_start,
            on_round,
            jobs,
            workers,
        ),
    )
    perplexities = any(trial.perplexity is not None for trial in trials)
    figure = "perplexity" if perplexities else "accuracy"
    table = Table(title=f"search (validation {figure} at the last round)")
    for column in ("variant", "settings", "validation ppl" if perplexities else "validation acc %"):
        table.add_column(column)
    for trial in trials:
        chosen = dict(trial.settings) == best[trial.label]
        settings = " ".join(f"{key}={value}" for key, value in trial.settings)
        value = f"{trial.perplexity:.3f}" if trial.perplexity is not None else f"{100 * trial.accuracy:.2f}"
        table.add_row(escape(trial.label), escape(settings), value + (" ← chosen" if chosen else ""))
    console.print(table)
    for path in write_search(trials, best, out):
        console.print(f"written: [bold]{escape(str(path))}[/]")
    for_compare = " ".join(f"--set {o}" for o in best_overrides(best))
    console.print(f"for compare: {escape(for_compare)}", soft_wrap=True)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    client: Annotated[int, typer.Option("--client", "-k", help="The client id to export.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Export folder (default RUN_DIR/export/client-K)."),
    ] = None,
) -> None:
    """Write one client's personalized model (its private state and the adapter) into a folder.

    ``pfedlora.export.load_client(FOLDER)`` rebuilds it for prediction; a transformer client's encoder is
    also a Hugging Face folder (``encoder/``), with the shared LoRA in PEFT's format (``encoder-adapter/``)
    where it sits in the encoder. The client's state after the last round is rebuilt first: the rounds
    after the run's last checkpoint run again here (one thread).
    """
    from pfedlora.export import export_client

    target = out if out is not None else run_dir / "export" / f"client-{client}"
    try:
        with console.status(f"rebuilding client {client} of {run_dir} after its last round"):
            written = export_client(run_dir, client, target)
    except PfedloraError as error:
        raise _fail(error) from None
    console.print(f"client {client} written to [bold]{escape(str(written))}[/]")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A finished language-modeling run directory.")],
    client: Annotated[int, typer.Option("--client", "-k", help="The client whose model writes.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to add.")] = 40,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0: greedy; above 0: sampling at this temperature.")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="The seed of the sampling.")] = 0,
) -> None:
    """Print how client K's personalized language model continues a prompt, and how the frozen base does.

    The client's state after the last round is rebuilt first: the rounds after the run's last checkpoint
    run again here (one thread).
    """
    from pfedlora.generation import Decoding
    from pfedlora.generation import generate as continue_with

    try:
        decoding = Decoding(max_new_tokens, temperature, seed)
        with console.status(f"rebuilding client {client} of {run_dir} after its last round"):
            result = continue_with(run_dir, client, prompt, decoding)
    except PfedloraError as error:
        raise _fail(error) from None
    console.print(
        f"[bold]client {client} ({escape(result.arch)}):[/] {escape(prompt)}{escape(result.personalized)}"
    )
    console.print(f"[bold]zero-shot base:[/] {escape(prompt)}{escape(result.base)}")


def _summary_paragraph(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring on one line (a summary may wrap in the source)."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


@app.command("list")
def list_available() -> None:
    """Show the algorithms and their options, models, tasks, datasets, partitions and adapter placements."""
    import dataclasses

    from pfedlora.algorithms import ALGORITHMS
    from pfedlora.config import allowed_values, default_options, option_key
    from pfedlora.data import DATASETS, PARTITIONS, search_paths
    from pfedlora.models import FAMILIES, MODELS, PLACEMENTS, build_model, is_transformer
    from pfedlora.models.causal_lm import LANGUAGE_MODELS, LM_RANKS
    from pfedlora.seeding import torch_generator
    from pfedlora.tasks import TASKS

    table = Table(title="algorithms", show_header=False)
    for name, cls in ALGORITHMS.items():
        table.add_row(name, escape(_summary_paragraph(cls)))
    console.print(table)
    title = "algorithms' own options (--set <algorithm>.<key>=<value>, or a [<algorithm>] section)"
    table = Table(title=title)
    for column in ("key", "default", "allowed"):
        table.add_column(column)
    for name, options in default_options().items():
        for declared in dataclasses.fields(options):
            key, default = f"{name}.{option_key(declared.name)}", getattr(options, declared.name)
            table.add_row(key, repr(default), escape(allowed_values(declared)))
    console.print(table)

    table = Table(title="models (client i gets architectures[i mod n])")
    for column in ("name", "params 1×28×28, 10 classes", "params 3×32×32, 10 classes"):
        table.add_column(column)
    for arch in (name for name in MODELS if not is_transformer(name)):
        counts = [
            sum(p.numel() for p in build_model(arch, shape, 10, torch_generator(0, arch)).parameters())
            for shape in ((1, 28, 28), (3, 32, 32))
        ]
        table.add_row(arch, *(f"{c / 1e6:.2f}M" for c in counts))
    console.print(table)
    table = Table(title="text model families (<family>-l<k>: the first k layers; input: text)")
    for column in ("family", "architectures", "pooling on auto", "checkpoint"):
        table.add_column(column)
    for _, family in FAMILIES.items():
        table.add_row(
            family.name,
            f"{family.name}-l1 … {family.name}-l{family.layers}",
            family.pooling,
            escape(family.about),
        )
    console.print(table)

    families = sorted({arch.family for _, arch in LANGUAGE_MODELS.items()})
    console.print(
        "[bold]language models[/] (data.task = language-modeling; <family>-r<k>: the whole causal LM with a "
        f"private LoRA of rank k): {', '.join(f'{f}-r{LM_RANKS[0]} … {f}-r{LM_RANKS[-1]}' for f in families)}"
    )
    table = Table(title="tasks (data.task)", show_header=False)
    for name, task in TASKS.items():
        serving = [algo for algo, cls in ALGORITHMS.items() if name in cls.tasks]
        table.add_row(name, f"{task.about}; algorithms: {', '.join(serving)}")
    console.print(table)
    console.print(f"[bold]datasets:[/] {', '.join(DATASETS)}")
    console.print(f"  looked up in: {', '.join(str(p) for p in search_paths())}")
    console.print(f"[bold]partitions:[/] {', '.join(PARTITIONS)}")
    console.print(f"[bold]adapter placements:[/] {', '.join(PLACEMENTS)}")


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def main() -> None:
    """Console-script entry point."""
    app()
