"""The ``fastmeta`` command: ``info``, ``demo``, ``bench``, ``train maml|cavia|lstm-opt``,
``eval`` and ``hpo``.

``train maml|cavia`` meta-trains a few-shot learner (``--task``); ``train lstm-opt`` meta-trains
the learned LSTM optimizer of Andrychowicz et al. 2016 (``--problem``) and compares it with tuned
SGD, momentum, RMSprop and Adam. Every run checkpoints as it goes and continues exactly with
``--resume``; ``eval`` evaluates any of their checkpoints. With ``--distributed``, under
``torchrun``, each meta-batch is split across the processes (:mod:`fastmeta.distributed`).
``hpo`` tunes SGD's per-layer lr, momentum and weight decay by hypergradients through unrolled
training, or by Optuna's TPE, CMA-ES or random search, on a wall-clock budget.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from typing import NoReturn

import torch

import fastmeta
from fastmeta import backends


def cmd_info(args: argparse.Namespace) -> int:
    from fastmeta.bench.harness import cpu_model

    info = backends.available()
    rows = [
        ("fastmeta", fastmeta.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch threads", str(torch.get_num_threads())),
        ("cpu", cpu_model()),
        ("native (fastmeta._C)", "built" if info["native"] else f"missing: {info['native_error']}"),
        ("native ISA", info["isa"] or "-"),
        ("native threads", str(info["native_threads"] or "-")
         + ("" if not info["native"] else " (OpenMP)" if info["openmp"] else " (no OpenMP)")),
        ("triton",
         info["triton_version"] if info["triton"] else f"missing: {info['triton_error']}"),
        ("triton interpreter", "on (TRITON_INTERPRET=1)" if info["triton_interpreted"] else "off"),
        ("cuda", torch.cuda.get_device_name(0) if info["cuda"] else "not available"),
        ("FASTMETA_IMPL", info["impl_override"] or "unset (auto)"),
        ("torch BLAS from native",
         "found (a ReLU MLP's HPO unroll and MAML task gradients are native)"
         if info["torch_blas"]
         else "not used (a ReLU MLP's HPO unroll and MAML task gradients run torch ops)"),
    ]
    impls = ["reference"]
    if info["native"]:
        impls.append("native (cpu)")
    if info["triton"] and (info["cuda"] or info["triton_interpreted"]):
        impls.append("triton (cuda)" if info["cuda"] else "triton (interpreted, cpu)")
    rows.append(("implementations", ", ".join(impls)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A short end-to-end run: the same SGD steps on every implementation this install has,
    checked against the reference."""
    from fastmeta.ops.sgd import sgd_step_

    torch.manual_seed(0)
    shapes = [(64, 1, 3, 3), (64,), (64, 64, 3, 3), (64,), (5, 256), (5,)]
    base = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    impls = ["reference"]
    info = backends.available()
    if info["native"]:
        impls.append("native")
    if info["triton"] and info["triton_interpreted"]:
        impls.append("triton")
    results = {}
    print(f"SGD, {len(shapes)} tensors ({sum(p.numel() for p in base)} elements), 10 steps:")
    for impl in impls:
        params = [p.clone() for p in base]
        start = time.perf_counter()
        for _ in range(10):
            sgd_step_(params, grads, lr=0.01, weight_decay=1e-4, impl=impl)
        elapsed = (time.perf_counter() - start) / 10
        results[impl] = params
        err = max((a - b).abs().max().item() for a, b in zip(params, results["reference"]))
        print(f"  {impl:<10} {elapsed * 1e6:9.1f} us/step   max |diff vs reference| = {err:.2e}")
    return 0


# `fastmeta eval` of a MAML or CAVIA checkpoint: tasks and inner steps by default.
MAML_EVAL_TASKS, MAML_EVAL_STEPS = 1000, [1, 10]


