"""manage.py evaluate import FILE --corpus SLUG --set NAME
manage.py evaluate run --corpus SLUG --set NAME [--retrieval-only] [--judge-model M] [--json]
                       [--fail-under METRIC=VALUE ...]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from evaluation import formats, selectors, services
from evaluation.models import METRICS, EvaluationRun, EvaluationSet
from ingestion.models import Corpus

_POLL_S = 0.25


def _threshold(raw: str) -> tuple[str, float]:
    name, _, value = raw.partition("=")
    if name not in METRICS:
        raise CommandError(f"--fail-under: unknown metric '{name}'; one of {', '.join(METRICS)}.")
    try:
        return name, float(value)
    except ValueError:
        raise CommandError(f"--fail-under {raw}: the value must be a number.") from None


def _corpus(slug: str) -> Corpus:
    corpus = Corpus.objects.filter(slug=slug).first()
    if corpus is None:
        raise CommandError(f"Unknown corpus '{slug}'; ingest its documents first.")
    return corpus


class Command(BaseCommand):
    help = "Import evaluation sets and run them through the workers."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        imp = sub.add_parser("import", help="Import a set from JSONL or CSV (all or nothing).")
        imp.add_argument("file", help="A .jsonl file (or .csv).")
        imp.add_argument("--corpus", required=True, help="Corpus slug.")
        imp.add_argument("--set", required=True, dest="set_name", help="Set name.")
        run = sub.add_parser("run", help="Run a set through the workers and print its metrics.")
        run.add_argument("--corpus", required=True, help="Corpus slug.")
        run.add_argument("--set", required=True, dest="set_name", help="Set name.")
        run.add_argument(
            "--retrieval-only", action="store_true", help="Measure retrieval; ask no model."
        )
        run.add_argument("--judge-model", default="", help="Ollama model judging faithfulness.")
        run.add_argument("--json", action="store_true", help="Print the finished run as JSON.")
        run.add_argument(
            "--fail-under",
            action="append",
            default=[],
            metavar="METRIC=VALUE",
            help="Exit non-zero when the metric is below VALUE or not measured (repeatable; "
            "for refused_answerable, when above).",
        )
        run.add_argument(
            "--timeout", type=float, default=3600, help="Give up waiting after this many seconds."
        )

    def handle(self, *args, **options):
        return getattr(self, f"_{options['action']}")(options)

    def _import(self, options):
        path = Path(options["file"])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{path} could not be read: {exc}") from exc
        corpus = _corpus(options["corpus"])
        try:
            items = formats.parse(text, kind=formats.kind_of(path.name))
        except formats.BadFile as exc:
            for number, message in exc.problems:
                self.stderr.write(f"{path}:{number}: {message}")
            raise CommandError(f"Nothing imported: {len(exc.problems)} bad line(s).") from exc
        imported = services.set_import(corpus=corpus, name=options["set_name"], items=items)
        answerable = sum(item.answerable for item in items)
        self.stdout.write(
            f"Set '{imported.evaluation_set}': {len(items)} items ({answerable} answerable, "
            f"{len(items) - answerable} unanswerable); {imported.created} new, "
            f"{imported.updated} changed, {imported.removed} removed."
        )

    def _run(self, options):
        thresholds = [_threshold(raw) for raw in options["fail_under"]]
        corpus = _corpus(options["corpus"])
        evaluation_set = EvaluationSet.objects.filter(
            corpus=corpus, name=options["set_name"]
        ).first()
        if evaluation_set is None:
            raise CommandError(
                f"No set '{options['set_name']}' in corpus '{corpus.slug}'; import it first."
            )
        try:
            run = services.run_start(
                evaluation_set=evaluation_set,
                retrieval_only=options["retrieval_only"],
                judge_model=options["judge_model"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        for name in run.settings.get("unmatched_documents", []):
            self.stderr.write(f"warning: no document titled or named '{name}' in the corpus")
        run = self._wait(run, options["timeout"])
        summary = selectors.run_summary(run)
        if options["json"]:
            self.stdout.write(json.dumps(summary))
        else:
            self._print(run, summary)
        failures = []
        for name, floor in thresholds:
            value = summary["metrics"][name]
            lower_is_better = name == "refused_answerable"
            if value is None:
                failures.append(f"{name} was not measured")
            elif (value > floor) if lower_is_better else (value < floor):
                failures.append(
                    f"{name} = {value} ({'above' if lower_is_better else 'below'} {floor})"
                )
        if run.status != EvaluationRun.Status.DONE:
            failures.append(f"the run ended {run.status}")
        if failures:
            raise CommandError("; ".join(failures), returncode=1)

    def _wait(self, run: EvaluationRun, timeout: float) -> EvaluationRun:
        bar = tqdm(total=run.items_total, unit="item", desc="Evaluating", disable=None)
        deadline = time.monotonic() + timeout
        try:
            while True:
                run.refresh_from_db()
                bar.n = run.items_done
                bar.refresh()
                if run.is_final:
                    return run
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"Run {run.pk} not finished after {timeout:.0f}s "
                        f"({run.progress} items); is run_workers running?"
                    )
                time.sleep(_POLL_S)
        finally:
            bar.close()

    def _print(self, run: EvaluationRun, summary: dict) -> None:
        languages = list(summary["by_language"])
        self.stdout.write(
            f"Run {run.pk}: {summary['items']} items, {summary['failed']} failed; "
            f"retrieval {', '.join(run.settings.get('retrieval', [])) or '-'}, "
            f"top-k {run.settings.get('top_k')}"
        )

        def cell(value):
            return "-" if value is None else f"{value:.3f}"

        self.stdout.write(f"{'metric':<24}{'all':>8}" + "".join(f"{lang:>8}" for lang in languages))
        for key in METRICS:
            line = f"{key:<24}{cell(summary['metrics'][key]):>8}"
            line += "".join(f"{cell(summary['by_language'][lang][key]):>8}" for lang in languages)
            self.stdout.write(line)
        if run.judge:
            self.stdout.write(
                f"faithfulness (judge {run.judge_model}): {cell(run.judge['faithfulness'])}, "
                f"{run.judge['failures']} unreadable or failed verdicts"
            )
