from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "GPU workers"

    def ready(self) -> None:
        from workers import signals  # noqa: F401 - connects the Celery signal handlers
