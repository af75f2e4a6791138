"""``trainq``: the command line for the trainq API (Typer and Rich, on :mod:`trainq.client`).

    trainq up                                   # the local stack (API on :8000) until Ctrl-C
    trainq submit examples/digits.json --wait   # submit, then a progress bar until the job ends
    trainq list --state running                 # your jobs, newest first
    trainq status ID | cancel ID | logs ID --follow | artifacts ID --download DIR | tensorboard ID
    trainq workers | queues | storage

The API is ``--url`` or ``TRAINQ_URL`` (default ``http://127.0.0.1:8000``), the token ``--token`` or
``TRAINQ_TOKEN``. A job id may be shortened to a unique prefix of at least 6 characters (as git's).
``--json`` prints the API's JSON for scripts. ``TRAINQ_DEBUG=1`` shows tracebacks of unexpected errors.

Exit status (:class:`ExitStatus`): 0 done (a command that waits on a job: the job succeeded); 1 an error,
printed as one line ``error: …``; 2 a wrong command line; 3 the job waited on failed; 4 it was
cancelled; 130 interrupted (Ctrl-C). Every string from the API reaches the terminal through
:mod:`trainq.terminal`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from shared.records import JobRecord, JobState
from trainq import terminal
from trainq.client import DEFAULT_URL, Client, TrainqClientError
from trainq.display import (
    Watcher,
    format_duration,
    format_when,
    history_text,
    last_reason,
    metrics_text,
    phase_text,
    summary_line,
)


class ExitStatus(IntEnum):
    """The CLI's exit status. A command that waits on a job (``submit --wait``, ``logs --follow``)
    exits 0 only when the job succeeded."""

    OK = 0
    ERROR = 1  #: the command failed (API refused or unreachable, bad file…): one line ``error: …``
    USAGE = 2  #: a wrong command line (Click's own code)
    JOB_FAILED = 3
    JOB_CANCELLED = 4
    INTERRUPTED = 130  #: Ctrl-C


#: Options of ``trainq`` itself, which go before the command.
_GLOBAL_OPTIONS = ("--url", "--token")


class _Group(TyperGroup):
    """The command group: an option of ``trainq`` itself given after the command gets a hint."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # Click's NoSuchOption (Typer vendors its own Click: matched by its attributes).
            if getattr(exc, "option_name", None) in _GLOBAL_OPTIONS and hasattr(exc, "message"):
                command = ctx.invoked_subcommand or "COMMAND"
                exc.message += f" for `{command}`: {exc.option_name} goes before the command (`trainq {exc.option_name} … {command} …`)"
                exc.possibilities = None
            raise


app = typer.Typer(
    cls=_Group,
    name="trainq",
    help="Submit, watch and fetch PyTorch training jobs on a trainq service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="API tokens, through the API with an admin token (ADMIN_TOKEN or an --admin token).", no_args_is_help=True)
app.add_typer(token_app, name="token")

F = TypeVar("F", bound=Callable[..., Any])
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON (for scripts).")]


def _console(stderr: bool = False) -> Console:
    return terminal.console(stderr=stderr)


def handle_errors(command: F) -> F:
    """Turn every failure of ``command`` into one line on stderr and exit status 1 (130 on Ctrl-C)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TrainqClientError as exc:
            ctx = kwargs.get("ctx")
            _fail(_client_error(exc, token_given=bool(ctx is not None and ctx.obj and ctx.obj.get("token"))))
        except KeyboardInterrupt:
            raise typer.Exit(ExitStatus.INTERRUPTED) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("TRAINQ_DEBUG"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (TRAINQ_DEBUG=1 shows the traceback)")

    return wrapper  # type: ignore[return-value]


def _client_error(exc: TrainqClientError, *, token_given: bool) -> str:
    """The one line for a failed call, in the CLI's terms (a 401 says which setting to fix)."""
    if exc.status_code != 401:
        return str(exc)
    if not token_given:
        return ("401 a bearer token is required: set TRAINQ_TOKEN=<token>, or give it before the command "
                "(`trainq --token <token> COMMAND`); an admin issues one with `trainq token create --owner NAME`")
    return f"{exc} (the token from TRAINQ_TOKEN or `trainq --token`)"


def _fail(message: str, code: int = ExitStatus.ERROR) -> None:
    terminal.write(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _exit_for(state: JobState) -> None:
    """End a command that waited on a job: exit 0 only if it succeeded."""
    if state is JobState.FAILED:
        raise typer.Exit(ExitStatus.JOB_FAILED)
    if state is JobState.CANCELLED:
        raise typer.Exit(ExitStatus.JOB_CANCELLED)
    if state is not JobState.SUCCEEDED:
        _fail(f"the job is still {state.value}")


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="TRAINQ_URL", help="The trainq API.")] = DEFAULT_URL,
    token: Annotated[str | None, typer.Option(envvar="TRAINQ_TOKEN", help="Bearer token (`trainq token create`).", show_default=False)] = None,
) -> None:
    """trainq: batch training on a queue of GPU workers."""
    ctx.obj = {"url": url, "token": token}


