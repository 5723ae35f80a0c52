"""manage.py backup: the database, vector store and uploaded files at one moment."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from core import backup


class Command(BaseCommand):
    help = (
        "Write one .tar.gz with the database, the dense vectors of every indexed chunk and "
        "the uploaded files, all as of one moment. Restore it with `manage.py restore`."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "path",
            nargs="?",
            help="Where to write it (default var/backups/rmassimo-<UTC time>.tar.gz).",
        )

    def handle(self, *args, **options):
        if options["path"]:
            path = Path(options["path"])
        else:
            stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
            path = Path(settings.VAR_DIR) / "backups" / f"rmassimo-{stamp}.tar.gz"
        try:
            summary = backup.backup_create(path=path)
        except (backup.BackupError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Backup written to {summary.path}: {summary.corpora} corpora, "
            f"{summary.documents} documents, {summary.vectors} vectors, "
            f"{summary.media_files} files."
        )
        if summary.reindex:
            self.stdout.write(
                f"{len(summary.reindex)} document(s) were being ingested: a restore ingests "
                "them again."
            )