class _Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f}s] {message}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the selected suites, prints one table per suite, writes JSON and a PNG chart.
    Ctrl-C stops the run and still reports every row finished so far."""
    from fastmeta.bench import harness, report, suites

    try:
        selected = suites.select(args.only)
    except ValueError as exc:
        print(f"fastmeta bench: {exc}", file=sys.stderr)
        return 2
    progress = _Progress()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"fastmeta bench on {device}: {harness.cpu_model()}, {torch.get_num_threads()} "
          f"threads{' (quick)' if args.quick else ''}")
    finished: list[tuple[suites.Suite, list[harness.Row]]] = []
    extras: dict[str, dict] = {}
    failures: dict[str, str] = {}
    interrupted = False
    try:
        for suite in selected:
            rows: list[harness.Row] = []
            finished.append((suite, rows))
            try:
                for row in suite.rows(quick=args.quick, progress=progress):
                    rows.append(row)
                if suite.extra is not None:
                    progress(f"{suite.name}: memory")
                    extras[suite.name] = suite.extra()
            except Exception as exc:  # one broken suite must not lose the others' rows
                failures[suite.name] = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        interrupted = True
    progress.done()
    all_rows = []
    for suite, rows in finished:
        if rows:
            print(f"\n{suite.name}: {suite.description}")
            shown = [b for b in suite.baselines if any(r.baselines.get(b) for r in rows)]
            print(harness.format_table(rows, shown))
            for b in suite.baselines:
                if b not in shown:
                    notes = {r.notes.get(b) for r in rows if r.notes.get(b)}
                    print(f"  ({b}: {'; '.join(sorted(notes)) if notes else 'not measured'})")
            all_rows += rows
        for title, values in extras.get(suite.name, {}).items():
            print(f"{title}:")
            for key, value in values.items():
                print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    for name, error in failures.items():
        print(f"\n{name}: FAILED ({error}); its finished rows, if any, are above")
    if interrupted:
        print(f"\ninterrupted: reporting the {len(all_rows)} row(s) finished so far")
    if not all_rows:
        return 130 if interrupted else 1
    harness.write_json(args.json, "fastmeta bench", all_rows,
                       extra={"quick": args.quick, "interrupted": interrupted,
                              "suites": [s.name for s, _ in finished], "extras": extras,
                              "failures": failures})
    report.plot_speedups(all_rows, args.plot, title=f"fastmeta bench ({device}, "
                         f"{torch.get_num_threads()} threads)")
    print(f"\nwrote {args.json} and {args.plot}")
    return 130 if interrupted else 1 if failures else 0


# `fastmeta train` options (argparse dests) that only some algorithms take; an option of one
# family given to the other is refused by name. The rest (--meta-batch, --outer-lr,
# --eval-every, --eval-tasks, --seed, --impl, --out, --resume) apply to every algorithm.
META_LEARNING_ONLY = ("task", "shots", "queries", "ways", "inner_steps", "inner_lr",
                      "first_order", "inner_optimizer", "learn_inner_lr", "iterations",
                      "grad_clip", "eval_steps", "eval_shots", "omniglot_root", "filters",
                      "num_context_params", "context_mode")
LSTM_OPT_ONLY = ("problem", "epochs", "horizon", "unroll", "second_order", "hidden",
                 "outer_lr_decay_epoch", "outer_lr_decay_factor")
LSTM_OPT_KEYS = LSTM_OPT_ONLY + ("meta_batch", "outer_lr", "eval_every", "eval_tasks", "seed",
                                 "impl", "out")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _refuse_foreign_options(args: argparse.Namespace) -> None:
    lstm = args.algorithm == "lstm-opt"
    foreign = [_flag(k) for k in (META_LEARNING_ONLY if lstm else LSTM_OPT_ONLY)
               if getattr(args, k) is not None]
    if foreign:
        owner = "maml and cavia" if lstm else "lstm-opt"
        which = "this option applies" if len(foreign) == 1 else "these options apply"
        raise ValueError(f"{', '.join(foreign)}: {which} to {owner} only, not to "
                         f"{args.algorithm}")


def _train_config(args: argparse.Namespace) -> dict:
    _refuse_foreign_options(args)
    if args.algorithm == "lstm-opt":
        from fastmeta.meta import lstm_runs

        return lstm_runs.default_config(**{k: getattr(args, k) for k in LSTM_OPT_KEYS
                                           if getattr(args, k) is not None})
    from fastmeta.meta.runs import default_config

    keys = ["task", "shots", "queries", "ways", "inner_steps", "inner_lr", "first_order",
            "inner_optimizer", "learn_inner_lr", "meta_batch", "iterations", "outer_lr",
            "grad_clip", "eval_every", "eval_tasks", "eval_steps", "eval_shots", "seed",
            "omniglot_root", "filters", "num_context_params", "context_mode", "impl", "out"]
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    values["algorithm"] = args.algorithm
    if values.get("learn_inner_lr") == "none":
        values["learn_inner_lr"] = False
    return default_config(**values)


def _describe(ev: dict) -> str:
    """One evaluation as a line: loss (and accuracy) with the 95% CI, and diverged tasks."""
    line = f"{ev['shots']}-shot, {ev['steps']} step(s), {ev['tasks']} tasks: loss "
    line += ("n/a" if ev["loss"] is None else
             f"{ev['loss']['mean']:.4f} ± {ev['loss']['ci']:.4f} (95% CI)")
    if ev.get("diverged"):
        line += f", {ev['diverged']} task(s) diverged (excluded)"
    return line


# How `fastmeta train --distributed` is launched, for the error when it was not.
TORCHRUN_USAGE = ("torchrun --nproc_per_node=N -m fastmeta.cli train ... --distributed (or, on "
                  "several machines, torchrun --nnodes=M --node_rank=I --rdzv_backend=c10d "
                  "--rdzv_endpoint=HOST:PORT --nproc_per_node=N -m fastmeta.cli train ... "
                  "--distributed)")


def _check_distributed_options(args: argparse.Namespace) -> str | None:
    """The reason ``--distributed``/``--dist-timeout`` cannot run here, or None."""
    from fastmeta import distributed

    if not args.distributed:
        if args.dist_timeout is not None:
            return "--dist-timeout applies with --distributed only"
        return None
    missing = distributed.missing_torchrun_variables()
    if missing and not distributed.is_initialized():
        return (f"--distributed needs the environment torchrun gives each process "
                f"({', '.join(missing)} not set); launch with {TORCHRUN_USAGE}")
    return None


def cmd_train(args: argparse.Namespace) -> int:
    global _used_process_group
    from fastmeta import distributed
    from fastmeta.meta import lstm_runs, runs
    from fastmeta.meta.training import CheckpointError

    lstm = args.algorithm == "lstm-opt"
    config: dict | None = None
    problem = _check_distributed_options(args)
    if problem is not None:
        print(f"fastmeta train: {problem}", file=sys.stderr)
        return 2
    where = ""  # which process speaks, in a distributed run
    main = True
    try:
        config = _train_config(args)
        with contextlib.ExitStack() as stack:
            if args.distributed:
                timeout = (distributed.DEFAULT_TIMEOUT_S if args.dist_timeout is None
                           else args.dist_timeout)
                # The runs train on the CPU: gloo.
                _used_process_group = True
                ctx = stack.enter_context(distributed.session(timeout_s=timeout, device="cpu"))
                where = f" (rank {ctx.rank} of {ctx.world_size})"
                main = ctx.is_main
            summary = (lstm_runs if lstm else runs).train(config, resume=args.resume,
                                                          quiet=not main,
                                                          distributed=args.distributed)
    except (ValueError, CheckpointError) as exc:
        print(f"fastmeta train{where}: {exc}", file=sys.stderr)
        return 2
    except distributed.DistributedError as exc:
        print(f"fastmeta train{where}: {exc}", file=sys.stderr)
        if config is not None:
            print(f"fastmeta train{where}: {config['out']}/checkpoint.pt (on rank 0's machine) "
                  "holds the last checkpoint: continue with --resume, on any number of "
                  "processes", file=sys.stderr)
        return 1
    except FloatingPointError as exc:
        print(f"fastmeta train{where}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if config is not None and main:
            print(f"\nfastmeta train: interrupted; {config['out']}/checkpoint.pt holds the last "
                  "checkpoint: continue with --resume", file=sys.stderr)
        return 130
    if not main:
        return 0
    print(f"trained in {summary['train_seconds']:.1f} s; results in {config['out']}")
    if lstm:
        print(f"{summary['held_out_problems']} held-out {config['problem']} problems:")
        print(lstm_runs.format_table(summary["results"], summary["steps"]))
        return 0
    for ev in summary["evaluation"]:
        line = f"  {_describe(ev)}"
        if "accuracy" in ev:
            line += f", accuracy {ev['accuracy']['mean']:.3f} ± {ev['accuracy']['ci']:.3f}"
        print(line)
    return 0


def _eval_lstm_opt(args: argparse.Namespace) -> int:
    """The held-out loss of an lstm-opt run's rule after each of ``--steps`` steps."""
    from fastmeta.meta import lstm_runs

    if args.shots is not None:
        print("fastmeta eval: --shots applies to maml and cavia checkpoints only, not to an "
              "lstm-opt one", file=sys.stderr)
        return 2
    rule, config = lstm_runs.load_trained(args.checkpoint)
    best = lstm_runs.load_selection(args.checkpoint)
    problems = args.tasks if args.tasks is not None else config["eval_tasks"]
    steps = args.steps or [config["horizon"], 2 * config["horizon"]]
    try:
        results = lstm_runs.evaluate(rule, config, problems=problems, steps=steps)
    except ValueError as exc:
        print(f"fastmeta eval: {exc} (--tasks, --steps)", file=sys.stderr)
        return 2
    which = ("the last epoch's rule: no validation evaluation has selected one"
             if best.epoch is None else
             f"epoch {best.epoch}'s rule, the best on validation (loss {best.loss:.4f})")
    print(f"learned rule ({config['problem']}, trained for {config['horizon']} steps; "
          f"{which}) on {problems} held-out problems:")
    for step, ev in results.items():
        line = f"  after {step} step(s): loss "
        line += ("n/a" if ev["mean"] is None else
                 f"{ev['mean']:.4f} ± {ev['ci']:.4f} (95% CI)")
        if ev["diverged"]:
            line += f", {ev['diverged']} problem(s) diverged (excluded)"
        print(line)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastmeta.meta import lstm_runs, runs
    from fastmeta.meta.training import CheckpointError, load_checkpoint

    try:
        if lstm_runs.is_run_config(load_checkpoint(args.checkpoint).get("config")):
            return _eval_lstm_opt(args)
        learner, config = runs.load_trained(args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fastmeta eval: {exc}", file=sys.stderr)
        return 2
    if args.draws < 1:
        print(f"fastmeta eval: --draws must be >= 1, got {args.draws}", file=sys.stderr)
        return 2
    seed = runs.EVAL_SEED if args.seed is None else args.seed
    for steps in args.steps or MAML_EVAL_STEPS:
        for shots in args.shots or [config["shots"]]:
            ev = runs.evaluate(learner, config, tasks=args.tasks or MAML_EVAL_TASKS,
                               steps=steps, shots=shots, seed=seed, draws=args.draws)
            line = _describe(ev)
            if "accuracy" in ev:
                line += f", accuracy {ev['accuracy']['mean']:.3f} ± {ev['accuracy']['ci']:.3f}"
            print(line)
            if "draw_losses" in ev:
                means = ", ".join("n/a" if m is None else f"{m:.4f}" for m in ev["draw_losses"])
                first, last = ev["seeds"]
                print(f"  each draw of {ev['tasks'] // args.draws} tasks (seeds {first}-{last}): "
                      f"{means}")
    return 0


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'' if n == 1 else 's'}"