def _client(ctx: typer.Context) -> Client:
    return Client(ctx.obj["url"], ctx.obj["token"] or "")


def _print_json(value: BaseModel | list | dict) -> None:
    if isinstance(value, BaseModel):
        text = value.model_dump_json(indent=2)
    else:
        text = json.dumps([v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
                          if isinstance(value, list) else value, indent=2)
    sys.stdout.write(text + "\n")


# -- jobs -------------------------------------------------------------------------------------
@app.command()
@handle_errors
def submit(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="The job spec, a JSON file (see examples/).")],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Show progress until the job ends; exit 0 if it succeeds, 3 if it fails, 4 if cancelled.")
    ] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Resubmitting with the same key returns the same job.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only check the spec on a worker (data, model, one step); queue nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a training spec; with --wait, follow it to the end; with --dry-run, only check it."""
    client = _client(ctx)
    if dry_run:
        report = client.dry_run(spec)
        if as_json:
            _print_json(report)
        else:
            out = _console()
            out.print(f"dry run ok: {report.task}, {len(report.classes) or report.counts.get('rows', 0)} "
                      f"{'classes' if report.classes else 'rows'}, input {report.input_shape}, {report.parameters:,} parameters, "
                      f"batch {report.batch_shape}, loss {report.loss:.4f}")
            for warning in report.warnings:
                out.print(f"warning: {warning}")
        return
    job = client.submit(spec, idempotency_key=idempotency_key)
    out = _console(stderr=as_json)
    if not wait:
        if as_json:
            _print_json(job.record)
        else:
            out.print(f"job {job.id} {job.record.state.value} on queue {job.record.queue}" + (" (replayed)" if job.replayed else ""))
        return
    out.print(f"job {job.id} submitted to queue {job.record.queue}")
    with Watcher(out) as watcher:
        record = job.wait(on_update=watcher.update)
    if as_json:
        _print_json(record)
    else:
        out.print(summary_line(record))
        if record.artifacts.final_checkpoint:
            out.print(f"final checkpoint {record.artifacts.final_checkpoint}")
    _exit_for(record.state)


@app.command("list")
@handle_errors
def list_jobs(
    ctx: typer.Context,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs on this queue.")] = None,
    name: Annotated[str | None, typer.Option(help="Only jobs with this spec name.")] = None,
    owner: Annotated[str | None, typer.Option(help="Admins: only this owner's jobs.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Your jobs, newest first."""
    client = _client(ctx)
    # One more than shown, to say when there are more (a silent cut read as "that is all").
    jobs = list(client.iter_jobs(max_jobs=limit + 1, state=state, queue=queue, name=name, owner=owner, limit=min(limit + 1, 500)))
    more, jobs = len(jobs) > limit, jobs[:limit]
    if as_json:
        _print_json(jobs)
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "name", "state", "queue", "created (UTC)", "epoch", "val metric"):
        table.add_column(column, no_wrap=column == "id")
    for job in jobs:
        p = job.progress
        metric = next(iter(p.val_metrics.items()), None)
        table.add_row(
            job.id, job.name or "-", job.state.value, job.queue, format_when(job.created_at), f"{p.epoch}/{p.epochs}",
            f"{metric[0]} {metric[1]:.4f}" if metric else "-",
        )
    console = _console()
    console.print(table if jobs else "no jobs")
    if more:
        _console(stderr=True).print(f"the newest {limit} shown; more with --limit N")


