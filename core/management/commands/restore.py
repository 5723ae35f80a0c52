"""manage.py restore: a backup into a fresh stack, then the work in flight queued again."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from core import backup


class Command(BaseCommand):
    help = (
        "Restore a backup written by `manage.py backup` into an empty database, vector store "
        "and media folder (applying this version's migrations first), then queue again the "
        "questions and ingestions that were in flight."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="The .tar.gz written by `manage.py backup`.")

    def handle(self, *args, **options):
        try:
            summary = backup.backup_restore(path=Path(options["path"]))
        except (backup.BackupError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Restored {summary.path}: {summary.corpora} corpora, {summary.documents} "
            f"documents, {summary.vectors} vectors, {summary.media_files} files; queued "
            f"again {summary.requeued_questions} question(s) and "
            f"{summary.requeued_documents} document(s)."
        )
