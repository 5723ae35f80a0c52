from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "R.Massimo core"

    def ready(self) -> None:
        from core import tracing

        tracing.setup_from_environment()