@app.command()
@handle_errors
def status(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id (or a unique prefix).")], as_json: JsonOption = False) -> None:
    """One job: state, what it is doing, progress, device, error or reason, artifacts."""
    record = _client(ctx).get(job_id)
    if as_json:
        _print_json(record)
        return
    rows = _status_rows(record)
    table = Table(box=None, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)


def _status_rows(record: JobRecord) -> list[tuple[str, str]]:
    """``trainq status``'s rows: what the job is, does and did; a stopped job's reason and last checkpoint."""
    p = record.progress
    rows = [
        ("id", record.id), ("name", record.name or "-"), ("owner", record.owner), ("state", record.state.value),
        ("queue", record.queue),
        ("priority", f"{record.spec.priority}" + ("" if record.spec.preemptible else " (not preemptible)")),
        ("created", format_when(record.created_at)), ("attempts", str(record.attempts)),
        *([("phase", phase_text(record))] if phase_text(record) else []),
        ("progress", metrics_text(record)), ("runtime", format_duration(p.runtime_s)),
        ("ETA", format_duration(p.eta_s) if record.state is JobState.RUNNING else "-"),
        ("device", record.device or "-"), ("worker", record.worker or "-"),
    ]
    if record.error:
        rows.append(("error", record.error))
    elif record.state in (JobState.CANCELLED, JobState.RETRYING, JobState.PREEMPTED) and last_reason(record):
        rows.append(("reason", last_reason(record)))
    if record.state is not JobState.SUCCEEDED and record.artifacts.checkpoints:
        rows.append(("last checkpoint", record.artifacts.checkpoints[-1]))
    rows.append(("history", history_text(record)))
    if record.artifacts.tensorboard:
        rows.append(("tensorboard", record.artifacts.tensorboard))
    if record.artifacts.final_checkpoint:
        rows.append(("final checkpoint", record.artifacts.final_checkpoint))
    return rows


@app.command()
@handle_errors
def cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id (or a unique prefix).")], as_json: JsonOption = False) -> None:
    """Cancel a job: a queued one never starts; a running one checkpoints and stops."""
    record = _client(ctx).cancel(job_id)
    if as_json:
        _print_json(record)
    elif record.state is JobState.CANCELLED:
        _console().print(f"job {record.id} cancelled")
    else:
        _console().print(f"job {record.id}: cancel requested; it stops at the next step after a checkpoint")


@app.command()
@handle_errors
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id (or a unique prefix).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Go on printing until the job ends; exit 0 if it succeeded, 3 if it failed, 4 if cancelled.")
    ] = False,
    attempt: Annotated[int | None, typer.Option(min=1, help="Only this attempt.")] = None,
) -> None:
    """The job's training log (every attempt): engine lines, warnings, tracebacks."""
    client = _client(ctx)
    if not follow:
        terminal.write(client.logs(job_id, attempt=attempt), end="", keep_newlines=True)
        return
    job_id = client.get(job_id).id  # the whole id, for the last line
    ended: dict = {}
    for line in client.follow_logs(job_id, attempt=attempt, on_end=ended.update):
        terminal.write(line)
    if not ended:
        _fail(f"the log stream of job {job_id} ended before the job did")
    state = JobState(ended["state"])
    terminal.write(f"-- job {job_id} {state.value}" + (f": {ended['error']}" if ended.get("error") else ""), file=sys.stderr)
    _exit_for(state)


@app.command()
@handle_errors
def artifacts(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id (or a unique prefix).")],
    download: Annotated[Path | None, typer.Option(help="Download everything to DIR/<job_id>/.", metavar="DIR")] = None,
    as_json: JsonOption = False,
) -> None:
    """What the job wrote (checkpoints, TensorBoard events, logs), with download URLs; or download it."""
    client = _client(ctx)
    if download is not None:
        console = _console(stderr=as_json)
        folder = download.resolve() / client.get(job_id).id  # the whole id, as the client names the folder
        paths = client.download_artifacts(job_id, download, on_file=lambda path, size: console.print(f"{size:>12,}  {path}"))
        if as_json:
            _print_json([str(path) for path in paths])
        else:
            console.print(f"{len(paths)} files in {folder}/")
        return
    listing = client.artifacts(job_id)
    if as_json:
        _print_json(listing)
        return
    table = Table(box=None, header_style="bold")
    table.add_column("path", no_wrap=True)
    table.add_column("bytes", justify="right")
    table.add_column("modified (UTC)")
    for item in listing.files:
        table.add_row(item.path, f"{item.size_bytes:,}", format_when(item.last_modified))
    console = _console()
    console.print(f"{listing.prefix}  ({len(listing.files)} files; `--json` has download URLs valid until {format_when(listing.expires_at)} UTC)")
    console.print(table)