# `fastmeta hpo` options (argparse dests) that only the hypergrad method takes.
HYPERGRAD_ONLY = ("unroll", "hyper_lr")


def cmd_hpo(args: argparse.Namespace) -> int:
    """Runs one search, adds it to <out>/summary.json, prints the table of every search in
    <out>, and plots them all."""
    from pathlib import Path

    from fastmeta import hpo

    if args.method != "hypergrad":
        foreign = [_flag(k) for k in HYPERGRAD_ONLY if getattr(args, k) is not None]
        if foreign:
            print(f"fastmeta hpo: {', '.join(foreign)} applies to the hypergrad method only, "
                  f"not to {args.method}", file=sys.stderr)
            return 2
    options = {k: getattr(args, k) for k in HYPERGRAD_ONLY if getattr(args, k) is not None}
    out = Path(args.out or f"hpo-{args.task}")
    progress = _Progress()
    try:
        task = hpo.TASKS[args.task](seed=args.seed)
        print(f"fastmeta hpo: {args.method} on {args.task} (seed {args.seed}), budget "
              f"{args.budget:g} s" + (f" or {args.runs} training runs" if args.runs else "")
              + f", {_threads()}; one training run = {task.steps} "
              f"steps of {task.batch_size}")
        result = hpo.search(task, args.method, budget_seconds=args.budget,
                            max_runs=args.runs, seed=args.seed, impl=args.impl,
                            progress=progress, **options)
        summary = hpo.update_summary(out, result)
    except (ValueError, ImportError) as exc:
        progress.done()
        print(f"fastmeta hpo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.done()
        print("\nfastmeta hpo: interrupted; nothing written", file=sys.stderr)
        return 130
    progress.done()
    best = result.best_hyperparameters
    print(f"{args.method}: {result.training_runs} training runs in {result.wall_seconds:.1f} s"
          + (f", {result.nonfinite} non-finite" if result.nonfinite else ""))
    if best is not None:
        print(f"  best: lr {[float(f'{v:.4g}') for v in best['lr']]}, momentum "
              f"{best['momentum']:.4g}, weight decay {best['weight_decay']:.3g}")
    print(f"\nall searches in {out}:")
    print(hpo.format_summary(summary))
    plot = out / hpo.PLOT_FILE
    if hpo.plot_histories(summary, plot):
        print(f"\nwrote {out / hpo.SUMMARY_FILE} and {plot}")
    else:
        print(f"\nwrote {out / hpo.SUMMARY_FILE}; no plot: matplotlib is not installed "
              "(pip install matplotlib)")
    return 0


# Set when this process joined a torch.distributed process group: see console_main.
_used_process_group = False


def main(argv: list[str] | None = None) -> int:
    global _used_process_group
    _used_process_group = False
    parser = argparse.ArgumentParser(prog="fastmeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, ISA, threads and available implementations")
    sub.add_parser("demo", help="run a fused SGD step on every available implementation")
    bench = sub.add_parser("bench", help="benchmark fastmeta against torch on this machine")
    bench.add_argument("--quick", action="store_true",
                       help="fewer workloads and shorter measurements (under 2 minutes)")
    bench.add_argument("--only", help="comma-separated suites to run (default: all)")
    bench.add_argument("--json", default="fastmeta-bench.json", help="where to write the rows")
    bench.add_argument("--plot", default="fastmeta-bench.png", help="where to write the chart")
    train = sub.add_parser(
        "train", help="meta-train an algorithm (checkpoints, --resume)",
        description="Meta-train MAML or CAVIA on a few-shot task (--task), or the LSTM learned "
        "optimizer (lstm-opt) on an optimizee family (--problem). Options marked 'maml/cavia' "
        "or 'lstm-opt' apply to those only; the others apply to all.")
    train.add_argument("algorithm", choices=["maml", "cavia", "lstm-opt"],
                       help="what to meta-train")
    train.add_argument("--task", choices=["sinusoid", "digits", "omniglot"],
                       help="maml/cavia: the few-shot task")
    train.add_argument("--problem", choices=["quadratic", "digits"],
                       help="lstm-opt: the optimizee family (10-d quadratics, or 64-20-10 MLPs "
                       "on the 8x8 digits)")
    train.add_argument("--shots", type=int, help="maml/cavia: K, support examples (per class)")
    train.add_argument("--queries", type=int, help="maml/cavia: query examples (per class)")
    train.add_argument("--ways", type=int,
                       help="maml/cavia: N, classes per task (classification)")
    train.add_argument("--inner-steps", type=int, help="maml/cavia")
    train.add_argument("--inner-lr", type=float, help="maml/cavia")
    train.add_argument("--first-order", action="store_true", default=None,
                       help="maml/cavia: first-order MAML (FOMAML) or first-order CAVIA")
    train.add_argument("--inner-optimizer",
                       choices=["sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad"],
                       help="maml/cavia")
    train.add_argument("--learn-inner-lr", choices=["none", "scalar", "per_param"],
                       help="maml/cavia: per_param is Meta-SGD")
    train.add_argument("--meta-batch", type=int,
                       help="tasks per meta-iteration (lstm-opt: problems per meta-epoch)")
    train.add_argument("--iterations", type=int, help="maml/cavia: meta-iterations")
    train.add_argument("--epochs", type=int,
                       help="lstm-opt: meta-epochs, each on fresh problems")
    train.add_argument("--horizon", type=int,
                       help="lstm-opt: optimizee steps per meta-epoch")
    train.add_argument("--unroll", type=int,
                       help="lstm-opt: optimizee steps per truncation of the backpropagation "
                       "through them; divides --horizon")
    train.add_argument("--second-order", action="store_true", default=None,
                       help="lstm-opt: backpropagate through the optimizee gradients too (the "
                       "paper drops these second derivatives)")
    train.add_argument("--hidden", type=int,
                       help="lstm-opt: units of each of the rule's two LSTM layers")
    train.add_argument("--outer-lr", type=float, help="the learning rate of the outer Adam")
    train.add_argument("--outer-lr-decay-epoch", type=int,
                       help="lstm-opt: the meta-epoch from which the outer lr is multiplied by "
                       "--outer-lr-decay-factor (default: none)")
    train.add_argument("--outer-lr-decay-factor", type=float,
                       help="lstm-opt: that factor, in (0, 1] (default: 1)")
    train.add_argument("--grad-clip", type=float,
                       help="maml/cavia: clamp meta-gradients to [-c, c]")
    train.add_argument("--eval-every", type=int,
                       help="iterations (lstm-opt: epochs) between two evaluations")
    train.add_argument("--eval-tasks", type=int,
                       help="tasks of the final evaluation (lstm-opt: problems in the tuning, "
                       "validation and held-out sets)")
    train.add_argument("--eval-steps", type=int, nargs="+", help="maml/cavia: inner steps of "
                       "the final evaluation (lstm-opt evaluates at --horizon and twice it)")
    train.add_argument("--eval-shots", type=int, nargs="+",
                       help="maml/cavia: support sizes of the final evaluation (default: "
                       "--shots)")
    train.add_argument("--filters", type=int, help="maml/cavia: conv-4 filters")
    train.add_argument("--num-context-params", type=int,
                       help="CAVIA: the size d of each task's context (5 for the sinusoid, 100 "
                       "for images)")
    train.add_argument("--context-mode", choices=["concat", "film"],
                       help="CAVIA: append the context to the input (sinusoid) or modulate the "
                       "conv layers with FiLM (images)")
    train.add_argument("--omniglot-root", help="maml/cavia: a local folder in the Omniglot layout")
    train.add_argument("--impl", choices=["auto", "reference", "native", "triton"],
                       help="the implementation of the fused ops (lstm-opt: of the rule)")
    train.add_argument("--seed", type=int)
    train.add_argument("--out", help="the run folder (checkpoint, metrics.csv, summary.json, "
                       "plots)")
    train.add_argument("--resume", action="store_true",
                       help="continue from <out>/checkpoint.pt exactly where it stopped")
    train.add_argument("--distributed", action="store_true",
                       help="split each meta-batch across the processes of a torchrun job "
                       "(gloo; only rank 0 writes and reports): torchrun --nproc_per_node=N "
                       "-m fastmeta.cli train ... --distributed")
    train.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                       help="with --distributed: how long a process waits for the others before "
                       "failing with an error (default: "
                       "fastmeta.distributed.DEFAULT_TIMEOUT_S, 300); must exceed rank 0's "
                       "periodic evaluation")
    evaluate = sub.add_parser("eval", help="evaluate a trained checkpoint on new tasks")
    evaluate.add_argument("checkpoint", help="a checkpoint.pt of `fastmeta train`")
    evaluate.add_argument("--tasks", type=int,
                          help=f"new tasks (default {MAML_EVAL_TASKS}); lstm-opt: held-out "
                          "problems (default: the run's --eval-tasks)")
    evaluate.add_argument("--steps", type=int, nargs="+",
                          help="inner steps (default "
                          f"{' '.join(map(str, MAML_EVAL_STEPS))}); lstm-opt: optimizee steps "
                          "(default: the run's --horizon and twice it)")
    evaluate.add_argument("--shots", type=int, nargs="+",
                          help="support sizes (maml/cavia only; default: the run's --shots)")
    evaluate.add_argument("--seed", type=int,
                          help="seed of the new tasks (maml/cavia only; default: the seed of "
                          "the tasks `fastmeta train` reports on)")
    evaluate.add_argument("--draws", type=int, default=1,
                          help="independent sets of --tasks tasks, seeds --seed, --seed + 1, "
                          "...: prints the pooled loss and each set's mean (maml/cavia only; "
                          "default %(default)s)")
    tune = sub.add_parser(
        "hpo", help="tune SGD's lr, momentum and weight decay (hypergradients or Optuna)",
        description="Tune SGD's per-layer learning rates, momentum and weight decay on a task, "
        "within a wall-clock budget: by hypergradient descent through unrolled training "
        "(hypergrad), or with Optuna's TPE, CMA-ES or random search (pip install "
        "\"fastmeta[hpo]\"). Each run adds its result to <out>/summary.json, so several "
        "methods and seeds run into one --out are tabulated and plotted together.")
    tune.add_argument("--task", choices=["digits-mlp"], default="digits-mlp",
                      help="what to tune SGD on (default: %(default)s)")
    tune.add_argument("--method", choices=["hypergrad", "tpe", "cmaes", "random"],
                      required=True)
    tune.add_argument("--budget", type=float, required=True, metavar="SECONDS",
                      help="wall-clock seconds; the training run in progress then finishes")
    tune.add_argument("--runs", type=int, help="also stop after this many training runs")
    tune.add_argument("--seed", type=int, default=0,
                      help="data split, initialisation, minibatch order and sampler seed")
    tune.add_argument("--out", help="results folder (default: hpo-<task>)")
    tune.add_argument("--unroll", type=int,
                      help="hypergrad: training steps per hyper-step, K (default 20)")
    tune.add_argument("--hyper-lr", type=float,
                      help="hypergrad: Adam's lr on the reparametrized hyperparameters")
    tune.add_argument("--impl", choices=["auto", "reference", "native", "triton"],
                      default="auto", help="the implementation of the fused steps")
    args = parser.parse_args(argv)
    handlers = {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench, "train": cmd_train,
                "eval": cmd_eval, "hpo": cmd_hpo}
    return handlers[args.command](args)


def console_main() -> NoReturn:
    """The ``fastmeta`` command: :func:`main`, then exit with its code.

    A process that joined a process group (``train --distributed``) leaves through
    ``os._exit`` once its output is flushed, whether the run succeeded or not: with torch
    2.13's gloo, the C++ teardown at interpreter exit sometimes aborts ("terminate called
    without an active exception", exit -6) even after ``destroy_process_group``. Seen here
    after a failed collective (1 of 4 runs of the rank-dies test: exit -6 instead of 1) and
    after a successful two-node run (rank 1 exited -6, its torchrun agent reported the job
    failed and closed the rendezvous store under the other node). Nothing is left to do by
    then: the run's files are written and closed before ``main`` returns.
    """
    code = main()
    if _used_process_group:
        from fastmeta import distributed

        distributed.exit_skipping_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