@app.command()
@handle_errors
def tensorboard(
    ctx: typer.Context,
    job_id: Annotated[str | None, typer.Argument(help="A job's id (or a unique prefix); default every job.", show_default=False)] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TensorBoard's port.")] = 6006,
    host: Annotated[str, typer.Option(help="Address TensorBoard listens on.")] = "127.0.0.1",
) -> None:
    """Start TensorBoard on a job's (or every job's) event files in S3.

    The bucket and S3 endpoint come from the API (`GET /config/tensorboard`); `S3_ENDPOINT` in your
    environment wins. The S3 credentials are your own (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
    or ~/.aws); the API never hands them out."""
    client = _client(ctx)
    config = client.tensorboard_config()
    logdir = config.logdir
    if job_id is not None:
        record = client.get(job_id)
        logdir = record.artifacts.tensorboard or f"{config.logdir.rstrip('/')}/{record.id}/tensorboard/"
    env = dict(os.environ)
    if config.s3_endpoint and not env.get("S3_ENDPOINT"):
        env["S3_ENDPOINT"] = config.s3_endpoint
    if config.region and not (env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")):
        env["AWS_DEFAULT_REGION"] = config.region
    import boto3

    if boto3.Session().get_credentials() is None:
        _fail("TensorBoard reads S3 with your own credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
              "(the local stack of `trainq up` takes `testing` for both)")
    with socket.socket() as probe:  # TensorBoard's own message for a taken port is a 255 exit
        try:
            probe.bind((host, port))
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another with --port")
    executable = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    command = [executable, "--logdir", logdir, "--port", str(port), "--host", host]
    terminal.write(f"TensorBoard on {logdir} at http://{host}:{port}/ (S3_ENDPOINT={env.get('S3_ENDPOINT') or 'AWS'}); Ctrl-C stops it",
                   file=sys.stderr)
    try:
        # This process becomes TensorBoard: Ctrl-C, SIGTERM and a closed terminal reach it directly
        # (a child would outlive a SIGTERM to this CLI, keeping the port).
        os.execve(executable, command, env)
    except FileNotFoundError:
        _fail(f"tensorboard is not installed ({executable}); `pip install tensorboard`")


# -- the service ------------------------------------------------------------------------------
@app.command()
@handle_errors
def workers(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Live workers: queues, device (GPU, memory, CUDA), current job, last heartbeat."""
    found = _client(ctx).workers()
    if as_json:
        _print_json(found)
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "queues", "device", "CUDA", "current job", "last heartbeat"):
        table.add_column(column, no_wrap=column in ("name", "current job"))
    now = time.time()
    for worker in found:
        device = ", ".join(f"{gpu.name} ({gpu.memory_bytes / 2**30:.0f} GiB)" for gpu in worker.device.gpus) or "cpu"
        table.add_row(
            worker.name, ",".join(worker.queues), device, (worker.device.cuda_version or "-") if worker.device.cuda_available else "-",
            worker.current_job or "-",
            f"{now - worker.last_heartbeat:.0f} s ago",
        )
    _console().print(table if found else "no live workers")


@app.command()
@handle_errors
def queues(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Queues: jobs waiting and live workers consuming each; per owner, jobs pending and running, fair share and usage."""
    client = _client(ctx)
    listing, shares = client.queues(), client.shares()
    if as_json:
        _print_json(listing.model_dump(mode="json") | {"shares": shares.model_dump(mode="json")["data"]})
        return
    table = Table(box=None, header_style="bold")
    for column in ("queue", "waiting", "workers"):
        table.add_column(column)
    for queue in listing.data:
        table.add_row(queue.name, str(queue.depth), str(queue.workers) + ("  (no worker: its jobs wait)" if queue.depth and not queue.workers else ""))
    _console().print(table)
    owners = Table(box=None, header_style="bold")
    for column in ("queue", "owner", "pending", "running", "share", "usage (GPU-h, decayed)"):
        owners.add_column(column)
    for queue in shares.data:
        for o in queue.owners:
            owners.add_row(queue.queue, o.owner, str(o.pending), str(o.running), f"{o.share:.0%}", f"{o.usage_gpu_s / 3600:.2f}")
    if owners.row_count:
        _console().print(owners)


@app.command()
@handle_errors
def storage(
    ctx: typer.Context,
    owner: Annotated[str | None, typer.Option(help="Another owner's (admins only); default yours.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Bytes your jobs hold in S3 (checkpoints, TensorBoard events, logs), listed now."""
    found = _client(ctx).storage(owner)
    if as_json:
        _print_json(found)
        return
    bounded = f" (newest {found.jobs} of {found.jobs_total} jobs)" if found.jobs < found.jobs_total else ""
    terminal.write(f"{found.owner}: {found.bytes:,} bytes ({found.bytes / 2**30:.2f} GiB) in {found.objects:,} objects "
                   f"of {found.jobs:,} jobs{bounded}")


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1.")] = 8000,
    workers: Annotated[int, typer.Option(help="Celery worker processes.")] = 1,
    workdir: Annotated[Path, typer.Option(help="Logs and data.")] = Path(".trainq"),
    no_seed: Annotated[bool, typer.Option("--no-seed", help="Do not upload the sample data sets.")] = False,
) -> None:
    """Run the local stack (Redis, S3, API, a worker) until Ctrl-C; as `python -m trainq.stack`."""
    from trainq.stack import main as stack_main

    argv = ["--port", str(port), "--workers", str(workers), "--workdir", str(workdir)] + (["--no-seed"] if no_seed else [])
    raise typer.Exit(stack_main(argv))


@app.command()
def demo(
    spec: Annotated[Path | None, typer.Option(help="Spec to train (default examples/digits.json).")] = None,
    out: Annotated[Path, typer.Option(help="Where the artifacts are copied.")] = Path("demo-artifacts"),
    min_accuracy: Annotated[float, typer.Option(help="Exit 1 below this val accuracy.")] = 0.97,
) -> None:
    """Train a small CNN on real handwritten digits through a fresh local stack; as `make demo`."""
    from trainq.demo import main as demo_main

    argv = (["--spec", str(spec)] if spec else []) + ["--out", str(out), "--min-accuracy", str(min_accuracy)]
    raise typer.Exit(demo_main(argv))


# -- tokens -----------------------------------------------------------------------------------
@token_app.command("create")
@handle_errors
def token_create(
    ctx: typer.Context,
    owner: Annotated[str, typer.Option(help="Who the token acts as.")],
    admin: Annotated[bool, typer.Option("--admin", help="Sees and cancels every owner's jobs; manages tokens.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Issue a token and print it (once): `export TRAINQ_TOKEN=$(trainq token create --owner alice)`."""
    issued = _client(ctx).create_token(owner, admin=admin)
    if as_json:
        _print_json(issued)
        return
    terminal.write(issued.token)
    terminal.write(f"token {issued.id} for owner {issued.owner!r}{' (admin)' if issued.admin else ''}; it is not shown again",
                   file=sys.stderr)


@token_app.command("list")
@handle_errors
def token_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List tokens (never the tokens themselves)."""
    tokens = _client(ctx).tokens()
    if as_json:
        _print_json(tokens)
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "owner", "admin", "created (UTC)"):
        table.add_column(column, no_wrap=column == "id")
    for info in tokens:
        table.add_row(info.id, info.owner, "yes" if info.admin else "no", format_when(info.created_at))
    _console().print(table if tokens else "no tokens")


@token_app.command("revoke")
@handle_errors
def token_revoke(
    ctx: typer.Context,
    token_id: Annotated[str | None, typer.Argument(help="Token id from `trainq token list` (at least 8 hex digits).")] = None,
    owner: Annotated[str | None, typer.Option(help="Revoke every token of this owner.")] = None,
) -> None:
    """Revoke a token by id, or every token of an owner."""
    for info in _client(ctx).revoke_tokens(token_id=token_id, owner=owner):
        terminal.write(f"revoked {info.id} (owner {info.owner})")


if __name__ == "__main__":
    app()
